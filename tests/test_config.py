"""params.yaml validation: every bad value is an error naming its key, raised before any compute."""
from pathlib import Path

import pytest
import yaml

from dmdr.config import ParamsError, load, recipe

ROOT = Path(__file__).resolve().parents[1]


def with_change(tmp_path, change: dict) -> Path:
    from dmdr.config import deep_merge
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), change)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


def test_repository_params_are_valid():
    p = load(ROOT / "params.yaml")
    assert set(p.recipes) >= {"dmd2-4", "dmd2-1"}
    assert recipe(p, "dmd2-1").generator_steps == 1


@pytest.mark.parametrize("change, key", [
    ({"sed": 1}, "sed: unknown key"),
    ({"world": {"teacher": {"stepz": 3}}}, "world.teacher.stepz: unknown key"),
    ({"world": {"teacher": {"steps": "many"}}}, "world.teacher.steps: expected int"),
    ({"world": {"teacher": {"steps": 0}}}, "world.teacher.steps: must be positive"),
    ({"world": {"teacher": {"backbone": "dit"}}}, "world.teacher.backbone: must be one of"),
    ({"world": {"teacher": {"cfg_dropout": 1.5}}}, "world.teacher.cfg_dropout: must lie in"),
    ({"distill": {"batch": True}}, "distill.batch: expected int"),
    ({"distill": {"generator_lr": -1.0}}, "distill.generator_lr: must be positive"),
    ({"recipes": {"dmd2-4": {"generator_stepz": 4}}}, "recipes.dmd2-4.generator_stepz: unknown key"),
    ({"recipes": {"dmd2-4": {"generator_steps": "four"}}}, "recipes.dmd2-4.generator_steps: expected int"),
    ({"evaluate": {"models": {"x": {"steps": 4}}}}, "evaluate.models.x"),
    ({"evaluate": {"models": {"teacher": {"kind": "oracle"}}}}, "evaluate.models.teacher.kind: must be one of"),
    ({"prompts": {"extra_files": "a.txt"}}, "prompts.extra_files: expected list"),
    ({"world": []}, "world: expected a mapping"),
])
def test_bad_params_name_the_key(tmp_path, change, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load(with_change(tmp_path, change))


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="recipes.nope: no such recipe"):
        recipe(load(ROOT / "params.yaml"), "nope")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(bad)
