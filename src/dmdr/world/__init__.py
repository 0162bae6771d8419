"""The embedded world: scenes, renderer, parser, prompt grammar, benchmark-analogue scorers, gold preference."""
from .parse import Detection, parse
from .scene import BACKGROUND, COLORS, IMAGE_SIZE, RELATIONS, SHAPES, SIZES, Obj, random_scene, render

__all__ = ["BACKGROUND", "COLORS", "IMAGE_SIZE", "RELATIONS", "SHAPES", "SIZES", "Detection", "Obj", "parse",
           "random_scene", "render"]
