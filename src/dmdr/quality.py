"""Quality against diversity (the paper's Table 6) from a classifier's features, with torch-fidelity's own metric code:
FID (the Frechet distance between the Gaussians of generated and real features), precision and recall (Kynkaanniemi
et al.'s k-nearest-neighbour manifolds, k = 3) and the Inception Score (of the classifier's logits). The paper's
features are Inception-v3's; the embedded world's are its classifier's, whose penultimate layer plays Inception's
pool features and whose logits its class logits."""
from __future__ import annotations

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


def quality_diversity(generated: torch.Tensor, real: torch.Tensor, generated_logits: torch.Tensor, k: int = 3,
                      splits: int = 10, seed: int = 0) -> dict:
    """Table 6's columns of generated samples' features against real ones': fid, precision, recall (k-NN manifolds,
    `k`) and inception_score (of the generated samples' logits)."""
    precision, recall = precision_recall(generated, real, k)
    return {"fid": frechet_distance(generated, real), "precision": precision, "recall": recall,
            "inception_score": inception_score(generated_logits, splits, seed)}
