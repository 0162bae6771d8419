"""params.yaml validation: every bad value is an error naming its key, raised before any compute."""
import re
from pathlib import Path

import pytest
import yaml

from dmdr.config import ParamsError, dotted, load, overrides, preset, read_yaml, recipe

ROOT = Path(__file__).resolve().parents[1]


def with_change(tmp_path, change: dict) -> Path:
    from dmdr.config import deep_merge
    params = deep_merge(read_yaml((ROOT / "params.yaml").read_text()), change)
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


# Each bad value (a nested change of params.yaml) and the start of the error that must name it. The cases marked
# "new" passed unnoticed (or failed later, inside torch) before range checks, relations and YAML 1.2 were added.
BAD = [
    ({"sed": 1}, "sed: unknown key"),
    ({"world": {"teacher": {"stepz": 3}}}, "world.teacher.stepz: unknown key"),
    ({"world": {"teacher": {"steps": "many"}}}, "world.teacher.steps: expected int"),
    ({"world": {"teacher": {"steps": 0}}}, "world.teacher.steps: must be in [1, 10000000]"),
    ({"world": {"teacher": {"backbone": "dit"}}}, "world.teacher.backbone: must be one of"),
    ({"world": {"teacher": {"cfg_dropout": 1.5}}}, "world.teacher.cfg_dropout: must be in [0, 1]"),
    ({"distill": {"batch": True}}, "distill.batch: expected int"),
    ({"distill": {"generator_lr": -1.0}}, "distill.generator_lr: must be positive and at most 1"),
    ({"recipes": {"dmd2-4": {"generator_stepz": 4}}}, "recipes.dmd2-4.generator_stepz: unknown key"),
    ({"recipes": {"dmd2-4": {"generator_steps": "four"}}}, "recipes.dmd2-4.generator_steps: expected int"),
    ({"evaluate": {"models": {"x": {"steps": 4}}}}, "evaluate.models.x.checkpoint: required"),
    ({"evaluate": {"models": {"teacher": {"kind": "oracle"}}}}, "evaluate.models.teacher.kind: must be one of"),
    ({"prompts": {"extra_files": "a.txt"}}, "prompts.extra_files: expected dict"),
    ({"prompts": {"extra_files": {"geneval": 3}}}, "prompts.extra_files.geneval: expected the path of a prompt file"),
    ({"prompts": {"extra_files": {"../up": "a.txt"}}}, "prompts.extra_files: names must be letters"),
    ({"world": []}, "world: expected a mapping"),
    ({"recipes": {"x": {"steps": 3}}}, "recipes.x.init: required"),
    ({"recipes": {"x": {"init": "models/distill/nope"}}}, "recipes.x.init: 'models/distill/nope' is neither"),
    ({"recipes": {"a": {"init": "models/distill/b"}, "b": {"init": "models/distill/a"}}},
     "recipes.a.init: a cycle of recipes: a -> b -> a"),
    ({"recipes": {"x": {"init": "models/distill/x"}}}, "recipes.x.init: a cycle of recipes: x -> x"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "hps+beauty"}}}}, "recipes.dmdr-4.rl.reward: unknown reward 'beauty'"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "x*hps"}}}}, "recipes.dmdr-4.rl.reward: bad weight"),
    ({"recipes": {"dmdr-4": {"rl": {"loss": "ppo"}}}}, "recipes.dmdr-4.rl.loss: must be one of"),
    ({"recipes": {"dmdr-4": {"rl": {"weight": -0.5}}}}, "recipes.dmdr-4.rl.weight: must be in [0, 100]"),
    ({"distill": {"rtdm": {"form": "released"}}}, "distill.rtdm.form: must be one of ('exp', 'reward')"),
    ({"distill": {"rtdm": {"beta": 0.0}}}, "distill.rtdm.beta: must be positive"),
    ({"distill": {"dynadg": {"form": "on"}}}, "distill.dynadg.form: must be one of"),
    ({"distill": {"dynars": {"enabled": "yes"}}}, "distill.dynars.enabled: expected true or false, got the string 'yes'"),
    ({"distill": {"real": "student"}}, "distill.real: must be one of"),
    ({"rewards": {"hps_label_noise": 2.0}}, "rewards.hps_label_noise: must be in [0, 0.5]"),
    ({"evaluate": {"models": {"dmdr-4": {"checkpoint": "models/distill/dmdr-5"}}}},
     "evaluate.models.dmdr-4.checkpoint: 'models/distill/dmdr-5' names no recipe"),
    ({"presets": {"sd3-medium": {"resolution": 0}}}, "presets.sd3-medium.resolution: must be in [16, 4096]"),
    ({"presets": {"sd3-medium": {"stage2": {"rl": {"reward": "clip+hps2"}}}}},
     "presets.sd3-medium.stage2.rl.reward: unknown reward 'hps2'"),
    ({"presets": {"x": {"resolution": 512}}}, "presets.x.teacher: required"),
    ({"presets": {"sd3-medium": {"reward_models": {"hps": {"checkpont": "a.pt"}}}}},
     "presets.sd3-medium.reward_models.hps.checkpont: unknown key"),
    ({"presets": {"x": {"teacher": "t", "stage2": {"rl": {"weight": 0.5, "reward": "pick"}}}}},
     "presets.x.stage2.rl.reward: 'pick' has no entry in presets.x.reward_models"),
    ({"real": {"preset": 3}}, "real.preset: expected str"),
    # new: non-finite numbers
    ({"distill": {"generator_lr": float("nan")}}, "distill.generator_lr: must be a finite number, got nan"),
    ({"distill": {"fake_lr": float("inf")}}, "distill.fake_lr: must be a finite number, got inf"),
    ({"world": {"teacher": {"lr": float("nan")}}}, "world.teacher.lr: must be a finite number"),
    ({"distill": {"dynadg": {"scale": float("nan")}}}, "distill.dynadg.scale: must be a finite number"),
    ({"distill": {"rl": {"margin": float("-inf")}}}, "distill.rl.margin: must be a finite number"),
    ({"distill": {"rtdm": {"beta": float("inf")}}}, "distill.rtdm.beta: must be a finite number"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "nan*hps"}}}}, "recipes.dmdr-4.rl.reward: bad weight 'nan'"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "inf*clip+hps"}}}}, "recipes.dmdr-4.rl.reward: bad weight 'inf'"),
    ({"recipes": {"dmdr-4": {"rl": {"reward": "-1*hps"}}}}, "recipes.dmdr-4.rl.reward: bad weight '-1'"),
    # new: ranges of knobs that had none
    ({"distill": {"real_cfg": -1.0}}, "distill.real_cfg: must be in [0, 50]"),
    ({"distill": {"real_cfg": 1000.0}}, "distill.real_cfg: must be in [0, 50]"),
    ({"distill": {"cfg_jitter": -0.5}}, "distill.cfg_jitter: must be in [0, 50]"),
    ({"distill": {"shift": 0.0}}, "distill.shift: must be positive and at most 100"),
    ({"distill": {"shift": -3.0}}, "distill.shift: must be positive"),
    ({"distill": {"batch": 100000000}}, "distill.batch: must be in [1, 4096]"),
    ({"recipes": {"dmd2-4": {"generator_steps": 1000}}}, "recipes.dmd2-4.generator_steps: must be in [1, 100]"),
    ({"presets": {"sd3-medium": {"resolution": 100000}}}, "presets.sd3-medium.resolution: must be in [16, 4096]"),
    ({"presets": {"sd3-medium": {"resolution": 500}}}, "presets.sd3-medium.resolution: must be in [16, 4096] and a "
                                                      "multiple of 16"),
    ({"presets": {"sd3-medium": {"max_sequence_length": 1000}}}, "presets.sd3-medium.max_sequence_length: must be in"),
    ({"seed": -1}, "seed: must be in [0, 2147483647]"),
    ({"seed": 2 ** 40}, "seed: must be in [0, 2147483647]"),
    ({"evaluate": {"images_per_prompt": 0}}, "evaluate.images_per_prompt: must be in [1, 64]"),
    ({"evaluate": {"batch": 100000}}, "evaluate.batch: must be in [1, 4096]"),
    ({"rewards": {"prompts": 1}}, "rewards.prompts: must be in [2, 1000000]"),
    ({"real": {"sample_prompts": 1000}}, "real.sample_prompts: must be in [0, 64]"),
    ({"distill": {"generator_weight_decay": 2.0}}, "distill.generator_weight_decay: must be in [0, 1]"),
    ({"world": {"teacher": {"ema_decay": 1.5}}}, "world.teacher.ema_decay: must be in [0, 1]"),
    ({"distill": {"checkpoint_every": -1}}, "distill.checkpoint_every: must be in [0, 10000000]"),
    ({"distill": {"reward_chunk": -1}}, "distill.reward_chunk: must be in [0, 4096]"),
    ({"distill": {"dynars": {"a": 0.0}}}, "distill.dynars.a: must be positive"),
    ({"distill": {"ttur": 0}}, "distill.ttur: must be in [1, 100]"),
    ({"world": {"teacher": {"channels": [64, 60]}}}, "world.teacher.channels[1]: must be in [16, 4096] and a multiple"),
    ({"world": {"teacher": {"channels": ["a"]}}}, "world.teacher.channels[0]: expected int"),
    ({"world": {"clip": {"patch_size": 0}}}, "world.clip.patch_size: must be in [1, 32]"),
    # new: relations between two keys, named with both
    ({"distill": {"t_min": 0.9, "t_max": 0.5}}, "distill.t_min, distill.t_max: t_min must be below t_max"),
    ({"recipes": {"dmd2-4": {"t_min": 0.5, "t_max": 0.5}}},
     "recipes.dmd2-4.t_min, recipes.dmd2-4.t_max: t_min must be below t_max"),
    ({"distill": {"real_cfg": 1.0, "cfg_jitter": 2.0}}, "distill.cfg_jitter, distill.real_cfg: cfg_jitter must be at "
                                                       "most real_cfg"),
    ({"distill": {"batch": 16, "micro_batches": 3}}, "distill.micro_batches, distill.batch: micro_batches must divide"),
    ({"distill": {"rtdm": {"normalise": "prompt"}}},
     "distill.rtdm.normalise, distill.samples_per_prompt: per-prompt RT-DM weights need several samples"),
    ({"distill": {"rl": {"weight": 0.5, "loss": "grpo"}}}, "distill.rl.loss, distill.samples_per_prompt: grpo compares"),
    ({"world": {"teacher": {"channels": []}}}, "world.teacher.channels: must list 1 to 4 blocks"),
    ({"world": {"teacher": {"channels": [64, 64], "head_dim": 24}}},
     "world.teacher.channels, world.teacher.head_dim: every channel count must be a multiple of head_dim"),
    ({"world": {"clip": {"width": 66, "heads": 4}}}, "world.clip.width, world.clip.heads: width must be a multiple"),
    ({"world": {"clip": {"patch_size": 5}}}, "world.clip.image_size, world.clip.patch_size: image_size must be"),
    # new: what a runner does not read is refused, not ignored
    ({"presets": {"sd3-medium": {"stage1": {"init": "models/distill/dmd2-4"}}}},
     "presets.sd3-medium.stage1.init: not read by python -m dmdr.real"),
    ({"presets": {"sd3-medium": {"stage2": {"seed": 3}}}}, "presets.sd3-medium.stage2.seed: not read by"),
    ({"presets": {"sdxl": {"stage1": {"real": "init"}}}}, "presets.sdxl.stage1.real: not read by"),
    # new: names are not paths
    ({"recipes": {"../../x": {"init": "models/world/teacher"}}}, "recipes: names must be letters, digits"),
    ({"evaluate": {"models": {"../x": {"checkpoint": "models/world/teacher", "steps": 4}}}},
     "evaluate.models: names must be letters"),
    ({"presets": {"a/b": {"teacher": "t"}}}, "presets: names must be letters"),
    ({"recipes": {".hidden": {"init": "models/world/teacher"}}}, "recipes: names must be letters"),
    ({"recipes": {"dmdr-4-lambda-0.1": {"init": "models/world/teacher"}}}, "a DVC stage's name"),
    ({"evaluate": {"models": {"m1.0": {"checkpoint": "models/world/teacher", "steps": 4}}}}, "a DVC stage's name"),
    # new: a YAML 1.1 boolean where a word is meant
    ({"distill": {"mixed_precision": False}}, "distill.mixed_precision: expected str, got bool False (a YAML 1.1 "
                                             "reader turns no/off/yes/on into booleans: quote the word"),
    ({"distill": {"dynadg": {"form": False}}}, "distill.dynadg.form: expected str, got bool"),
    ({"world": {"teacher": {"mixed_precision": "bf16-weights"}}}, "world.teacher.mixed_precision: must be one of"),
]


@pytest.mark.parametrize("change, key", BAD)
def test_bad_params_name_the_key(tmp_path, change, key):
    with pytest.raises(ParamsError, match=re.escape(key)):
        load(with_change(tmp_path, change))


def test_there_are_at_least_sixty_bad_parameters_tried():
    assert len(BAD) + len(BAD_SETS) >= 60


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


# `--set` assignments of `python -m dmdr.real` (as `dvc exp run -S` takes them): the error names the assignment
BAD_SETS = [
    (["distill.steps=0"], "distill.steps: must be in [1, 10000000], got 0 (from --set distill.steps=0)"),
    (["distill.generator_lr=.nan"], "distill.generator_lr: must be a finite number, got nan (from --set "
                                    "distill.generator_lr=nan)"),
    (["distill.rtdm.enabled=yes"], "distill.rtdm.enabled: expected true or false, got the string 'yes'"),
    (["presets.sd3-medium.stage1.init=models/distill/dmd2-4"],
     "presets.sd3-medium.stage1.init: not read by python -m dmdr.real"),
    (["presets.sd3-medium.stage1.t_min=0.99"], "presets.sd3-medium.stage1.t_min, presets.sd3-medium.stage1.t_max: "
                                               "t_min must be below t_max (here t_min = 0.99, t_max = 0.98) (from --set "
                                               "presets.sd3-medium.stage1.t_min=0.99)"),
    (["seed=no"], "seed: expected int, got str 'no' (from --set seed=no)"),
    (["recipes.dmd2-4.batch=[16]"], "recipes.dmd2-4.batch: expected int, got list"),
]


@pytest.mark.parametrize("sets, message", BAD_SETS)
def test_bad_command_line_changes_name_the_assignment(sets, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load(ROOT / "params.yaml", overrides(sets))


def test_params_are_read_as_dvc_writes_them(tmp_path):
    """DVC (`dvc exp run -S`) rewrites params.yaml as YAML 1.2: "no" and "off" lose their quotes, 1e-5 keeps no dot.
    Read as YAML 1.1 these were False and the string '1e-05'; here they are what was meant. A duplicate key, which a
    YAML 1.1 reader resolves silently to the last, is an error."""
    text = (ROOT / "params.yaml").read_text()
    assert 'mixed_precision: "no"' in text and 'form: "off"' in text
    dvc_style = text.replace('"no"', "no").replace('"off"', "off").replace("generator_lr: 1.0e-4", "generator_lr: 1e-05")
    (tmp_path / "params.yaml").write_text(dvc_style)
    p = load(tmp_path / "params.yaml")
    assert (p.distill.mixed_precision, p.distill.dynadg.form, p.distill.generator_lr) == ("no", "off", 1e-05)
    assert load(ROOT / "params.yaml", overrides(["distill.mixed_precision=no", "distill.generator_lr=1e-5"])) \
        .distill.generator_lr == 1e-5
    (tmp_path / "params.yaml").write_text(text + "\nseed: 3\n")
    line = len((text + "\n").splitlines()) + 1
    with pytest.raises(ParamsError, match=rf'params.yaml:{line}: not valid YAML \(found duplicate key "seed" with value'):
        load(tmp_path / "params.yaml")


def test_the_readme_lists_every_bad_input_the_tests_try():
    import bad_inputs
    text = (ROOT / "README.md").read_text()
    assert bad_inputs.readme_with_section(text) == text, "README out of date: run python tests/bad_inputs.py"
