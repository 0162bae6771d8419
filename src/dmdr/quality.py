"""Quality against diversity (the paper's Table 6) from a classifier's features, with torch-fidelity's own metric code:
FID (the Frechet distance between the Gaussians of generated and real features), precision and recall (Kynkaanniemi
et al.'s k-nearest-neighbour manifolds, k = 3) and the Inception Score (of the classifier's logits). The paper's
features are Inception-v3's; the embedded world's are its classifier's, whose penultimate layer plays Inception's
pool features and whose logits its class logits."""
from __future__ import annotations

import numpy as np
import torch


def frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> float:
    """||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) of the features' means and covariances."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    stats = [fid_features_to_statistics(x.detach().double().cpu()) for x in (generated, real)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: the share of generated features inside the real manifold (the union of balls reaching each real
    feature's k-th nearest real neighbour); recall: the share of real features inside the generated manifold."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    return calculate_precision_recall_full(generated.detach().float().cpu(), real.detach().float().cpu(), k)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> float:
    """exp E_x KL(p(y|x) || p(y)) of the classifier's class probabilities, the mean over `splits` shuffled parts:
    the number of classes when every sample is one confident class and the classes are equally common; 1 when every
    sample has one distribution."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    return isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=seed)[
        "inception_score_mean"]


def diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean, over classes, of the mean Euclidean distance between two samples of the class (in features): how
    much a class's samples differ from each other, which a density sharpened toward its modes loses."""
    spreads = []
    for c in labels.unique():
        f = features[labels == c].double()
        n = len(f)
        if n > 1:
            spreads.append(torch.cdist(f, f).sum() / (n * (n - 1)))
    return float(torch.stack(spreads).mean())


def quality_diversity(generated: torch.Tensor, real: torch.Tensor, generated_logits: torch.Tensor, k: int = 3,
                      splits: int = 10, seed: int = 0) -> dict:
    """Table 6's columns of generated samples' features against real ones': fid, precision, recall (k-NN manifolds,
    `k`) and inception_score (of the generated samples' logits)."""
    precision, recall = precision_recall(generated, real, k)
    return {"fid": frechet_distance(generated, real), "precision": precision, "recall": recall,
            "inception_score": inception_score(generated_logits, splits, seed)}


# --- C7's paired intervals -----------------------------------------------------------------------------------------

PART_METRICS = ("fid", "precision", "recall", "inception_score")


def part_metrics(path, k: int = 3) -> dict[str, np.ndarray]:
    """Each of PART_METRICS on each part of a quality stage's samples (results/quality/<model>.npz), against the renders
    of the same positions (the Inception Score of a part in one split): the paired units of C7's intervals."""
    with np.load(path) as f:
        feats, real, logits, split = (torch.from_numpy(f[x]) for x in ("features", "real_features", "logits", "split"))
    out = {m: [] for m in PART_METRICS}
    for j in range(int(split.max()) + 1):
        part = split == j
        values = quality_diversity(feats[part], real[part], logits[part], k, splits=1)
        for m in PART_METRICS:
            out[m].append(values[m])
    return {m: np.array(v) for m, v in out.items()}


def paired_parts(a: np.ndarray, b: np.ndarray) -> tuple[float, list[float]]:
    """mean_j (a_j - b_j) over the parts and its 95% Student-t interval: part j holds the same positions (classes and
    starting noise) and renders for both models, so the differences are paired."""
    from scipy import stats
    d = np.asarray(a, float) - np.asarray(b, float)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), [float(d.mean()) - half, float(d.mean()) + half]
