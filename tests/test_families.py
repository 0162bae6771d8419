"""Real teachers through the real loading path: a tiny random StableDiffusion3Pipeline saved with save_pretrained is
loaded as a teacher, samples exactly as its own pipeline does, is distilled by the one training loop (stage 1 with
every tool, then stage 2 with RL through the VAE decoder), exported as a pipeline directory, and the exported
pipeline's few-step sampling is the generator's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dmdr import flow
from dmdr.config import DistillParams, build
from dmdr.distill import init_models, train
from dmdr.lora import plain
from dmdr.families import export, load_exported, load_teacher
from tiny import free_port, tiny_sd3_pipeline

TEXTS = ["a photo of a cat", "two red squares"]
STAGE1 = dict(steps=2, batch=2, ttur=1, log_every=1, generator_steps=4, shift=3.0, rtdm={"enabled": True},
              dynadg={"form": "paper", "rank": 4}, dynars={"enabled": True})


class Brightness(torch.nn.Module):
    """A differentiable stand-in reward on decoded images (the real ones are tested in test_real_rewards.py)."""

    def forward(self, images, texts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def test_sd3_teacher_samples_as_its_own_pipeline(sd3):
    teacher = load_teacher(sd3, resolution=16, max_sequence_length=8)
    assert teacher.family == "sd3" and teacher.latent_shape == (16, 8, 8)
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = flow.sample_teacher(teacher.model, noise, teacher.encode(TEXTS), teacher.uncond, steps=4, cfg=2.0,
                               shift=teacher.pipeline.scheduler.config.shift)
    theirs = teacher.pipeline(TEXTS, num_inference_steps=4, guidance_scale=2.0, latents=noise.clone(),
                              max_sequence_length=8, output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_dmdr_on_a_real_sd3_pipeline_then_export(sd3, tmp_path):
    teacher = load_teacher(sd3, resolution=16, max_sequence_length=8)
    models = init_models(teacher.model, teacher.encode, teacher.uncond, cfg=build(DistillParams, STAGE1),
                         decode=teacher.decode, reward=Brightness(), latent_shape=teacher.latent_shape)
    before = [p.detach().clone() for p in models.generator.parameters()]
    rows = train(build(DistillParams, STAGE1), models, TEXTS * 4, seed=0)
    assert rows[-1]["step"] == 2 and {"loss_dmd", "reward_rollout", "dynadg_scale"} <= set(rows[-1])
    assert any(not torch.equal(a, b) for a, b in zip(before, models.generator.parameters()))

    # stage 2 as released: a LoRA generator, the shared LoRA fake score, one rollout per step, hinge rewards
    # (decoded one sample at a time)
    stage2 = build(DistillParams, dict(STAGE1, rtdm={"enabled": False}, dynars={"enabled": False},
                                       generator_lora={"enabled": True, "rank": 4, "alpha": 8.0},
                                       dynadg={"form": "released", "rank": 4, "scale": 0.0}, rollout_reuse=True,
                                       reward_chunk=1, rl={"weight": 0.5, "loss": "hinge"}))
    start = models.generator
    models = init_models(teacher.model, teacher.encode, teacher.uncond, start=start, cfg=stage2,
                         decode=teacher.decode, reward=Brightness(), latent_shape=teacher.latent_shape)
    rows = train(stage2, models, TEXTS * 4, seed=0)
    assert {"loss_dmd", "reward_x0"} <= set(rows[-1])  # DMD and ReFL through the VAE decoder
    base = {n.replace("base_layer.", ""): p for n, p in models.generator.named_parameters() if "lora_" not in n}
    # only the adapter trained (the frozen base is held in bf16 under bf16 autocast)
    assert all(torch.equal(base[n], p.to(base[n].dtype)) for n, p in start.named_parameters())

    out = export(models.generator, teacher, tmp_path / "dmdr-4", steps=4, shift=3.0)
    pipe, sampler = load_exported(out)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and sampler["steps"] == 4
    assert sampler["times"] == flow.generator_times(4, 3.0).tolist() and sampler["recipe"] == "dmdr-4"
    # the export's call: the trained levels as sigmas (diffusers' own 4 steps are others), size and text length
    assert sampler["call"] == {"sigmas": torch.linspace(1.0, 0.001, 5)[:4].tolist(), "guidance_scale": 1.0,
                               "max_sequence_length": 8, "height": 16, "width": 16}
    pipe.scheduler.set_timesteps(4)
    assert not torch.allclose(pipe.scheduler.sigmas[:4], flow.generator_times(4, 3.0)[:4], atol=1e-3)
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = flow.sample_generator(plain(models.generator), noise, teacher.encode(TEXTS), flow.generator_times(4, 3.0))
    theirs = pipe(TEXTS, **sampler["call"], latents=noise.clone(), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4)
    images = pipe(TEXTS, **sampler["call"], output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)
    card = (out / "README.md").read_text()
    assert "image = pipe(\"a photo of a cat\", sigmas=[1.0, 0.75" in card and "max_sequence_length=8" in card
    assert out.stat().st_mode & 0o777 == 0o755 and all(f.stat().st_mode & 0o777 == 0o644 for f in out.rglob("*")
                                                       if f.is_file())  # readable by others (umask 022)


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_grpo_and_dpo_on_a_real_sd3_pipeline(sd3, objective):
    """Stage 2 with an objective that draws its own samples, on SD3 as released (a LoRA generator, bf16 autocast,
    the reward through the VAE; DPO's reference and GRPO's KL reference, the stage's start, a merged copy): groups of
    2 samples a prompt; only the adapter trains."""
    teacher = load_teacher(sd3, resolution=16, max_sequence_length=8)
    cfg = build(DistillParams, dict(STAGE1, rtdm={"enabled": False}, dynars={"enabled": False}, batch=4,
                                    samples_per_prompt=2, mixed_precision="bf16", dmd_weight=0.0,
                                    generator_lora={"enabled": True, "rank": 4, "alpha": 8.0},
                                    rl={"weight": 0.5, "loss": objective, "grpo": {"kl": 0.1}}))
    models = init_models(teacher.model, teacher.encode, teacher.uncond, cfg=cfg, decode=teacher.decode,
                         reward=Brightness(), latent_shape=teacher.latent_shape)
    start = [p.detach().clone() for n, p in models.generator.named_parameters() if "lora_" not in n]
    rows = train(cfg, models, TEXTS * 4, seed=0)
    assert np.isfinite(rows[-1]["reward_x0"]) and "nonfinite_skipped" not in rows[-1]
    base = [p for n, p in models.generator.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a.to(b.dtype), b) for a, b in zip(start, base))
    assert any(float(p.detach().abs().max()) > 0 for n, p in models.generator.named_parameters() if "lora_B" in n)


def test_the_readme_s_loading_snippet_runs_as_printed_on_an_export(sd3, tmp_path):
    """The README's snippet, character for character, in a fresh process, on a tiny SD3 export at its path."""
    import re
    import subprocess
    import sys
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Loading an exported model"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = re.search(r'path = "(.*?)"', snippet).group(1)
    teacher = load_teacher(sd3, resolution=16, max_sequence_length=8)
    export(teacher.model, teacher, tmp_path / path, steps=2, shift=3.0)
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image
    assert Image.open(tmp_path / "cat.png").size == (16, 16)
    assert "deprecated" not in r.stderr.lower(), r.stderr[-2000:]


def test_a_directory_that_is_not_a_pipeline_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline directory"):
        load_teacher(tmp_path, resolution=16)


def tiny_preset(sd3, tmp_path, batch: int = 2, shift: float = 3.0, precision: str | None = None) -> Path:
    """params.yaml with a preset 'tiny-sd3' on the tiny pipeline: stage 1 (DynaDG's released shared LoRA, DynaRS),
    stage 2 as released (hinge RL on an HPS-format reward, a LoRA generator, stage 1's shared LoRA continued);
    rewards in HPS's torch format and as safetensors."""
    import open_clip
    import yaml

    from tiny import register_tiny_open_clip
    arch = register_tiny_open_clip(tmp_path)
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, tmp_path / "hps.pt")
    save_file({k: v.contiguous() for k, v in open_clip.create_model(arch).state_dict().items()},
              tmp_path / "clip.safetensors")
    (tmp_path / "train.txt").write_text("a photo of a cat\ntwo red squares\na blue circle\n")
    (tmp_path / "eval.txt").write_text("a green triangle\nthree dogs\none cat\n")
    fast = dict(steps=2, batch=batch, ttur=1, log_every=1, generator_steps=4, shift=shift, checkpoint_every=1)
    fast |= {"mixed_precision": precision} if precision else {}  # else params.yaml's distill default
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["presets"] = {"tiny-sd3": {
        "teacher": str(sd3), "resolution": 16, "max_sequence_length": 8, "eval_steps": 2,
        "reward_models": {"hps": {"arch": arch, "checkpoint": str(tmp_path / "hps.pt"), "train_prompt_prefix": "A photo"},
                          "clip": {"arch": arch, "checkpoint": str(tmp_path / "clip.safetensors")}},
        "stage1": fast | {"dynadg": {"form": "released", "rank": 4, "steps": 2}, "dynars": {"enabled": True, "steps": 2}},
        "stage2": fast | {"rl": {"weight": 0.3, "loss": "hinge", "reward": "hps"}, "rollout_reuse": True,
                          "dynadg": {"form": "released", "rank": 4, "scale": 0.0},
                          "generator_lora": {"enabled": True, "rank": 4, "alpha": 8.0}}}}
    raw["real"] = {"preset": "tiny-sd3", "train_prompts": str(tmp_path / "train.txt"),
                   "eval_prompts": str(tmp_path / "eval.txt"), "out": str(tmp_path / "out")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_a_pipeline_is_identified_by_the_content_of_its_components(sd3, tmp_path):
    """The teacher's sha256: the same whether the pipeline is a plain directory or a hub-cache snapshot (links to
    blobs, a weight's blob named by its sha256, a git file's by 40 hex digits); a changed weight changes it, a file
    outside the pipeline's components does not."""
    import hashlib
    import shutil

    from dmdr.families import pipeline_sha256
    plain_dir, snapshot, blobs = tmp_path / "plain", tmp_path / "snapshots" / "0123", tmp_path / "blobs"
    shutil.copytree(sd3, plain_dir)
    blobs.mkdir()
    for f in sorted(p for p in sd3.rglob("*") if p.is_file()):
        data = f.read_bytes()
        name = (hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(data).hexdigest())
        (blobs / name).write_bytes(data)
        link = snapshot / f.relative_to(sd3)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blobs / name)
    digest = pipeline_sha256(plain_dir)
    assert pipeline_sha256(snapshot) == digest
    (plain_dir / "sd3_medium_single_file.safetensors").write_bytes(b"not a component")
    assert pipeline_sha256(plain_dir) == digest
    weights = plain_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[next(iter(state))][0] += 1e-3
    save_file(state, weights)
    assert pipeline_sha256(plain_dir) != digest


def test_the_real_runner_trains_both_stages_of_a_preset_exports_and_scores(sd3, tmp_path, monkeypatch):
    """`python -m dmdr.real` on a tiny preset, one key changed on the command line: both stages exported, no
    checkpoint left, the result and the teacher scored by every reward of the preset; a rerun finds both stages
    done, and one with other settings, or with other teacher weights at the same path, is refused, naming them."""
    import shutil

    from dmdr import config, distill, real
    from dmdr.families import DYNADG_LORA_FILE, pipeline_sha256
    from dmdr.sampler import TRAINING_FILE
    teacher = tmp_path / "teacher"
    shutil.copytree(sd3, teacher)
    params = tiny_preset(teacher, tmp_path)
    loaded = []
    load = distill.load_lora_state
    monkeypatch.setattr(distill, "load_lora_state", lambda *a: loaded.append(a) or load(*a))
    seen = []
    forward = real.PromptPrefix.forward
    monkeypatch.setattr(real.PromptPrefix, "forward", lambda self, images, texts: seen.append(self.prefix) or
                        forward(self, images, texts))
    real.main(["--params", str(params), "--set", "presets.tiny-sd3.reward_models.hps.train_prompt_prefix=A sketch"])
    out = tmp_path / "out" / "tiny-sd3"
    assert (out / "stage1" / "fake" / "config.json").exists() and (out / "dmdr" / "model_index.json").exists()
    assert seen and set(seen) == {"A sketch"}  # stage 2 trained on HPS of the prefixed prompts (the --set prefix)
    assert (out / "stage1" / DYNADG_LORA_FILE).exists() and len(loaded) == 1  # stage 2 continued stage 1's LoRA
    assert not any((out / "checkpoints").glob("*/loop.json"))  # finished stages leave no checkpoint behind
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["few_step"]) == {"hps", "clip", "nfe"} and m["few_step"]["nfe"] == 4 and m["teacher"]["nfe"] == 4
    assert (out / "curves.png").exists()
    samples = {s: sorted(p.name for p in (out / "samples" / s).glob("*.png")) for s in ("stage1", "dmdr")}
    assert samples["stage1"] == samples["dmdr"] == ["step_000000.png", "step_000001.png", "step_000002.png"]
    png = lambda s, step: np.asarray(Image.open(out / "samples" / s / f"step_{step:06d}.png"))
    assert png("stage1", 0).shape == (16 + 4, 3 * (16 + 2) + 2, 3)  # the 3 eval prompts side by side, 16 px
    assert not np.array_equal(png("stage1", 0), png("stage1", 2))  # the samples follow training
    assert np.array_equal(png("stage1", 2), png("dmdr", 0))  # stage 2 starts where stage 1 ended (a zero LoRA)
    records = {s: json.loads((out / s / TRAINING_FILE).read_text()) for s in ("stage1", "dmdr")}
    assert records["dmdr"]["settings"]["starts_from"] == records["stage1"]["fingerprint"]
    assert records["dmdr"]["settings"]["reward_models"]["hps"]["train_prompt_prefix"] == "A sketch"
    weights = out / "dmdr" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime
    prefix = "presets.tiny-sd3.reward_models.hps.train_prompt_prefix"
    real.run(config.load(params, config.overrides([f"{prefix}=A sketch"])))
    assert weights.stat().st_mtime == before  # both stages exported with these settings: nothing retrains
    saved = json.loads((out / "dmdr" / TRAINING_FILE).read_text())
    del saved["settings"]["stage"]["samples_per_prompt"]  # as an export made before dmdr had the setting
    (out / "dmdr" / TRAINING_FILE).write_text(json.dumps(saved))
    real.run(config.load(params, config.overrides([f"{prefix}=A sketch"])))
    assert weights.stat().st_mtime == before  # a setting added later, at its default: no change, reused
    with pytest.raises(config.ParamsError, match=r"dmdr was trained with other settings.*"
                       r"reward_models\.hps\.train_prompt_prefix: 'A sketch' then, 'A photo' now"):
        real.run(config.load(params))  # stage 2's reward differs: refused, not reused or overwritten
    assert weights.stat().st_mtime == before
    assert records["stage1"]["settings"]["teacher_sha256"] == pipeline_sha256(teacher)
    teacher_weights = teacher / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(teacher_weights)
    state[next(iter(state))][0] += 1e-3
    save_file(state, teacher_weights)  # another teacher at the same path
    with pytest.raises(config.ParamsError, match=r"stage1 was trained with other settings.*teacher_sha256: '"):
        real.run(config.load(params, config.overrides([f"{prefix}=A sketch"])))
    assert weights.stat().st_mtime == before


@pytest.mark.parametrize("family,launcher,units,precision", [
    ("sd3", "ddp", None, None), ("sd3", "deepspeed", None, None), ("sd3", "fsdp", "JointTransformerBlock", None),
    ("sd3", "fsdp", "JointTransformerBlock", "bf16-weights"),
    ("sdxl", "fsdp", "BasicTransformerBlock, CrossAttnUpBlock2D, ResnetBlock2D, UpBlock2D", None)])
def test_the_real_runner_under_two_processes_gives_the_one_process_numbers(request, tmp_path, family, launcher, units,
                                                                           precision):
    """The runner in 2 CPU processes (gloo) at the same global batch, launched by torchrun (DDP) or by accelerate
    with configs/accelerate/deepspeed.yaml (ZeRO-2, an engine a trained model) or configs/accelerate/fsdp.yaml (the
    trained backbones sharded by their blocks, gathered back for export):
    exports written once, the evaluation sharded over the processes, the numbers of the 1-process run. In
    bf16-weights (FSDP's mixed precision against one process's master copies) to bf16's precision."""
    import os
    import subprocess
    import sys

    from dmdr import real
    params = tiny_preset(request.getfixturevalue(family), tmp_path, batch=4, shift=3.0 if family == "sd3" else 1.0,
                         precision=precision)
    real.main(["--params", str(params), "--out", str(tmp_path / "one")])
    root = Path(__file__).resolve().parents[1]
    port = str(free_port())
    launch = (["accelerate.commands.launch", "--config_file", str(root / "configs" / "accelerate" / f"{launcher}.yaml"),
               "--num_processes", "2", "--main_process_port", port] if launcher != "ddp" else
              ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", port])
    cmd = [sys.executable, "-m", *launch, str(root / "tests" / "real_run.py"), str(tmp_path), "--params", str(params),
           "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(root / "src"), TQDM_DISABLE="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("FSDP2:" in r.stdout) == (launcher == "fsdp")
    assert ("DeepSpeed ZeRO-2: generator, real trained by an engine each" in r.stdout) == (launcher == "deepspeed")
    assert not units or f"FSDP2: generator, real sharded over 2 processes, by {units}\n" in r.stdout
    one, two = (json.loads((tmp_path / d / "tiny-sd3" / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    for model in ("teacher", "few_step"):
        for k in ("hps", "clip"):
            assert two[model][k] == pytest.approx(one[model][k], abs=1e-4 if precision is None else 1e-3), (model, k)



# --- SDXL: epsilon prediction on a VP schedule, seen as a flow -------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny import tiny_sdxl_pipeline
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def test_the_sdxl_teacher_predicts_what_its_scheduler_predicts(sdxl):
    """EpsilonAsFlow's clean-sample prediction at each of the pipeline's Euler sigmas is the scheduler's."""
    teacher = load_teacher(sdxl, resolution=16)
    assert teacher.family == "sdxl" and teacher.latent_shape == (4, 8, 8) and 0.93 < teacher.max_t < 0.94
    sched = teacher.pipeline.scheduler
    sched.set_timesteps(5)
    states, pooled = teacher.encode(TEXTS)
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2, dtype=torch.float32)
    for k, timestep in zip(sched.sigmas[:-1], sched.timesteps):
        x_e = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(int(timestep)))  # x0 + k eps
        with torch.no_grad():
            eps = teacher.pipeline.unet(x_e / (k ** 2 + 1) ** 0.5, timestep, encoder_hidden_states=states,
                                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            t = torch.full((2,), float(k / (1 + k)))
            v = teacher.model(x_e / (1 + k), t, states, pooled)
        theirs = x_e - k * eps
        ours = flow.x0_from_velocity(x_e / (1 + k), v, t)
        assert torch.allclose(ours, theirs, atol=1e-4 * max(1.0, float(k))), float(k)


@pytest.mark.parametrize("steps", [1, 4])
def test_dmdr_on_a_real_sdxl_pipeline_then_export(sdxl, tmp_path, steps):
    """Stage 1 (every tool) and stage 2 (RL through the VAE) on SDXL's UNet, then an exported SDXL pipeline whose
    few-step Euler sampling (its own scheduler, the generator's sigmas) is the generator's, from the same noise;
    one step starts at timestep 399, as the released SDXL model."""
    teacher = load_teacher(sdxl, resolution=16)
    times = teacher.generator_times(steps)
    assert (steps != 1 or abs(float(teacher.model.timestep(times[:1] / (1 - times[:1]))) - 399) < 1e-3)
    cfg1 = build(DistillParams, dict(STAGE1, shift=1.0, generator_steps=steps,
                                     dynadg={"form": "released", "rank": 4, "scale": 0.5}))
    models = init_models(teacher.model, teacher.encode, teacher.uncond, cfg=cfg1, decode=teacher.decode,
                         reward=Brightness(), latent_shape=teacher.latent_shape)
    models.times, models.max_t = times, teacher.max_t
    rows = train(cfg1, models, TEXTS * 4, seed=0)
    assert {"loss_dmd", "reward_rollout", "dynadg_scale"} <= set(rows[-1])
    cfg2 = build(DistillParams, dict(STAGE1, shift=1.0, generator_steps=steps, rtdm={"enabled": False},
                                     dynars={"enabled": False}, rl={"weight": 0.5, "loss": "hinge"}))
    models = init_models(teacher.model, teacher.encode, teacher.uncond, start=models.generator, cfg=cfg2,
                         decode=teacher.decode, reward=Brightness(), latent_shape=teacher.latent_shape)
    models.times, models.max_t = times, teacher.max_t
    rows = train(cfg2, models, TEXTS * 4, seed=0)
    assert {"loss_dmd", "reward_x0"} <= set(rows[-1])

    pipe, sampler = load_exported(export(models.generator, teacher, tmp_path / "dmdr", steps=steps))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and len(sampler["times"]) == steps + 1
    assert sampler["prediction"] == "epsilon"
    assert sampler["call"] == {"num_inference_steps": steps, "guidance_scale": 1.0, "height": 16, "width": 16}
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    t0 = float(times[0])
    with torch.no_grad():
        ours = flow.sample_generator(plain(models.generator), noise * (t0 ** 2 + (1 - t0) ** 2) ** 0.5,
                                     teacher.encode(TEXTS), times)
    # as users call it: the step count, no sigmas (the exported scheduler's own schedule is the trained one)
    theirs = pipe(TEXTS, num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(), height=16, width=16,
                  output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert list(pipe.scheduler.timesteps.round().long()) == ([399] if steps == 1 else [999, 749, 499, 249])


@pytest.mark.parametrize("precision", [None, "bf16-weights"])
def test_the_real_runner_on_an_sdxl_preset(sdxl, tmp_path, precision):
    """`python -m dmdr.real` with an SDXL teacher: both stages (stage 2 continuing stage 1's shared LoRA), exports
    that load as SDXL pipelines, the result and the teacher scored; in params.yaml's precision and with every model
    in bf16 (fp32 masters)."""
    from dmdr import real
    params = tiny_preset(sdxl, tmp_path, shift=1.0, precision=precision)
    real.main(["--params", str(params)])
    out = tmp_path / "out" / "tiny-sd3"
    assert (out / "dmdr" / "unet" / "config.json").exists() and (out / "stage1" / "fake" / "config.json").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["few_step"]) == {"hps", "clip", "nfe"} and m["few_step"]["nfe"] == 4
    generator, _ = real.stage(None, load_teacher(sdxl, 16), [], 0, out, "dmdr", None)  # done: loaded, SDXL-wrapped
    assert type(generator).__name__ == "EpsilonAsFlow"


@pytest.mark.parametrize("precision", [None, "bf16-weights"])
def test_the_real_runner_on_an_sd35_preset(tmp_path_factory, tmp_path, precision):
    """`python -m dmdr.real` with an SD3.5 teacher (RMS-normed queries and keys, a block with a second attention):
    both stages, exports that load as SD3.5 transformers and sample as the generator does, the result and the
    teacher scored; in params.yaml's precision and with every model in bf16 (fp32 masters)."""
    from diffusers import SD3Transformer2DModel

    from dmdr import real
    teacher = tiny_sd3_pipeline(tmp_path_factory.mktemp("sd35") / "pipe", sd35=True)
    real.main(["--params", str(tiny_preset(teacher, tmp_path, precision=precision))])
    out = tmp_path / "out" / "tiny-sd3"
    config = SD3Transformer2DModel.load_config(out / "dmdr" / "transformer")
    assert config["qk_norm"] == "rms_norm" and list(config["dual_attention_layers"]) == [0]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["few_step"]) == {"hps", "clip", "nfe"} and m["few_step"]["nfe"] == 4
    assert all(np.isfinite(v) for v in m["few_step"].values())
    exported = load_teacher(out / "dmdr", 16, 8)  # the export as a pipeline: its transformer is the generator
    pipe, sampler = load_exported(out / "dmdr")
    noise = torch.randn(2, *exported.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = flow.sample_generator(exported.model, noise, exported.encode(TEXTS), flow.generator_times(4, 3.0))
    theirs = pipe(TEXTS, **sampler["call"], latents=noise.clone(), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_real_runs_curves_are_drawn_a_panel_per_logged_quantity_a_line_per_stage(tmp_path):
    from dmdr.files import write_csv
    from dmdr.report import plot_training, plt
    with pytest.raises(FileNotFoundError, match="no training curves"):
        plot_training(tmp_path)
    write_csv([{"step": 0, "seconds": 1.0}, {"step": 10, "seconds": 9.0, "loss_dmd": 0.5, "loss_fake": 1.0}],
              tmp_path / "curves" / "stage1.csv")
    write_csv([{"step": 0, "seconds": 1.0}, {"step": 10, "seconds": 9.0, "loss_dmd": 0.4, "reward_x0": 0.3}],
              tmp_path / "curves" / "dmdr.csv")
    fig = plot_training(tmp_path)
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_title()}
    assert panels == {"loss_dmd": ["stage1", "dmdr"], "loss_fake": ["stage1"], "reward_x0": ["dmdr"]}
    assert (tmp_path / "curves.png").stat().st_size > 0
    plt.close(fig)


def test_trackers_are_named_installed_ones_and_take_a_stages_record(monkeypatch):
    """real.log_with: accelerate's names, each installed (accelerate would drop a missing one silently); a stage's
    training record goes to them flat, with scalar values (TensorBoard's hparams)."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    from dmdr import config, real
    assert real.trackers("") == []
    with pytest.raises(config.ParamsError, match=r"real\.log_with: 'tensorbord' is not a tracker of accelerate"):
        real.trackers("tensorbord")
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert real.trackers("tensorboard, ") == ["tensorboard"]
    with pytest.raises(config.ParamsError, match=r"real\.log_with: wandb is not installed .*pip install wandb"):
        real.trackers("tensorboard,wandb")
    pre, stage1, _ = config.preset(config.load(Path(__file__).parents[1] / "params.yaml"), "sd3-medium")
    settings = real.tracker_settings(real.training_record(pre, stage1, "teacher-dir", "0" * 64, 0, ["a cat"]))
    assert settings["stage.optimizer"] == "adamw8bit" and settings["teacher"] == "teacher-dir"
    assert all(isinstance(v, (bool, int, float, str)) for v in settings.values()) and "fingerprint" in settings


def test_a_training_prompt_prefix_reaches_the_reward():
    from dmdr.real import PromptPrefix

    class Recorder(torch.nn.Module):
        def forward(self, images, texts):
            self.texts = texts
            return images.mean(dim=(1, 2, 3))
    inner = Recorder()
    PromptPrefix(inner, "Realistic photo")(torch.zeros(2, 3, 4, 4), ["a cat", "two dogs"])
    assert inner.texts == ["Realistic photo a cat", "Realistic photo two dogs"]
