"""The exact parser of the embedded world: image -> detected objects.

It plays the role of GenEval's detector and DPG-Bench's VQA model. Each pixel is explained as a blend of the
background and one palette colour (the renderer's antialiasing model); pixels of one colour form connected
components; each component is fitted by rendering every shape over a small grid of sides and sub-pixel centres
(analysis by synthesis). The best fit gives the shape, size and box, and its soft IoU with the observed coverage is
the detection confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scene import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, lattice_coverage, size_name

_BG = np.asarray(BACKGROUND, np.float64)
_PALETTE = np.asarray(list(COLORS.values()), np.float64)  # (C, 3)
_NAMES = list(COLORS)
MIN_PIXELS = 6  # components smaller than this are noise (the smallest object, a 6 px triangle, covers 18)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    confidence: float

    @property
    def side(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def size(self) -> str:
        return size_name(self.side)

    def __getitem__(self, key):  # dict-style access, as the contract names the fields
        return getattr(self, key)


def unmix(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette colour index that best explains it and its coverage alpha in [0, 1].

    A pixel p is modelled as bg + a (c - bg); a is the projection onto that segment and the colour is the one with
    the smallest residual.
    """
    p = image.astype(np.float64) - _BG  # (H, W, 3)
    d = _PALETTE - _BG  # (C, 3)
    a = np.clip(np.einsum("hwk,ck->hwc", p, d) / (d * d).sum(-1), 0.0, 1.0)
    resid = ((p[:, :, None, :] - a[..., None] * d) ** 2).sum(-1)
    best = resid.argmin(-1)
    return best, np.take_along_axis(a, best[..., None], -1)[..., 0]


def soft_iou(t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Soft IoU sum(min(t, alpha)) / sum(max(t, alpha)) of each candidate coverage t (N, H, W) with `alpha` (H, W)."""
    flat = (len(t), -1)
    return np.minimum(t, alpha).reshape(flat).sum(1) / np.maximum(np.maximum(t, alpha).reshape(flat).sum(1), 1e-9)


def fit_shape(alpha: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best (shape, side, cx, cy, soft IoU) for a window of observed coverage whose top-left pixel is (x0, y0): every
    shape over a small grid of whole-pixel sides and half-pixel centres; the first of equal fits wins."""
    h, w = alpha.shape
    ys_, xs_ = np.nonzero(alpha >= 0.5)
    cx0, cy0 = x0 + (xs_.min() + xs_.max() + 1) / 2, y0 + (ys_.min() + ys_.max() + 1) / 2
    side0 = max(xs_.max() - xs_.min(), ys_.max() - ys_.min()) + 1
    best = ("circle", float(side0), cx0, cy0, -1.0)
    for shape in SHAPES:
        # a triangle's thresholded mask loses its thin apex rows: its box centre sits lower than the mask's
        dys = (-0.5, 0.0, 0.5) if shape != "triangle" else (-1.5, -1.0, -0.5, 0.0)
        grid = [(side, dy, dx) for side in (side0 - 1, side0, side0 + 1, side0 + 2) for dy in dys
                for dx in (-0.5, 0.0, 0.5)]
        side, dy, dx = (np.asarray(v, np.float64) for v in zip(*grid))
        iou = soft_iou(lattice_coverage(shape, side, cx0 + dx, cy0 + dy, x0, y0, w, h), alpha)
        k = int(np.argmax(iou))
        if iou[k] > best[4]:
            best = (shape, float(grid[k][0]), cx0 + grid[k][2], cy0 + grid[k][1], float(iou[k]))
    return best


def confidence(iou: float) -> float:
    """Detector confidence from the fit's soft IoU: 0 at IoU 0.55 (what shapeless blobs reach), 1 from 0.95 (clean
    renders under mild noise), linear between. GenEval's thresholds (0.3; 0.9 for counting) apply to this."""
    return float(np.clip((iou - 0.55) / 0.4, 0.0, 1.0))


def parse(image: np.ndarray) -> list[Detection]:
    """Detect the objects of an HxWx3 uint8 image, most confident first.

    Returns `Detection`s with `shape`, `color`, `box` (x0, y0, x1, y1 in pixels), `confidence` (from the soft IoU of
    the best rendered fit, in [0, 1]) and `size`.
    """
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"parse expects a {IMAGE_SIZE}x{IMAGE_SIZE}x3 image (the world's size), got shape "
                         f"{image.shape}")
    label, alpha = unmix(image)
    dets: list[Detection] = []
    for ci, name in enumerate(_NAMES):
        mask = (label == ci) & (alpha >= 0.5)
        comps, n = ndimage.label(mask)
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            comp = comps[sl] == k
            if comp.sum() < MIN_PIXELS:
                continue
            # window: the component's box grown by 2 px, coverage of this colour only, other components masked out
            y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, image.shape[0])
            x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, image.shape[1])
            own = ndimage.binary_dilation(comps[y0:y1, x0:x1] == k, iterations=2)
            win = np.where(own & (label[y0:y1, x0:x1] == ci), alpha[y0:y1, x0:x1], 0.0)
            win = np.clip((win - 0.1) / 0.8, 0.0, 1.0)  # faint noise is not paint
            shape, side, cx, cy, iou = fit_shape(win, x0, y0)
            h = side / 2
            dets.append(Detection(shape, name, (cx - h, cy - h, cx + h, cy + h), confidence(iou)))
    return sorted(dets, key=lambda d: -d.confidence)


def mild_corruption(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 0.5 px), colour jitter (+-5% gain, +-8 offset per channel) and Gaussian noise (sigma 6)."""
    x = ndimage.gaussian_filter(image.astype(np.float64), sigma=(0.5, 0.5, 0))
    x = x * rng.uniform(0.95, 1.05, 3) + rng.uniform(-8, 8, 3) + rng.normal(0, 6, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def scene_exact_rate(n: int = 300, seed: int = 0, corrupt: bool = False) -> float:
    """Fraction of random scenes whose render (optionally mildly corrupted) parses to exactly its objects: the same
    multiset of (shape, colour, size) among detections above GenEval's 0.3 threshold."""
    from .scene import random_scene, render

    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        objs = random_scene(rng)
        image = render(objs)
        if corrupt:
            image = mild_corruption(image, rng)
        found = sorted((d.shape, d.color, d.size) for d in parse(image) if d.confidence > 0.3)
        hits += found == sorted((o.shape, o.color, o.size) for o in objs)
    return hits / n
