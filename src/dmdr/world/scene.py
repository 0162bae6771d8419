"""Scenes of the embedded world and their antialiased 32x32 renderer.

A scene is a list of objects, each a shape of one colour with a square bounding box. The vocabulary is the
contract of DESIGN.md section 4: outside checks render their own scenes with it and call `dmdr.world.parse`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 50, 50),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "purple": (140, 70, 190),
}
BACKGROUND = (245, 245, 245)
SIZES = {"small": (6, 9), "large": (11, 15)}  # bounding-box side in pixels, inclusive
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's
MAX_OBJECTS = 4
SUPERSAMPLE = 4  # sub-pixel samples per axis for antialiasing


def size_name(side: float) -> str:
    """The size word of a bounding-box side: the midpoint between the two ranges splits them."""
    return "small" if side <= (SIZES["small"][1] + SIZES["large"][0]) / 2 else "large"


@dataclass(frozen=True)
class Obj:
    """One object: `cx, cy` is the box centre and `side` the box side, in pixels."""

    shape: str
    color: str
    side: float
    cx: float
    cy: float

    @property
    def size(self) -> str:
        return size_name(self.side)

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def coverage(shape: str, side: float, cx: float, cy: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by the shape; `xs`, `ys` are sub-pixel sample coordinates (..., S, S)."""
    h = side / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif shape == "square":
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        depth = dy + h
        inside = (depth >= 0) & (dy <= h) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.mean(axis=(-1, -2))


def lattice_coverage(shape: str, side: np.ndarray, cx: np.ndarray, cy: np.ndarray, x0: int, y0: int, w: int,
                     h: int) -> np.ndarray:
    """coverage() of N candidate shapes (arrays (N,)) over the pixel window [x0, x0+w) x [y0, y0+h), equal to
    coverage()'s bit for bit: (N, h, w). Centres and half sides must lie on multiples of 1/(2S) px (S = SUPERSAMPLE),
    as parse's candidates do (whole-pixel sides, half-pixel centres).

    In units of 1/(2S) px every sub-pixel sample sits at an odd integer and every centre and half side at an integer,
    so each of coverage()'s tests is exact integer arithmetic, and each row of samples inside a shape is one run
    |X - CX| <= r: a pixel's count is the overlap of its S samples with the run."""
    u = 2 * SUPERSAMPLE
    scaled = [np.asarray(v, np.float64) * u for v in (cx, cy, side / 2)]
    if any((v != np.rint(v)).any() for v in scaled):
        raise ValueError(f"lattice_coverage needs centres and half sides on multiples of 1/{u} px; coverage() takes "
                         f"any")
    cx_, cy_, half = (v.astype(np.int64)[:, None] for v in scaled)
    dy = u * y0 + 1 + 2 * np.arange(h * SUPERSAMPLE) - cy_  # (N, h*S): each sample row's offset from the centre
    if shape == "circle":  # floor(sqrt(n)) is exact in float64 for these small integers
        left = half * half - dy * dy
        r = np.where(left >= 0, np.floor(np.sqrt(np.maximum(left, 0))).astype(np.int64), -1)
    elif shape == "square":
        r = np.where(np.abs(dy) <= half, half, -1)
    elif shape == "triangle":  # apex up: the half width is depth / 2 at depth dy + half below the apex
        depth = dy + half
        r = np.where((depth >= 0) & (dy <= half), depth // 2, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    # sample column j sits at X = u * x0 + 1 + 2j: the run is columns lo..hi (empty when r is -1)
    offset = cx_ - u * x0 - 1
    lo, hi = -((r - offset) // 2), (offset + r) // 2
    first = SUPERSAMPLE * np.arange(w)  # each pixel's first sample column
    count = np.minimum(hi[..., None], first + SUPERSAMPLE - 1) - np.maximum(lo[..., None], first) + 1
    count = np.clip(count, 0, SUPERSAMPLE).reshape(len(cx_), h, SUPERSAMPLE, w).sum(2)
    return count / SUPERSAMPLE ** 2


def subpixel_grid(x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample coordinates of the pixel window [x0, x0+w) x [y0, y0+h), shape (h, w, S, S)."""
    offs = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x0 + w)[None, :, None, None] + offs[None, None, None, :]).repeat(h, 0).repeat(SUPERSAMPLE, 2)
    ys = (np.arange(y0, y0 + h)[:, None, None, None] + offs[None, None, :, None]).repeat(w, 1).repeat(SUPERSAMPLE, 3)
    return xs, ys


_FULL_GRID = subpixel_grid(0, 0, IMAGE_SIZE, IMAGE_SIZE)


def render(objects: list[Obj] | tuple[Obj, ...]) -> np.ndarray:
    """Render a scene to an HxWx3 uint8 image, objects painted in order over the background."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float64)
    img[:] = BACKGROUND
    for o in objects:
        alpha = coverage(o.shape, o.side, o.cx, o.cy, *_FULL_GRID)[..., None]
        img = img * (1 - alpha) + np.asarray(COLORS[o.color], np.float64) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def boxes_clear(a: Obj, b: Obj, gap: float) -> bool:
    """True when the two boxes are at least `gap` pixels apart on some axis."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def place(rng: np.random.Generator, shape: str, color: str, size: str, others: list[Obj],
          margin: float = 1.0, gap: float = 2.0, tries: int = 200, where=None) -> Obj | None:
    """A random object of the given kind that keeps `gap` pixels from `others`, or None if none fits.

    `where(obj) -> bool` adds a constraint, e.g. a spatial relation to another object.
    """
    lo, hi = SIZES[size]
    for _ in range(tries):
        side = float(rng.integers(lo, hi + 1))
        h = side / 2
        cx = rng.uniform(margin + h, IMAGE_SIZE - margin - h)
        cy = rng.uniform(margin + h, IMAGE_SIZE - margin - h)
        o = Obj(shape, color, side, round(cx * 2) / 2, round(cy * 2) / 2)
        if all(boxes_clear(o, p, gap) for p in others) and (where is None or where(o)):
            return o
    return None


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> list[Obj]:
    """A scene of 1-4 random objects that do not touch."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    while True:
        objs: list[Obj] = []
        for _ in range(n):
            o = place(rng, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES))), objs)
            if o is None:
                break
            objs.append(o)
        if len(objs) == n:
            return objs


def relative_position(a: tuple, b: tuple) -> set[str]:
    """GenEval's relations (evaluation/evaluate_images.py) of box `a` relative to box `b` (x0, y0, x1, y1): the
    centre offset shrunk by 0.1 times the summed box sides, normalised by the raw offset; a component below -0.5 /
    above 0.5 gives left/right, above/below."""
    boxes = np.array([a[:4], b[:4]], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel
