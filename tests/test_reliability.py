"""Reliability of training: resume from a checkpoint ends exactly where an uninterrupted run ends; non-finite losses
are skipped, counted and, repeated, stop the run; a poisoned model never overwrites a good checkpoint; nothing in
the library unpickles or runs remote code."""
import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from dmdr import flow, resume, standins
from dmdr.config import TeacherParams
from dmdr.distill import train
from dmdr.models import build_vae
from dmdr.world import grammar
from tiny import tiny_models

PROMPTS = ["a photo of a circle", "a photo of two squares", "a photo of a red triangle"]
STAGE1_AND_RL = {"steps": 5, "checkpoint_every": 2, "rtdm": {"enabled": True}, "dynadg": {"form": "paper"},
                 "dynars": {"enabled": True}, "rl": {"weight": 0.5}}


def probe(generator, step):
    return {"weights": float(sum(p.detach().double().sum() for p in generator.parameters()))}


class Crash(Exception):
    pass


def crash_at(at: int, clip, settings: dict, checkpoint_dir: Path) -> None:
    """A run of `settings` that crashes when it logs step `at`, leaving its checkpoints in `checkpoint_dir`."""
    def crash(generator, step):
        if step == at:
            raise Crash
        return probe(generator, step)
    cfg, _, models = tiny_models(clip, "unet", settings)
    with pytest.raises(Crash):
        train(cfg, models, PROMPTS, seed=0, curve_fn=crash, checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize("precision", ["no", "bf16-weights"])  # bf16-weights: the fp32 masters are checkpointed
def test_resume_ends_exactly_where_an_uninterrupted_run_ends(clip, tmp_path, precision):
    settings = STAGE1_AND_RL | {"mixed_precision": precision}
    cfg, _, models = tiny_models(clip, "unet", settings)
    rows = train(cfg, models, PROMPTS, seed=0, curve_fn=probe, checkpoint_dir=tmp_path / "whole")
    crash_at(3, clip, settings, tmp_path / "cut")
    assert (tmp_path / "cut" / "loop.json").exists() and (tmp_path / "cut" / "model.safetensors").exists()
    cfg, _, again = tiny_models(clip, "unet", settings)  # a new process: fresh models, then resume
    resumed = train(cfg, again, PROMPTS, seed=0, curve_fn=probe, checkpoint_dir=tmp_path / "cut")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed) == strip(rows)
    for a, b in [(models.generator, again.generator), (models.fake, again.fake), (models.real, again.real)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def crash_on_call(monkeypatch, owner, name: str, n: int):
    """Make `owner.name` raise Crash on its n-th call (a kill in the middle of a loop)."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Crash
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


def world_part(kind: str, clip, checkpoint_dir: Path):
    """One stand-in of the world stage, trained for 5 steps with checkpoints every 2: the VAE (numpy generator and
    torch's global one) or the flow teacher (its own torch generator, EMA, accuracy logged on the way)."""
    if kind == "vae":
        vae, info = standins.train_vae(0, 5, 2, 1e-3, mixed_precision="no", check_renders=2,
                                       checkpoint_dir=checkpoint_dir, checkpoint_every=2)
        return vae, info["history"]
    cfg = TeacherParams(channels=[16, 16], head_dim=8, steps=5, batch=2, warmup=2, pool_size=8, eval_every=4,
                        eval_steps=1, mixed_precision="no")
    specs = [grammar.sample_spec(__import__("numpy").random.default_rng(0), "single_object")]
    torch.manual_seed(0)
    model, info = standins.train_teacher(cfg, clip.requires_grad_(False), build_vae((16, 16, 16)).eval(), 0, specs,
                                         checkpoint_dir=checkpoint_dir, checkpoint_every=2)
    return model, info["history"]


@pytest.mark.parametrize("kind,owner,name,n", [("vae", standins, "world_batch", 4),
                                               ("teacher", flow, "flow_matching_loss", 4)])
def test_a_world_stand_in_resumes_exactly_and_a_finished_one_is_not_retrained(kind, owner, name, n, clip, tmp_path,
                                                                               monkeypatch):
    whole, rows = world_part(kind, clip, tmp_path / "whole")
    with monkeypatch.context() as m:
        crash_on_call(m, owner, name, n)
        with pytest.raises(Crash):
            world_part(kind, clip, tmp_path / "cut")
    assert (tmp_path / "cut" / "loop.json").exists()
    resumed, resumed_rows = world_part(kind, clip, tmp_path / "cut")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed_rows) == strip(rows) and len(rows) > 1
    assert all(torch.equal(x, y) for x, y in zip(whole.state_dict().values(), resumed.state_dict().values()))
    crash_on_call(monkeypatch, Accelerator, "backward", 1)  # the finished checkpoint is loaded, nothing trains
    again, _ = world_part(kind, clip, tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(whole.state_dict().values(), again.state_dict().values()))


def test_a_checkpoint_of_other_settings_is_not_resumed(clip, tmp_path, capsys):
    cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "checkpoint_every": 1})
    train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path)
    cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "checkpoint_every": 1, "generator_lr": 0.5})
    rows = train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]  # started over
    capsys.readouterr()
    train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path, run_identity="another teacher")
    assert "ignoring checkpoint" in capsys.readouterr().out  # the same settings, another run (the real runner's)
    train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path, run_identity="another teacher")
    assert "resumed from" in capsys.readouterr().out


def test_the_files_a_run_reads_are_in_its_identity(tmp_path):
    from dmdr.resume import files_fingerprint
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "weights").write_bytes(b"teacher")
    (tmp_path / "reward").write_bytes(b"reward")
    first = files_fingerprint(tmp_path / "teacher", tmp_path / "reward", tmp_path / "none")
    assert files_fingerprint(tmp_path / "teacher", tmp_path / "reward", tmp_path / "none") == first
    (tmp_path / "teacher" / "weights").write_bytes(b"retrained")
    assert files_fingerprint(tmp_path / "teacher", tmp_path / "reward", tmp_path / "none") != first


class NanReward(torch.nn.Module):
    """A reward that is NaN on the calls listed in `bad` (or always)."""

    def __init__(self, bad=None):
        super().__init__()
        self.calls, self.bad = 0, bad

    def forward(self, images, texts):
        self.calls += 1
        r = images.mean(dim=(1, 2, 3))
        return r * float("nan") if self.bad is None or self.calls in self.bad else r


def fused_adamw(monkeypatch):
    """The loop's optimizers as fused AdamW (CPUs have one too), as on GPUs: a non-finite loss's update is then
    skipped on the device (found_inf) and the loss read at the next logged row."""
    from dmdr import loop
    monkeypatch.setattr(loop, "optimizer", lambda params, lr, kind, weight_decay=0.0: torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=True))


@pytest.mark.parametrize("fused", [False, True])
def test_a_nonfinite_loss_skips_its_step_and_is_counted(clip, fused, monkeypatch, capsys):
    if fused:
        fused_adamw(monkeypatch)
    cfg, _, models = tiny_models(clip, "unet", {"steps": 3, "rl": {"weight": 1.0}}, reward=NanReward(bad={1}))
    start = [p.detach().clone() for p in models.generator.parameters()]
    rows = train(cfg, models, PROMPTS, seed=0)
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 1, 1, 1]
    assert "step 0: non-finite generator loss (nan), update skipped (1 so far)" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in models.generator.parameters())
    assert any(not torch.equal(p, s) for p, s in zip(models.generator.parameters(), start))  # the good steps were taken


@pytest.mark.parametrize("fused", [False, True])
def test_repeated_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(clip, tmp_path, fused, monkeypatch):
    if fused:
        fused_adamw(monkeypatch)
    cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "checkpoint_every": 1})
    train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path)
    before = (tmp_path / "loop.json").read_text()
    cfg, _, models = tiny_models(clip, "unet", {"steps": 10, "max_nonfinite": 3, "rl": {"weight": 1.0}},
                                 reward=NanReward())
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        train(cfg, models, PROMPTS, seed=0, checkpoint_dir=tmp_path)
    assert (tmp_path / "loop.json").read_text() == before


def test_poisoned_weights_are_never_checkpointed(tmp_path):
    acc = Accelerator(cpu=True)
    good, bad = acc.prepare(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    rng, prng = torch.Generator().manual_seed(0), __import__("numpy").random.default_rng(0)
    ckpt = resume.Checkpoint(tmp_path / "ckpt", 1, "x", rng, prng)
    assert resume.save(acc, ckpt, {"step": 1}, [good])
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    assert not resume.save(acc, ckpt, {"step": 2}, [good, bad])
    assert '"step": 1' in (tmp_path / "ckpt" / "loop.json").read_text()


def test_the_library_never_unpickles_or_runs_remote_code():
    src = Path(__file__).resolve().parents[1] / "src" / "dmdr"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"\bpickle\b|trust_remote_code\s*=\s*True", text), f
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
        assert "use_safetensors=False" not in text and "safe_serialization=False" not in text, f


def test_a_missing_checkpoint_names_the_directory(tmp_path):
    from dmdr.standins import World
    from dmdr.models import load_backbone
    with pytest.raises(FileNotFoundError, match=r"world checkpoint directory .*nowhere does not exist \(run the stage"):
        World.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="backbone checkpoint directory"):
        load_backbone(tmp_path / "gone")


def test_a_generator_of_the_wrong_latent_size_is_refused_before_sampling(tmp_path):
    from dmdr.models import build_backbone, load_backbone, save_diffusers
    save_diffusers(build_backbone("unet", 16, 16, 4, channels=(16, 16), head_dim=8, latent_size=16), tmp_path / "g")
    with pytest.raises(ValueError, match=r"g/config.json: in_channels 4 and sample_size 16 .* expects \(4, 8, 8\)"):
        load_backbone(tmp_path / "g", (4, 8, 8))
    assert load_backbone(tmp_path / "g", (4, 16, 16)).config.sample_size == 16


@pytest.mark.parametrize("kind, name", [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_a_partitioned_checkpoint_is_not_resumed_by_another_number_of_processes(tmp_path, kind, name):
    """Each process's shards (FSDP) or partitions (DeepSpeed) fit only the process count that wrote them: a clear
    error naming the checkpoint, before anything is read into the models."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dmdr import resume
    for rank in (0, 1):
        (tmp_path / f"processes.rank_{rank}.json").write_text(json.dumps({"processes": 2}))
    acc = SimpleNamespace(distributed_type=DistributedType[kind], process_index=0, num_processes=1)
    with pytest.raises(ValueError, match=rf"{tmp_path}: a checkpoint of 2 {name} processes cannot be resumed by 1"):
        resume.load_state(acc, tmp_path)


@pytest.mark.parametrize("cut", ["model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl",
                                 "loop.json", "generators.safetensors"])
def test_a_truncated_checkpoint_is_set_aside_and_the_run_starts_over(clip, tmp_path, capsys, cut):
    """A checkpoint file cut short (a full disk, a partial copy): the run names the checkpoint and the file, sets it
    aside as <checkpoint>.broken and starts over, ending where an uninterrupted run ends, instead of failing with a
    bare SafetensorError inside accelerate."""
    settings = {"steps": 3, "checkpoint_every": 1}
    cfg, _, models = tiny_models(clip, "unet", settings)
    rows = train(cfg, models, PROMPTS, seed=0, curve_fn=probe)
    crash_at(2, clip, settings, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / cut
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    cfg, _, again = tiny_models(clip, "unet", settings)
    resumed = train(cfg, again, PROMPTS, seed=0, curve_fn=probe, checkpoint_dir=tmp_path / "ckpt")
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'ckpt'} is broken ({cut}" in out and "the run starts over" in out
    assert (tmp_path / "ckpt.broken" / cut).exists()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed) == strip(rows)


def test_a_checkpoint_of_other_training_prompts_is_not_resumed(clip, tmp_path, capsys):
    """The checkpoint's identity covers the whole prompt set: the same count and first eight prompts are not the
    same prompts."""
    prompts = [f"a photo of {n} circles" for n in ("one", "two", "three", "four")] * 2 + ["a photo of a square"]
    cfg, _, models = tiny_models(clip, "unet", {"steps": 2, "checkpoint_every": 1})
    train(cfg, models, prompts, seed=0, checkpoint_dir=tmp_path)
    capsys.readouterr()
    train(cfg, models, prompts[:8] + ["a photo of a triangle"], seed=0, checkpoint_dir=tmp_path)
    assert "ignoring checkpoint" in capsys.readouterr().out
    train(cfg, models, prompts[:8] + ["a photo of a triangle"], seed=0, checkpoint_dir=tmp_path)
    assert "resumed from" in capsys.readouterr().out


def test_saved_models_are_readable_by_others(tmp_path):
    """A saved model directory gets the permissions of any directory the user makes (0755 under umask 022), not
    mkdtemp's 0700."""
    import os

    from dmdr.models import build_backbone, save_diffusers
    old = os.umask(0o022)
    try:
        save_diffusers(build_backbone("unet", 16, 16, 4, channels=(16, 16), head_dim=8), tmp_path / "g")
    finally:
        os.umask(old)
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "g").iterdir())
