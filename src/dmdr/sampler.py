"""The one sampler file every trained model directory holds (SAMPLER_FILE), embedded or real: how its few-step
generator samples. `steps`, `shift`, `times` (the flow times, from the noisiest), `cfg` (a generator's own guidance
scale; 1 for none), `prediction` (what the saved network predicts: velocity for flow models, epsilon for SDXL's UNet)
and `recipe` (the recipe or stage it came from); in a diffusers pipeline directory also `call`, the keyword
arguments of `pipe(prompt, **call)` that sample as the generator was trained.

Beside it, TRAINING_FILE: the resolved settings the model was trained with (dmdr.distill.training_record)."""
from __future__ import annotations

import json
from pathlib import Path

SAMPLER_FILE = "sampler.json"
TRAINING_FILE = "dmdr_training.json"


def settings(steps: int, shift: float, times, cfg: float = 1.0, prediction: str = "velocity", recipe: str = "",
             call: dict | None = None) -> dict:
    """The sampler's settings, in the file's order of keys."""
    out = {"steps": steps, "shift": shift, "times": [float(t) for t in times], "cfg": cfg, "prediction": prediction,
           "recipe": recipe}
    return out | ({"call": call} if call is not None else {})


def write(directory: Path, sampler: dict) -> None:
    (Path(directory) / SAMPLER_FILE).write_text(json.dumps(sampler, indent=1))


def read(directory: Path) -> dict:
    """A model directory's sampler settings ({} where it has none: the world's teacher)."""
    path = Path(directory) / SAMPLER_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(directory: Path, record: dict) -> None:
    """The training record beside the model (TRAINING_FILE)."""
    (Path(directory) / TRAINING_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
