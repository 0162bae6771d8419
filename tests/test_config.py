"""params.yaml validation: every bad value is an error naming its key, raised before any compute."""
from pathlib import Path

import pytest
import yaml

from dmdr.config import ParamsError, dotted, load, overrides, preset, recipe

ROOT = Path(__file__).resolve().parents[1]


def with_change(tmp_path, change: dict) -> Path:
    from dmdr.config import deep_merge
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), change)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


def test_repository_params_are_valid():
    p = load(ROOT / "params.yaml")
    assert set(p.recipes) >= {"dmd2-4", "dmd2-1", "dmdr-stage1-4", "dmdr-4", "dmdr-1", "dmd-then-rl-4",
                              "dmd-then-joint-4", "rtdm-only-4", "teacher-refl", "teacher-refl-then-dmd-4",
                              "dmdr-4-no-dynadg", "dmdr-4-no-dynars"}
    assert recipe(p, "dmd2-1").generator_steps == 1
    assert recipe(p, "dmdr-4").init == "models/distill/dmdr-stage1-4" and recipe(p, "dmdr-4").rl.weight > 0


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
    ({"recipes": {"x": {"steps": 3}}}, "recipes.x.init: required"),
    ({"recipes": {"x": {"init": "models/distill/nope"}}}, "recipes.x.init: 'models/distill/nope' is neither"),
    ({"recipes": {"a": {"init": "models/distill/b"}, "b": {"init": "models/distill/a"}}},
     "recipes.a.init: a cycle of recipes: a -> b -> a"),
    ({"recipes": {"x": {"init": "models/distill/x"}}}, "recipes.x.init: a cycle of recipes: x -> x"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "hps+beauty"}}}}, "recipes.dmdr-4.rl.reward: unknown reward 'beauty'"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "x*hps"}}}}, "recipes.dmdr-4.rl.reward: bad weight"),
    ({"recipes": {"dmdr-4": {"rl": {"loss": "ppo"}}}}, "recipes.dmdr-4.rl.loss: must be one of"),
    ({"recipes": {"dmdr-4": {"rl": {"weight": -0.5}}}}, "recipes.dmdr-4.rl.weight: must be >= 0"),
    ({"distill": {"rtdm": {"form": "released"}}}, "distill.rtdm.form: must be one of \\('exp', 'reward'\\)"),
    ({"distill": {"rtdm": {"beta": 0.0}}}, "distill.rtdm.beta: must be positive"),
    ({"distill": {"dynadg": {"form": "on"}}}, "distill.dynadg.form: must be one of"),
    ({"distill": {"dynars": {"enabled": "yes"}}}, "distill.dynars.enabled: expected bool"),
    ({"distill": {"real": "student"}}, "distill.real: must be one of"),
    ({"rewards": {"hps_label_noise": 2.0}}, "rewards.hps_label_noise: must lie in"),
    ({"evaluate": {"models": {"dmdr-4": {"checkpoint": "models/distill/dmdr-5"}}}},
     "evaluate.models.dmdr-4.checkpoint: 'models/distill/dmdr-5' names no recipe"),
    ({"presets": {"sd3-medium": {"resolution": 0}}}, "presets.sd3-medium.resolution: must be positive"),
    ({"presets": {"sd3-medium": {"stage2": {"rl": {"reward": "clip+hps2"}}}}},
     "presets.sd3-medium.stage2.rl.reward: unknown reward 'hps2'"),
    ({"presets": {"x": {"resolution": 512}}}, "presets.x.teacher: required"),
    ({"presets": {"sd3-medium": {"reward_models": {"hps": {"checkpont": "a.pt"}}}}},
     "presets.sd3-medium.reward_models.hps.checkpont: unknown key"),
    ({"presets": {"x": {"teacher": "t", "stage2": {"rl": {"weight": 0.5, "reward": "pick"}}}}},
     "presets.x.stage2.rl.reward: 'pick' has no entry in presets.x.reward_models"),
    ({"real": {"preset": 3}}, "real.preset: expected str"),
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


def test_command_line_changes_merge_over_the_file_and_are_checked():
    """dmdr.real's --set, as `dvc exp run -S`: dotted keys, YAML values, checked like the file's own."""
    changes = overrides(["presets.sd3-medium.stage1.optimizer=adamw", "presets.sd3-medium.stage1.batch=16",
                         "seed=3"])
    p = load(ROOT / "params.yaml", changes)
    _, stage1, stage2 = preset(p, "sd3-medium")
    assert (stage1.optimizer, stage1.batch, stage2.optimizer, p.seed) == ("adamw", 16, "adamw8bit", 3)
    with pytest.raises(ParamsError, match=r"presets\.sd3-medium\.stage1\.optimizr: unknown key"):
        load(ROOT / "params.yaml", overrides(["presets.sd3-medium.stage1.optimizr=adamw"]))
    with pytest.raises(ParamsError, match=r"presets\.sd3-medium\.stage1\.batch: expected int"):
        load(ROOT / "params.yaml", overrides(["presets.sd3-medium.stage1.batch=many"]))
    for bad in ("seed", "=3", "a..b=1"):
        with pytest.raises(ParamsError, match="expected KEY=VALUE"):
            overrides([bad])
    assert dotted(changes) == {"presets.sd3-medium.stage1.optimizer": "adamw", "presets.sd3-medium.stage1.batch": 16,
                               "seed": 3}  # the inverse: how a record's differences are named
