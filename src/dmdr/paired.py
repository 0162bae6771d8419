"""Paired comparisons of evaluated models, as the claims need them (DESIGN.md section 4): every model saw the same
test prompts and starting noise (dmdr.evaluator), so two models are compared prompt by prompt, and the 95% interval
of a difference comes from a bootstrap over the test prompts, combined with a bootstrap over training seeds where a
model has several (each side's seeds drawn with replacement, its per-prompt scores averaged over the drawn seeds).

A metric's value is a weighted mean of per-prompt values: `prompt_values` says which prompts, their strata and the
weights, so that each bootstrap draw resamples prompts within each stratum (GenEval's tags: geneval_overall is the
mean of the tags' accuracies) and recomputes the metric exactly as evaluation computes it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEAN_METRICS = ("clip_score", "aesthetic", "pick", "hps", "gold")


@dataclass
class PromptValues:
    values: np.ndarray  # (prompts,) one value per prompt: the mean of its images' scores
    strata: np.ndarray  # (prompts,) the stratum of each prompt
    weights: dict  # stratum -> the weight of its mean in the metric


def prompt_values(samples: Path, metric: str, images_per_prompt: int, tags: list[str]) -> PromptValues:
    """Per-prompt values of `metric` from a model's results/samples/<model>.npz (dmdr.evaluation.evaluate).
    `tags`: the GenEval prompts' tags, in order (their images come first in the file, the DPG prompts' after)."""
    with np.load(samples) as f:
        if f"score_{metric.split('_overall')[0]}" not in f:
            raise KeyError(f"{samples}: no per-image {metric} scores (evaluated before dmdr kept them: "
                           f"run `dvc repro` to evaluate it again)")
        if metric == "geneval_overall":
            v = f["score_geneval"].reshape(-1, images_per_prompt).mean(1)
            strata = np.array(tags)
            # in sorted order: the bootstrap draws strata in this order, and a set's order changes between processes
            return PromptValues(v, strata, {t: 1 / len(set(tags)) for t in sorted(set(tags))})
        if metric == "dpg_overall":
            v = 100 * f["score_dpg"].reshape(-1, images_per_prompt).mean(1)
            keep = ~np.isnan(v)  # items DPG-Bench's rules drop: the same for every model
            return PromptValues(v[keep], np.zeros(keep.sum(), int), {0: 1.0})
        if metric in MEAN_METRICS:
            return mean_values(f[f"score_{metric}"], images_per_prompt)
    raise ValueError(f"no per-prompt form of metric {metric!r}")


def mean_values(scores: np.ndarray, images_per_prompt: int) -> PromptValues:
    """Per-prompt values of a metric that is the mean of its per-image `scores` (the prompts' images in turn)."""
    v = scores.reshape(-1, images_per_prompt).mean(1)
    return PromptValues(v, np.zeros(len(v), int), {0: 1.0})


def metric_of(values: np.ndarray, strata: np.ndarray, weights: dict) -> np.ndarray:
    """The metric from per-prompt values (last axis), the weighted mean of each stratum's mean."""
    return sum(w * values[..., strata == s].mean(-1) for s, w in weights.items())


def paired_draws(sides: list[list[PromptValues]], n_boot: int = 4000, seed: int = 0
                 ) -> tuple[list[float], np.ndarray]:
    """Each side's metric (a side: one PromptValues per training seed, all over the same prompts; its per-prompt
    values averaged over the seeds) and `n_boot` draws of it from the paired bootstrap, (sides, n_boot): each side's
    seeds resampled with replacement, then one draw of prompts within their strata shared by every side."""
    strata, weights = sides[0][0].strata, sides[0][0].weights
    arrays = [np.stack([x.values for x in side]) for side in sides]
    if len({a.shape[1] for a in arrays}) > 1 or any(not np.array_equal(x.strata, strata) for side in sides
                                                    for x in side):
        raise ValueError("paired comparison of models evaluated on different prompts: evaluate them again")
    points = [float(metric_of(a.mean(0), strata, weights)) for a in arrays]
    rng = np.random.default_rng(seed)
    seeded = [a[rng.integers(len(a), size=(n_boot, len(a)))].mean(1) for a in arrays]  # (n_boot, prompts) each
    drawn = np.zeros((len(arrays), n_boot))
    for s, w in weights.items():
        idx = np.flatnonzero(strata == s)
        pick = idx[rng.integers(len(idx), size=(n_boot, len(idx)))]
        drawn += [w * np.take_along_axis(v, pick, axis=1).mean(1) for v in seeded]
    return points, drawn


def difference(a: list[PromptValues], b: list[PromptValues], n_boot: int = 4000, seed: int = 0
               ) -> tuple[float, list[float]]:
    """metric(a) - metric(b), each side the mean over its training seeds (a list: one PromptValues per seed, all
    over the same prompts), and its 95% percentile interval from the paired bootstrap (paired_draws)."""
    (m_a, m_b), drawn = paired_draws([a, b], n_boot, seed)
    low, high = np.percentile(drawn[0] - drawn[1], [2.5, 97.5])
    return m_a - m_b, [float(low), float(high)]


def gap_closed(student: list[PromptValues], base: list[PromptValues], teacher: list[PromptValues],
               n_boot: int = 4000, seed: int = 0) -> tuple[float, list[float]]:
    """(metric(student) - metric(base)) / (metric(teacher) - metric(base)): the fraction of the base's gap to the
    teacher that the student closes (1: all of it, 0: none, below 0: the gap widened, above 1: past the teacher), and
    its 95% percentile interval from the paired bootstrap (paired_draws, one draw of prompts for all three).
    Undefined (nan) where the base is not below the teacher."""
    (s, b, t), drawn = paired_draws([student, base, teacher], n_boot, seed)
    if not t > b:
        return float("nan"), [float("nan"), float("nan")]
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = np.nanpercentile((drawn[0] - drawn[1]) / (drawn[2] - drawn[1]), [2.5, 97.5])
    return (s - b) / (t - b), [float(low), float(high)]


def verdict(intervals: list[list[float] | None]) -> str:
    """'holds' when every check's interval lies above 0, 'does not hold' when one lies below 0, else
    'inconclusive' (an interval that covers 0, or a check that could not be measured)."""
    if any(ci is not None and ci[1] < 0 for ci in intervals):
        return "does not hold"
    if intervals and all(ci is not None and ci[0] > 0 for ci in intervals):
        return "holds"
    return "inconclusive"
