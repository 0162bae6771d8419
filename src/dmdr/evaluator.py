"""One evaluator for every model, embedded or real: each image position sampled from noise that depends only on the
seed and the position (so every model sees the same prompts and starting noise, and any two can be compared image by
image), each process sampling its share, every image scored by every scorer, the scores kept per image.

`sample(indices) -> images` (B, 3, H, W) in [-1, 1] is the model's sampler; a scorer is `(images, texts) -> one
score per image`, images as float in [-1, 1] after the uint8 round trip of a saved image."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

Sample = Callable[[list[int]], torch.Tensor]
Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


def to_tensor(images: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def share(n: int, state=None) -> list[int]:
    """The image positions this process samples: all of them in one process, a contiguous share among several."""
    if state is None or state.num_processes == 1:
        return list(range(n))
    with state.split_between_processes(list(range(n))) as mine:
        return list(mine)


@torch.no_grad()
def generate(sample: Sample, positions: list[int], batch: int) -> tuple[np.ndarray, float]:
    """The images of `positions` (uint8, as saved), `batch` at a time, and the seconds per image of sampling them
    (latents to pixels)."""
    images, seconds = [], 0.0
    for s in range(0, len(positions), batch):
        t = time.perf_counter()
        x = sample(positions[s:s + batch])
        seconds += time.perf_counter() - t
        images.append(to_uint8(x))
    if not images:  # more processes than images
        return np.zeros((0, 0, 0, 3), np.uint8), 0.0
    return np.concatenate(images), seconds / len(positions)


@torch.no_grad()
def score(scorers: dict[str, Scorer], images: np.ndarray, texts: list[str], batch: int = 512,
          device="cpu") -> dict[str, np.ndarray]:
    """Every scorer's score of every image (float64, one per image), scored `batch` images at a time."""
    out = {name: [] for name in scorers}
    for s in range(0, len(texts), batch):
        x = to_tensor(images[s:s + batch], device)
        for name, scorer in scorers.items():
            out[name].append(scorer(x, texts[s:s + batch]).double().cpu())
    return {name: torch.cat(v).numpy() if v else np.zeros(0) for name, v in out.items()}


def gathered(per_image: dict[str, np.ndarray], state=None) -> dict[str, np.ndarray]:
    """Each process's per-image scores joined in position order (shares are contiguous and in process order)."""
    if state is None or state.num_processes == 1:
        return per_image
    from accelerate.utils import gather_object
    parts = gather_object([per_image])
    return {k: np.concatenate([p[k] for p in parts]) for k in per_image}


def sample_and_score(sample: Sample, texts: list[str], scorers: dict[str, Scorer], batch: int, state=None,
                     score_batch: int = 512, device="cpu") -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Sample every position of `texts` (this process its share) and score each image: returns the per-image scores
    of all positions, this process's images (uint8) and its seconds per image."""
    positions = share(len(texts), state)
    images, seconds = generate(sample, positions, batch)
    mine = [texts[i] for i in positions]
    return gathered(score(scorers, images, mine, score_batch, device), state), images, seconds
