"""The class-conditional world of Table 6: a class is a shape and a colour (18 classes), and its images are one object
of that class at a random size and position: the world's "colors" renders, captioned as the grammar captions them
("a photo of a red circle"). The world's teacher, trained on such renders among others, prompted with a class's
caption is a class-conditional teacher."""
from __future__ import annotations

import numpy as np

from .world.grammar import Group, Spec, text
from .world.scene import COLORS, SHAPES, SIZES, place, render

CLASSES = tuple((shape, color) for shape in SHAPES for color in COLORS)


def caption(c: int) -> str:
    """Class `c`'s prompt: "a photo of a <colour> <shape>"."""
    shape, color = CLASSES[c]
    return text(Spec((Group(shape, color=color),)))


CAPTIONS = tuple(caption(c) for c in range(len(CLASSES)))
_CLASS_OF_CAPTION = {t: c for c, t in enumerate(CAPTIONS)}


def class_of(prompts: list[str]) -> list[int]:
    """The class each prompt asks for (its caption's index), or a ValueError naming a prompt that is no class's."""
    unknown = [t for t in prompts if t not in _CLASS_OF_CAPTION]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is no class's caption (the class-conditional world's prompts are "
                         f"{CAPTIONS[0]!r} ... {CAPTIONS[-1]!r}; a class reward needs prompts: classes)")
    return [_CLASS_OF_CAPTION[t] for t in prompts]


def render_class(rng: np.random.Generator, c: int) -> np.ndarray:
    """One image of class `c`: its object at a random size and position (uint8, H x W x 3)."""
    shape, color = CLASSES[c]
    return render([place(rng, shape, color, str(rng.choice(list(SIZES))), [])])


def class_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of uniformly drawn classes, and their classes."""
    labels = rng.integers(len(CLASSES), size=n)
    return np.stack([render_class(rng, int(c)) for c in labels]), labels
