"""The one DMD training loop runs on both diffusers backbone classes and updates the generator and the fake score."""
import dataclasses

import numpy as np
import pytest
import torch

from dmdr import flow
from dmdr.config import DistillParams
from dmdr.distill import init_models, rollout, train
from dmdr.models import VelocityModel, build_backbone
from dmdr.rewards import CosineReward
from tiny import free_port, tiny_clip, tiny_models


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_dmd_training_step_updates_both_networks(clip, kind):
    torch.manual_seed(0)
    kw = dict(channels=(16, 16), head_dim=8) if kind == "unet" else dict(layers=1, heads=2, head_dim=8)
    teacher = VelocityModel(build_backbone(kind, 16, 16, **kw)).eval()
    encode = lambda texts: tuple(x.detach() for x in clip.encode(texts))
    models = init_models(teacher, encode, encode([""]))
    before_g = [p.clone() for p in models.generator.parameters()]
    before_f = [p.clone() for p in models.fake.parameters()]
    before_t = [p.clone() for p in teacher.parameters()]
    cfg = DistillParams(steps=2, batch=4, ttur=2, log_every=1, mixed_precision="no", generator_steps=2)
    rows = train(cfg, models, ["a photo of a circle", "a photo of two squares"], seed=0,
                 curve_fn=lambda g, step: {"probe": float(step)})
    assert [r["step"] for r in rows] == [0, 1, 2] and "loss_dmd" in rows[1]
    assert any(not torch.equal(a, b) for a, b in zip(before_g, models.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_f, models.fake.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))  # the real score stays frozen


def test_trains_without_deepspeed_installed(clip, monkeypatch):
    """DeepSpeed is an optional extra: a run that does not use it trains to the end where it cannot be imported (a
    lent H200 found the loop importing it after every run)."""
    import sys
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ModuleNotFoundError
    cfg, _, models = tiny_models(clip, "sd3")
    rows = train(cfg, models, ["a photo of a circle"], seed=0)
    assert rows[-1]["step"] == cfg.steps


def test_logged_rows_go_to_experiment_trackers(clip, tmp_path):
    """Tracking: accelerate's trackers get the run's settings once, every logged row at its step, then finish (here
    a recording GeneralTracker, the extension point accelerate's TensorBoard and W&B trackers share); image arrays
    among the held-out values go to the trackers' log_images, not into the rows."""
    from accelerate.tracking import GeneralTracker

    from dmdr.loop import Tracking

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.settings, self.logged, self.images, self.finished = None, [], [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.settings = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def log_images(self, values, step=None, **kwargs):
            self.images.append((step, values))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "rl": {"weight": 1.0}})
    grid = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    rows = train(cfg, models, ["a photo of a circle", "a blue square"], seed=0,
                 curve_fn=lambda g, step: {"probe": 0.5, "samples": grid + step},
                 tracking=Tracking([recorder], tmp_path, "tiny-stage", {"stage.rl.weight": 1.0}))
    assert recorder.settings == {"stage.rl.weight": 1.0} and recorder.finished
    assert [step for step, _ in recorder.logged] == [r["step"] for r in rows] == [0, 1, 2]
    assert recorder.logged[1][1]["loss_dmd"] == rows[1]["loss_dmd"] and recorder.logged[2][1]["probe"] == 0.5
    assert "step" not in recorder.logged[1][1]
    assert [(step, set(v), int(v["samples"][0, 0, 0, 0])) for step, v in recorder.images] == [
        (0, {"samples"}, 0), (1, {"samples"}, 1), (2, {"samples"}, 2)]
    assert not any("samples" in r for r in rows) and not any("samples" in v for _, v in recorder.logged)


def test_backward_simulation_gradient_reaches_one_call_only(clip):
    """The rollout to the generator's point is without gradient; the loop's one call there has it."""
    torch.manual_seed(0)
    g = VelocityModel(build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8))
    cond = tuple(x.detach() for x in clip.encode(["a photo of a circle"] * 2))
    x_t, t, final = rollout(g, torch.randn(2, 4, 8, 8), cond, flow.generator_times(4),
                            torch.Generator().manual_seed(1), need_final=True)
    x0 = flow.generator_step(g, x_t, t, cond)
    assert x0.shape == (2, 4, 8, 8) and x0.requires_grad and not x_t.requires_grad and not final.requires_grad


def test_generator_times_and_sampler():
    t = flow.generator_times(4)
    assert t[0] == 1.0 and abs(float(t[-1]) - 0.001) < 1e-6 and len(t) == 5
    assert torch.allclose(flow.generator_times(4, shift=3.0)[[0, -1]], torch.tensor([1.0, 3 * 0.001 / (1 + 2 * 0.001)]))
    # a model that predicts the exact velocity of a fixed x0 recovers it in any number of steps
    target = torch.randn(3, 4, 8, 8)
    oracle = lambda x, t, *c: (x - target) / t.view(-1, 1, 1, 1)  # v = (x_t - x0) / t
    for steps in (1, 2, 4):
        out = flow.sample_generator(oracle, torch.randn(3, 4, 8, 8), (None, None), flow.generator_times(steps))
        assert torch.allclose(out, target, atol=1e-5)


@pytest.mark.parametrize("kind,overrides", [
    ("unet", {"rtdm": {"enabled": True, "tilt_fake": True}, "dynadg": {"form": "paper", "steps": 1},
              "dynars": {"enabled": True}, "rl": {"weight": 1.0}}),
    ("sd3", {"rtdm": {"enabled": True, "form": "reward"}, "dynadg": {"form": "released", "scale": 0.5},
             "rl": {"weight": 0.5, "loss": "hinge"}}),
])
def test_dmdr_step_with_every_stage1_tool_and_rl(clip, kind, overrides):
    cfg, teacher, models = tiny_models(clip, kind, overrides)
    before_g = [p.clone() for p in models.generator.parameters()]
    rows = train(cfg, models, ["a photo of a circle", "a photo of two squares"], seed=0)
    assert {"loss_dmd", "reward_rollout", "reward_x0", "dynadg_scale"} <= set(rows[1])
    assert rows[-1]["dynadg_scale"] <= rows[1]["dynadg_scale"]
    assert any(not torch.equal(a, b) for a, b in zip(before_g, models.generator.parameters()))
    lora = [p for n, p in models.real.named_parameters() if "lora_" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in models.real.named_parameters() if "lora_B" in n)
    base = dict(teacher.named_parameters())
    assert all(torch.equal(p, base[n.replace(".base_layer", "")]) for n, p in models.real.named_parameters()
               if "lora_" not in n)  # only the LoRA of the real score learns


def test_rl_alone_on_the_guided_teacher_trajectory(clip):
    cfg, teacher, models = tiny_models(clip, "unet", {"dmd_weight": 0.0, "generator_cfg": 3.0, "generator_steps": 4,
                                                      "rollout": "trajectory", "rl": {"weight": 1.0}})
    assert models.fake is None and isinstance(models.generator, flow.Guided)
    before = [p.clone() for p in models.generator.parameters()]
    rows = train(cfg, models, ["a photo of a circle"], seed=0)
    assert "loss_dmd" not in rows[1] and "reward_x0" in rows[1]
    assert any(not torch.equal(a, b) for a, b in zip(before, models.generator.parameters()))


def torchrun(n: int, out, overrides: dict, checkpoint=None, config: str | None = None, check: bool = True,
             launch_args: tuple = ()) -> dict:
    """tests/ddp_train.py in n CPU processes (gloo), by torchrun or, with a `config` (fsdp, deepspeed), by
    `accelerate launch` with configs/accelerate/CONFIG.yaml (and `launch_args`); returns the generator's weights and
    the logged rows (without `check`, only the exit code and output)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    config_file = root / "configs" / "accelerate" / f"{config}.yaml"
    launcher = (["accelerate.commands.launch", "--config_file", str(config_file), "--num_processes", str(n),
                 "--main_process_port", str(port), *launch_args] if config else
                ["torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)])
    cmd = [sys.executable, "-m", *launcher, str(root / "tests" / "ddp_train.py"), str(out), json.dumps(overrides)] + (
        [str(checkpoint)] if checkpoint else [])
    env = dict(os.environ, PYTHONPATH=str(root / "src"), TQDM_DISABLE="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return {"returncode": r.returncode, "log": r.stdout + r.stderr}
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"weights": load_file(out), "rows": json.loads(out.with_suffix(".json").read_text()), "log": r.stdout}


@pytest.mark.parametrize("kind,overrides", [
    ("unet", {"rtdm": {"enabled": True, "tilt_fake": True}, "dynadg": {"form": "paper", "steps": 1},
              "dynars": {"enabled": True}, "rl": {"weight": 1.0}}),
    ("sd3", {"rtdm": {"enabled": True}, "dynadg": {"form": "released"}, "rollout_reuse": True, "ttur": 2,
             "rl": {"weight": 0.5, "loss": "hinge"}, "reward_chunk": 1}),
])
def test_micro_batches_compute_what_one_pass_computes(clip, kind, overrides):
    """Each step's batch of 4 in 2 micro-batches (one process): the same losses and weights as in one pass, and
    no call of the generator with gradient sees more than its micro-batch (in one pass, the released rollout reuse
    makes that call on the whole batch)."""
    prompts = ["a photo of a circle", "a photo of two squares", "a photo of a red triangle", "a blue square"]
    runs = {}
    for micro_batches in (1, 2):
        cfg, _, models = tiny_models(clip, kind, overrides | {"micro_batches": micro_batches})
        with_grad = []
        models.generator.register_forward_pre_hook(
            lambda _, args: with_grad.append(len(args[0])) if torch.is_grad_enabled() else None)
        runs[micro_batches] = train(cfg, models, prompts, seed=0), models.generator.state_dict(), with_grad
    (one, weights_one, calls_one), (two, weights_two, calls_two) = runs[1], runs[2]
    for a, b in zip(one[1:], two[1:]):
        for k in ("loss_fake", "loss_dmd", "reward_rollout", "reward_x0"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert all(torch.allclose(weights_one[k], weights_two[k], atol=5e-5) for k in weights_one)
    assert max(calls_one) == 4 and set(calls_two) == {2}
    with pytest.raises(ValueError, match=r"micro_batches, batch: micro_batches must divide batch"):
        tiny_models(clip, kind, overrides | {"micro_batches": 3})  # refused with the params
    cfg, _, models = tiny_models(clip, kind, overrides)
    with pytest.raises(ValueError, match=r"micro_batches 3 does not divide the local batch 4 \(batch 4 over 1"):
        train(dataclasses.replace(cfg, micro_batches=3), models, prompts, seed=0)  # and by the loop, per process


@pytest.mark.parametrize("precision,rel,atol,micro_batches", [("no", 1e-5, 5e-5, 2),
                                                                ("bf16-weights", 5e-2, 2e-3, 1)])
def test_two_processes_compute_what_one_computes_at_the_same_global_batch(tmp_path, precision, rel, atol,
                                                                          micro_batches):
    """DDP on CPU (gloo): stage 1 with every tool and RL, global batch 4 in 1 process or 2 x 2 (in fp32 each
    process's 2 in 2 micro-batches, its gradients synchronised after the second); the 2-process run also checkpoints
    every step and is then resumed from its checkpoint. In bf16-weights the models compute in bf16 and the gradients
    are averaged in bf16: equal to bf16's precision."""
    overrides = {"steps": 2, "batch": 4, "rtdm": {"enabled": True}, "dynadg": {"form": "paper"},
                 "dynars": {"enabled": True}, "rl": {"weight": 0.5}, "checkpoint_every": 1,
                 "mixed_precision": precision}
    one = torchrun(1, tmp_path / "one.safetensors", overrides)
    overrides |= {"micro_batches": micro_batches}
    two = torchrun(2, tmp_path / "two.safetensors", overrides, tmp_path / "ckpt")
    for a, b in zip(one["rows"][1:], two["rows"][1:]):  # batch-wide losses: right only if the shards tile the batch
        for k in ("loss_fake", "loss_dmd", "reward_rollout", "reward_x0"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), k
    assert all(torch.allclose(one["weights"][k], two["weights"][k], atol=atol) for k in one["weights"])
    assert {p.name for p in (tmp_path / "ckpt").glob("random_states_*")} == {"random_states_0.pkl",
                                                                           "random_states_1.pkl"}
    again = torchrun(2, tmp_path / "again.safetensors", overrides, tmp_path / "ckpt")
    assert "resumed from" in again["log"] and all(torch.equal(two["weights"][k], again["weights"][k])
                                                  for k in two["weights"])


# bf16: the losses after an update differ by bf16's rounding of it; loss_dmd, a small difference of two predictions,
# by more than 5% on CPUs whose bf16 matmuls take another path (AMX), hence 10%
@pytest.mark.parametrize("precision,rel,atol,micro_batches", [("no", 1e-5, 5e-5, 2),
                                                                ("bf16-weights", 1e-1, 2e-3, 1)])
def test_fsdp_computes_what_one_process_computes_and_resumes_from_its_own_shards(tmp_path, precision, rel, atol,
                                                                                 micro_batches):
    """FSDP2 through configs/accelerate/fsdp.yaml in 2 CPU processes (accelerate's launcher, plugin, prepare and
    sharding; tests/ddp_train.py switches accelerate's state to FSDP, which accelerate routes only on GPUs): stage 1
    with every tool and RL, DynaDG's paper form (three sharded models), in fp32 each process's part in 2
    micro-batches (gradients reduced after the second). The same losses and weights as one process (without FSDP,
    in one pass) in the same precision; checkpoints are each process's shards in safetensors; resuming from them
    ends bit-identical. In bf16-weights, FSDP's mixed precision computes in bf16 and the fp32 shards are the
    masters, against the one process's bf16 weights with master copies: equal to bf16's precision."""
    from safetensors.torch import load_file
    overrides = {"steps": 2, "batch": 4, "rtdm": {"enabled": True}, "dynadg": {"form": "paper"},
                 "dynars": {"enabled": True}, "rl": {"weight": 0.5}, "checkpoint_every": 1,
                 "mixed_precision": precision}
    one = torchrun(1, tmp_path / "one.safetensors", overrides)
    overrides |= {"micro_batches": micro_batches}
    two = torchrun(2, tmp_path / "two.safetensors", overrides, tmp_path / "ckpt", config="fsdp")
    computed_in = "torch.bfloat16" if precision == "bf16-weights" else "torch.float32"
    assert all(f"generator computed in {computed_in}\n" in run["log"] for run in (one, two))
    for a, b in zip(one["rows"][1:], two["rows"][1:]):
        for k in ("loss_fake", "loss_dmd", "reward_rollout", "reward_x0"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), k
    assert one["weights"].keys() == two["weights"].keys()  # gathered back into the plain generator
    assert all(torch.allclose(one["weights"][k], two["weights"][k], atol=atol) for k in one["weights"])
    assert all(v.dtype == torch.float32 for v in two["weights"].values())  # the masters, in either precision
    ckpt = tmp_path / "ckpt"
    shards = [load_file(ckpt / f"model_0.rank_{r}.safetensors") for r in (0, 1)]
    sharded = [k for k, v in one["weights"].items() if v.dim() and len(v) > 1]
    assert sharded and all(len(shards[0][k]) + len(shards[1][k]) == len(one["weights"][k]) for k in sharded)
    assert all(shards[0][k].dtype == torch.float32 for k in sharded)
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json", ".pkl"}  # .pkl: accelerate's RNG states
    again = torchrun(2, tmp_path / "again.safetensors", overrides, ckpt, config="fsdp")
    assert "resumed from" in again["log"] and all(torch.equal(two["weights"][k], again["weights"][k])
                                                  for k in two["weights"])


def test_8bit_adamw_under_fsdp_is_a_clear_error(tmp_path):
    """Refused before any model is prepared: bitsandbytes' 8-bit AdamW does not handle sharded parameters
    (bitsandbytes #1633)."""
    r = torchrun(1, tmp_path / "out.safetensors", {"steps": 1, "batch": 2, "optimizer": "adamw8bit"}, config="fsdp",
                 check=False)
    assert r["returncode"] != 0 and "optimizer adamw8bit under FSDP: bitsandbytes' 8-bit AdamW does not handle " \
        "sharded" in r["log"]


@pytest.mark.parametrize("zero_stage,precision,rel,atol,micro_batches", [("2", "no", 1e-5, 5e-5, 2),
                                                                           ("1", "bf16-weights", 5e-2, 2e-3, 1)])
def test_deepspeed_computes_what_one_process_computes_and_resumes_from_its_partitions(tmp_path, zero_stage, precision,
                                                                                      rel, atol, micro_batches):
    """DeepSpeed ZeRO through configs/accelerate/deepspeed.yaml in 2 CPU processes (accelerate's launcher, plugin
    and prepare, one engine a trained model; DeepSpeed's CPU accelerator on gloo; tests/ddp_train.py switches
    accelerate's state to DeepSpeed, which accelerate routes only on GPUs): stage 1 with every tool and RL,
    DynaDG's paper form (three engines); ZeRO-2 in fp32, each process's part in 2 micro-batches. The same losses and
    weights as one process without DeepSpeed; each process's checkpoint holds half of each model's fp32 weights and
    AdamW states, as safetensors; resuming from them ends bit-identical. In bf16-weights (DeepSpeed's bf16, its fp32
    masters in the partitions) against the one process's bf16 weights with master copies: equal to bf16's
    precision (ZeRO-1: gradients not partitioned), and the generator ends with the fp32 masters."""
    from safetensors.torch import load_file
    overrides = {"steps": 2, "batch": 4, "rtdm": {"enabled": True}, "dynadg": {"form": "paper"},
                 "dynars": {"enabled": True}, "rl": {"weight": 0.5}, "checkpoint_every": 1,
                 "mixed_precision": precision}
    one = torchrun(1, tmp_path / "one.safetensors", overrides)
    overrides |= {"micro_batches": micro_batches}
    stage = ("--zero_stage", zero_stage)
    two = torchrun(2, tmp_path / "two.safetensors", overrides, tmp_path / "ckpt", config="deepspeed", launch_args=stage)
    assert f"DeepSpeed ZeRO-{zero_stage}: generator, fake, real trained by an engine each" in two["log"]
    computed_in = "torch.bfloat16" if precision == "bf16-weights" else "torch.float32"
    assert all(f"generator computed in {computed_in}\n" in run["log"] for run in (one, two))
    for a, b in zip(one["rows"][1:], two["rows"][1:]):
        for k in ("loss_fake", "loss_dmd", "reward_rollout", "reward_x0"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), k
    assert all(torch.allclose(one["weights"][k], two["weights"][k], atol=atol) for k in one["weights"])
    assert all(v.dtype == torch.float32 for v in two["weights"].values())
    ckpt = tmp_path / "ckpt"
    trained = sum(v.numel() for v in two["weights"].values())  # the generator trains all its weights
    parts = [load_file(ckpt / f"optimizer_0.rank_{r}.safetensors") for r in (0, 1)]
    assert all(p["fp32.0"].dtype == torch.float32 and p["fp32.0"].shape == p["0.exp_avg"].shape for p in parts)
    assert 0 <= sum(p["fp32.0"].numel() for p in parts) - trained < 64  # two halves (and DeepSpeed's alignment)
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json", ".pkl"}  # .pkl: accelerate's RNG states
    again = torchrun(2, tmp_path / "again.safetensors", overrides, ckpt, config="deepspeed", launch_args=stage)
    assert "resumed from" in again["log"] and all(torch.equal(two["weights"][k], again["weights"][k])
                                                  for k in two["weights"])


@pytest.mark.parametrize("overrides,launch_args,message", [
    ({}, ("--zero_stage", "3"), "DeepSpeed zero_stage 3 is not supported: use 1 or 2"),
    ({"optimizer": "adamw8bit"}, (), "optimizer adamw8bit under DeepSpeed: ZeRO is untested with bitsandbytes'")])
def test_what_deepspeed_does_not_run_is_a_clear_error(tmp_path, overrides, launch_args, message):
    r = torchrun(1, tmp_path / "out.safetensors", {"steps": 1, "batch": 2} | overrides, config="deepspeed",
                 check=False, launch_args=launch_args)
    assert r["returncode"] != 0 and message in r["log"]


def test_compiled_blocks_under_two_processes_compute_what_one_eager_process_computes(tmp_path):
    """Regional compilation inside DDP (each process's blocks traced; DDP's gradient hooks on the traced backward)."""
    overrides = {"steps": 2, "batch": 4, "dynadg": {"form": "released"}, "rl": {"weight": 0.5},
                 "gradient_checkpointing": True}
    eager = torchrun(1, tmp_path / "eager.safetensors", overrides)
    compiled = torchrun(2, tmp_path / "compiled.safetensors", overrides | {"compile": "aot_eager"})
    for a, b in zip(eager["rows"][1:], compiled["rows"][1:]):
        for k in ("loss_fake", "loss_dmd", "reward_x0"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert all(torch.allclose(eager["weights"][k], compiled["weights"][k], atol=5e-5) for k in eager["weights"])


def test_gradient_checkpointing_changes_memory_not_results(clip):
    """The backbones and the reward's CLIP (RL differentiates through it) recompute their blocks in backward."""
    results = []
    for checkpointing in (False, True):
        reward = CosineReward(tiny_clip()).requires_grad_(False)  # its own: the setting stays on the model
        cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "rl": {"weight": 0.5},
                                                    "gradient_checkpointing": checkpointing}, reward=reward)
        train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
        assert models.generator.backbone.is_gradient_checkpointing == checkpointing
        assert reward.clip.clip.visual.transformer.grad_checkpointing == checkpointing
        results.append(models.generator.state_dict())
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


def test_a_chunked_reward_changes_memory_not_results(clip):
    """RL's reward decoded and scored 2 samples at a time, each chunk recomputed in backward: the same training
    up to float rounding (which Adam's normalised first steps magnify to a few 1e-6; a step is 1e-4 here)."""
    results = []
    for chunk in (0, 2):
        cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "rl": {"weight": 0.5, "loss": "hinge"},
                                                    "reward_chunk": chunk})
        rows = train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
        results.append((models.generator.state_dict(), rows[-1]["reward_x0"]))
    (a, ra), (b, rb) = results
    assert abs(ra - rb) < 1e-5
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(clip):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    cfg, _, models = tiny_models(clip, "unet", {"optimizer": "adamw8bit"})
    with pytest.raises(ImportError, match="adamw8bit needs bitsandbytes"):
        train(cfg, models, ["a photo of a circle"], seed=0)


def test_bf16_keeps_trained_weights_fp32_and_holds_frozen_ones_in_bf16(clip):
    cfg, _, models = tiny_models(clip, "sd3", {"mixed_precision": "bf16", "dynadg": {"form": "released", "rank": 4},
                                               "generator_lora": {"enabled": True, "rank": 4, "alpha": 8.0}})
    train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
    for model in (models.generator, models.real):
        dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}, dtypes


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_bf16_weights_compute_in_bf16_and_accumulate_small_steps_in_fp32_masters(clip, kind):
    """mixed_precision bf16-weights: the models run in bf16 without autocast and the optimizers step fp32 masters.
    At lr 1e-6 every step is far below bf16's spacing (about 1e-4 at these weights' size), so stepping the bf16
    weights themselves would leave them as they were; the masters move as fp32 training moves the weights, and the
    generator holds them, in fp32, after training."""
    overrides = {"steps": 3, "generator_lr": 1e-6, "fake_lr": 1e-6, "rtdm": {"enabled": True},
                 "dynadg": {"form": "released", "rank": 4}, "rl": {"weight": 0.5, "loss": "hinge"}}
    moved = {}
    for precision in ("no", "bf16-weights"):
        cfg, _, models = tiny_models(clip, kind, overrides | {"mixed_precision": precision})
        # held in bf16, the weights start from their bf16 roundings
        start = [p.detach().to(torch.bfloat16 if precision == "bf16-weights" else p.dtype).float().clone()
                 for p in models.generator.parameters()]
        seen = set()
        models.generator.register_forward_hook(lambda m, args, out: seen.add(
            (next(m.parameters()).dtype, out.dtype, torch.is_autocast_enabled("cpu"))))
        train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
        # the generator computes in its weights' dtype, and hands the loop fp32
        assert seen == {(torch.bfloat16 if precision == "bf16-weights" else torch.float32, torch.float32, False)}
        assert all(p.dtype == torch.float32 for p in models.generator.parameters())
        moved[precision] = torch.cat([(p.detach() - s).flatten() for p, s in zip(models.generator.parameters(), start)])
    fp32, masters = moved["no"], moved["bf16-weights"]
    assert (masters != 0).float().mean() > 0.9
    # bf16 compute changes the gradients a little (the UNet's group norms most): close, not equal, to fp32's steps
    assert torch.nn.functional.cosine_similarity(fp32, masters, dim=0) > 0.8
    assert abs(float(masters.abs().mean() / fp32.abs().mean()) - 1) < 0.25


def test_master_weights_take_the_exact_gradients_and_give_back_their_bf16_roundings():
    """MasterWeights converts gradients in groups of bounded size (fused copies): every master gets its parameter's
    bf16 gradient exactly, in fp32, and the parameter lets go of it; a parameter without a gradient leaves its
    master's alone; the model then takes the masters' bf16 roundings."""
    from dmdr.precision import MasterWeights
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=torch.bfloat16)) for shape in ((7, 5), (3,), (40,), (2, 2))]
    masters = MasterWeights(params)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[1].grad = None
    list(masters.take_grads(group_bytes=100))  # 35 + 40 + 4 elements: three groups
    for i, (p, m, g) in enumerate(zip(params, masters.masters, grads)):
        assert p.grad is None
        assert m.grad is None if i == 1 else (m.grad.dtype == torch.float32 and torch.equal(m.grad, g.float()))
    for m in masters.masters:
        m.data += 1e-3 * torch.randn_like(m)
    masters.give_weights()
    assert all(torch.equal(p, m.detach().to(torch.bfloat16)) for p, m in zip(params, masters.masters))


def test_master_weights_step_a_group_at_a_time_as_one_clipped_step():
    """MasterWeights.step converts, clips and steps the gradients a group at a time (fp32 gradients of one group held
    at once): the same step as converting them all, clipping with torch's clip_grad_norm_ and stepping once."""
    from dmdr.precision import MasterWeights
    after = []
    for grouped in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape, dtype=torch.bfloat16))
                  for shape in ((7, 5), (3,), (40,), (2, 2))]
        masters = MasterWeights(params)
        opt = torch.optim.AdamW(masters.masters, lr=0.1, weight_decay=0.1)
        for p in params:
            p.grad = 10 * torch.randn_like(p)  # a norm above 1: clipped
        params[1].grad = None
        if grouped:
            masters.step(opt, max_norm=1.0, group_bytes=100)  # three groups
        else:
            list(masters.take_grads())
            torch.nn.utils.clip_grad_norm_(masters.masters, 1.0)
            opt.step()
            masters.give_weights()
        assert all(p.grad is None for p in params)
        after.append([m.detach().clone() for m in masters.masters] + [p.detach().clone() for p in params])
    assert torch.equal(after[1][1], after[0][1]) and not torch.equal(after[1][0], params[0].float())
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(*after))


def test_reusing_the_fake_updates_rollout_draws_one_batch_per_step(clip):
    """rollout_reuse (released): the generator update takes the last fake update's prompts, noise and renoise point,
    so a step with TTUR 2 draws 2 batches instead of 3; RT-DM's reward is then taken on that rollout."""
    counts = []
    for reuse in (False, True):
        cfg, _, models = tiny_models(clip, "unet", {"ttur": 2, "rollout_reuse": reuse, "rtdm": {"enabled": True}})
        calls = []
        encode = models.encode
        models.encode = lambda texts: calls.append(len(texts)) or encode(texts)
        rows = train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
        assert "reward_rollout" in rows[-1]
        counts.append(len(calls))
    assert counts == [2 * 3, 2 * 2]


def test_reusing_the_rollout_calls_the_generator_once_at_its_point(clip):
    """With rollout_reuse the generator's call at the renoised point, which the fake update trains on and the
    generator update differentiates, is made once (with gradient), not once for each: no step calls the generator
    twice on the same input."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 4, "ttur": 1, "rollout_reuse": True})
    calls = []
    models.generator.register_forward_pre_hook(lambda m, args: calls.append((args[0].detach().clone(),
                                                                              torch.is_grad_enabled())))
    train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
    with_grad = [x for x, grad in calls if grad]
    assert len(with_grad) == cfg.steps  # one differentiated call per step, and it is the fake's sample too
    assert not any(torch.equal(x, y) for i, (x, _) in enumerate(calls) for y, _ in calls[i + 1:])


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_compiled_blocks_change_speed_not_results(clip, kind):
    """`compile` traces each repeated block (dynamo + AOTAutograd; `aot_eager` runs the traced graphs without
    generating code): the same training, parameter names unchanged, and DynaDG's changing LoRA scale does not
    recompile the blocks step after step (a run of 4 steps traces no more graphs than a run of 2)."""
    from torch._dynamo.utils import counters
    from dmdr.lora import plain
    torch._dynamo.reset()
    counters.clear()
    overrides = {"rtdm": {"enabled": True}, "dynadg": {"form": "released", "scale": 0.5, "steps": 4},
                 "rl": {"weight": 0.5, "loss": "hinge"}, "gradient_checkpointing": True, "reward_chunk": 2,
                 "mixed_precision": "bf16"}  # the decoder's chunks are recomputed through its compiled blocks
    results, graphs = [], []
    for compile, steps in (("off", 2), ("aot_eager", 2), ("aot_eager", 4)):
        reward = CosineReward(tiny_clip()).requires_grad_(False)  # its own: the shared CLIP stays uncompiled
        cfg, _, models = tiny_models(clip, kind, overrides | {"steps": steps, "compile": compile}, reward=reward)
        rows = train(cfg, models, ["a photo of a circle", "two red squares"], seed=0)
        results.append((plain(models.generator).state_dict(), rows[2]["loss_dmd"]))
        graphs.append(counters["stats"]["unique_graphs"])
    (eager, loss_eager), (compiled, loss_compiled), _ = results
    assert graphs[0] == 0 < graphs[1] == graphs[2]
    assert list(eager) == list(compiled) and abs(loss_eager - loss_compiled) < 1e-5
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


@pytest.mark.parametrize("fake_score", [False, True])
def test_dynars_sets_the_fake_scores_levels_only_in_the_released_form(clip, monkeypatch, fake_score):
    """train_sd3_refl_deepspeed.py draws the fake score's diffusion-loss levels from DynaRS's annealed Beta too
    (its ts_gui; Beta(4, 1.5) at step 0, mean 0.73): `dynars.fake_score`; otherwise they are uniform (mean 0.5).
    The DMD levels (where the real score is called) follow DynaRS's Beta either way."""
    levels, dmd_levels = [], []
    real_loss, real_guided = flow.flow_matching_loss, flow.guided_velocity
    monkeypatch.setattr(flow, "flow_matching_loss", lambda model, x0, cond, t, *rest: (
        levels.append(t.detach().clone()), real_loss(model, x0, cond, t, *rest))[1])
    monkeypatch.setattr(flow, "guided_velocity", lambda model, x, t, *rest: (
        dmd_levels.append(t.detach().clone()), real_guided(model, x, t, *rest))[1])
    prompts = ["a photo of a circle", "a photo of two squares"] * 32
    cfg, _, models = tiny_models(clip, "unet", {"steps": 1, "batch": 64, "dynars": {
        "enabled": True, "a": 4.0, "b": 1.5, "steps": 1000, "fake_score": fake_score}})
    train(cfg, models, prompts, seed=0)
    first = levels[0]
    assert len(first) == 64 and len(dmd_levels[0]) == 64
    assert (first.mean() > 0.65) if fake_score else (0.4 < first.mean() < 0.6)
    assert dmd_levels[0].mean() > 0.65


@pytest.mark.parametrize("kind, targets", [("sd3", {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                     "add_v_proj", "to_add_out"}),
                                            ("unet", {"to_q", "to_k", "to_v", "to_out.0"})])
def test_the_released_dynadg_lora_adapts_the_attention_projections_only(kind, targets):
    """As the released shared LoRA: every attention projection (SD3's context stream included), no feed-forward
    layer; the paper form also adapts the feed-forward layers."""
    from dmdr.lora import add_lora
    kw = dict(channels=(16, 16), head_dim=8) if kind == "unet" else dict(layers=2, heads=2, head_dim=8)  # the last
    # of SD3's blocks has no context output (to_add_out): two blocks have every projection
    adapted = {}
    for form in ("released", "paper"):
        model = VelocityModel(build_backbone(kind, 16, 16, **kw))
        add_lora(model, 4, form)
        adapted[form] = {n.split(".lora_A")[0].split(".", 2)[-1] for n, _ in model.backbone.named_parameters()
                         if "lora_A" in n}
    suffix = lambda names: {t for t in targets | {"ff.net.0.proj", "ff.net.2"} if any(n.endswith(t) for n in names)}
    assert suffix(adapted["released"]) == targets
    assert {"ff.net.0.proj", "ff.net.2"} <= suffix(adapted["paper"])


def test_a_shorter_run_is_the_first_steps_of_a_longer_one(clip):
    """The learning rates are constant and DynaDG and DynaRS anneal over their own steps, so a stage-1 run of N steps
    is, step for step, the first N of a longer run from the same seed (what C4's 50-step seed repeats of
    dmdr-stage1-1 rely on)."""
    states = []
    for steps in (2, 4):
        cfg, _, models = tiny_models(clip, "unet", {"steps": steps, "generator_steps": 1, "log_every": 1,
                                                    "rtdm": {"enabled": True}, "dynadg": {"form": "paper", "steps": 2},
                                                    "dynars": {"enabled": True, "steps": 2}})
        seen = {}
        train(cfg, models, ["a photo of a circle", "two red squares"], seed=0,
              curve_fn=lambda g, step: seen.setdefault(step, [p.detach().clone() for p in g.parameters()]) and {})
        states.append(seen)
    assert all(torch.equal(a, b) for a, b in zip(states[0][2], states[1][2]))
    assert not all(torch.equal(a, b) for a, b in zip(states[1][2], states[1][4]))  # the longer run went on
