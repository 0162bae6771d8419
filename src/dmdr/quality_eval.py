"""The `quality@<model>` stage (Table 6): a model's samples of the 18 classes of the class-conditional world against as
many renders, in the world classifier's features and logits, scored by dmdr.quality."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .class_world import CAPTIONS, CLASSES, render_class
from .classifier import WorldClassifier
from .config import eval_model
from .evaluation import generate, load_model, nfe, sampler_times
from .evaluator import to_tensor
from .files import write_json
from .quality import diversity, quality_diversity
from .standins import World


def class_positions(per_class: int) -> list[int]:
    """The class of each image position: classes in turn (position i: class i mod 18), so that every run of 18
    positions holds each class once and any contiguous part of the runs is class-balanced."""
    return [i % len(CLASSES) for i in range(len(CLASSES) * per_class)]


def split_of(per_class: int, splits: int) -> np.ndarray:
    """Each position's part (0..splits-1): run r = i // 18 of the classes goes to part r mod splits, so every part
    holds per_class / splits samples of each class, at the same positions for every model."""
    return (np.arange(len(CLASSES) * per_class) // len(CLASSES)) % splits


def reference_renders(labels: list[int], seed: int) -> np.ndarray:
    """The real images: one fresh render of each position's class (seeded apart from the classifier's training and
    accuracy renders)."""
    rng = np.random.default_rng([seed, 6])
    return np.stack([render_class(rng, c) for c in labels])


@torch.no_grad()
def features_and_logits(classifier: WorldClassifier, images: np.ndarray,
                        batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's features (its CLIP's image embedding: Inception's pool features) and logits of uint8 images."""
    feats, logits = [], []
    for s in range(0, len(images), batch):
        f = classifier.features(to_tensor(images[s:s + batch]))
        feats.append(f)
        logits.append(classifier.logits(f))
    return torch.cat(feats), torch.cat(logits)


def evaluate_quality(p, name: str, world: World | None = None, classifier_dir: Path = Path("models/classifier"),
                     out: Path = Path("results")) -> dict:
    """Table 6's row of model `name` (quality.models): samples_per_class samples of each of the 18 classes (prompted
    by their captions, from the noise of each position, as every model) against as many renders, in the world
    classifier's features: fid, precision, recall, inception_score and diversity (dmdr.quality.diversity; the renders'
    own as diversity_renders) of all samples (results/metrics/<name>.json), and the features, logits, classes and
    parts that C7's paired intervals are computed from, with a few images (results/quality/<name>.npz)."""
    m = eval_model(p, name, "quality")
    world = world or World.load()
    classifier = WorldClassifier.load(world.clip_eval, classifier_dir)
    q = p.quality
    labels = class_positions(q.samples_per_class)
    model, family, shift = load_model(world, m)
    torch.manual_seed(p.seed)
    images, sec = generate(world, model, m, [CAPTIONS[c] for c in labels], p.seed, q.batch,
                           sampler_times(family, m, shift))
    feats, logits = features_and_logits(classifier, images)
    real, _ = features_and_logits(classifier, reference_renders(labels, p.seed))
    classes = torch.tensor(labels)
    metrics = quality_diversity(feats, real, logits, seed=p.seed) | {
        "diversity": diversity(feats, classes), "diversity_renders": diversity(real, classes),
        "classifier_accuracy": float((logits.argmax(1) == classes).double().mean()),
        "nfe": nfe(m), "sec_per_image": sec}
    write_json(metrics, out / "metrics" / f"{name}.json")
    (out / "quality").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "quality" / f"{name}.npz", features=feats.numpy(), logits=logits.numpy(),
                        real_features=real.numpy(), labels=classes.numpy(),
                        split=split_of(q.samples_per_class, q.splits), images=images[: 4 * len(CAPTIONS)],
                        texts=np.array([CAPTIONS[c] for c in labels[: 4 * len(CAPTIONS)]]))
    return metrics
