"""DMDR on a real teacher: `python -m dmdr.real [--preset sd3-medium] [--teacher DIR] [--train-prompts FILE]`,
or on several GPUs `accelerate launch --config_file configs/accelerate/ddp.yaml -m dmdr.real ...` (DDP; fsdp.yaml
shards the trained models), the presets' batch then being the global batch.

The same loop and losses as the embedded pipeline (dmdr.distill.train), configured by a preset of params.yaml:
stage 1 (DMD with the preset's DynaDG / DynaRS / RT-DM), then stage 2 (DMD + RL on the paper's rewards), each
exported as a diffusers pipeline directory (`<out>/stage1`, `<out>/dmdr`) with its few-step sampler settings, each
resumable from its checkpoints. With eval prompts, the exported few-step model and the teacher are scored by every
reward model of the preset (`<out>/metrics.json`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from . import config, evaluator, flow
from .config import parse_spec
from .distill import distill_stage, what_trains
from .distill import training_record as stage_record
from .families import (DYNADG_LORA_FILE, Teacher, load_exported, load_teacher,
                       pipeline_directory, pipeline_sha256)
from .files import write_json
from .loop import Tracking
from .models import VelocityModel, load_backbone
from .prompts import load_prompts
from .real_rewards import load_real_reward
from .report import plot_training, plt
from .reward_terms import Combined
from .sampler import TRAINING_FILE


def process_state() -> PartialState:
    """This process's place among the launched ones (on CPU, gloo processes: as the training loop's Accelerator)."""
    return PartialState(cpu=not torch.cuda.is_available())


def resolve(location: str) -> str:
    """'hf:<owner>/<repo>/<file>' -> the file fetched from the hub (cached); anything else as given."""
    if not location.startswith("hf:"):
        return location
    from huggingface_hub import hf_hub_download
    owner, repo, filename = location[3:].split("/", 2)
    return hf_hub_download(f"{owner}/{repo}", filename)


class PromptPrefix(torch.nn.Module):
    """A reward that sees every prompt with `prefix` before it (the released stage 2 scores HPS on
    "Realistic photo <prompt>")."""

    def __init__(self, reward: torch.nn.Module, prefix: str):
        super().__init__()
        self.reward, self.prefix = reward, prefix

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.reward(images, [f"{self.prefix} {t}" for t in texts])


def reward_model(name: str, where: dict, training: bool = False) -> torch.nn.Module:
    """A real reward model; for `training`, with its `train_prompt_prefix` if any (evaluation scores without)."""
    w = config.build(config.RewardModelParams, where, f"reward_models.{name}")
    model = load_real_reward(name, resolve(w.checkpoint), arch=w.arch or None, processor=w.processor or None,
                             clip_checkpoint=resolve(w.clip_checkpoint) if w.clip_checkpoint else None)
    return PromptPrefix(model, w.train_prompt_prefix) if training and w.train_prompt_prefix else model


def load_rewards(spec: str, reward_models: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The training reward a spec names ('clip+hps'), from the preset's real reward models, on this process's
    device in `dtype`."""
    weights = parse_spec(spec)
    models = {name: reward_model(name, reward_models[name], training=True) for name in weights}
    reward = models[spec] if spec in models else Combined(models, weights).requires_grad_(False).eval()
    return reward.to(process_state().device, dtype)


def training_record(pre: config.PresetParams, cfg: config.DistillParams, teacher: str, teacher_sha256: str,
                    seed: int, prompts: list[str], starts_from: dict | None = None) -> dict:
    """A stage's training record (dmdr.distill.training_record) with what else defines it: the teacher (by name and
    by content: families.pipeline_sha256), the preset's resolution and text length, the reward models the stage
    trains on and the record of the stage it starts from (by fingerprint). Not the number of processes: N processes
    compute what one does."""
    used = sorted(parse_spec(cfg.rl.reward)) if cfg.rl.weight > 0 or cfg.rtdm.enabled else []
    reward_models = {r: config.build(config.RewardModelParams, pre.reward_models[r], f"reward_models.{r}")
                     for r in used}
    record = stage_record(cfg, seed, prompts, teacher=teacher, teacher_sha256=teacher_sha256,
                          resolution=pre.resolution, max_sequence_length=pre.max_sequence_length,
                          reward_models={r: dataclasses.asdict(w) for r, w in reward_models.items()},
                          starts_from=starts_from["fingerprint"] if starts_from else None)
    record["trained_with"]["processes"] = process_state().num_processes
    return record


def trackers(log_with: str) -> list[str]:
    """real.log_with ('tensorboard', 'wandb,tensorboard', ...) as accelerate's tracker names, each checked to be
    installed (accelerate itself would leave a missing one out without a word)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    for n in names:
        if n not in LoggerType.list():
            raise config.ParamsError(f"real.log_with: {n!r} is not a tracker of accelerate "
                                     f"(one of {', '.join(LoggerType.list())})")
        if n != "all" and LoggerType(n) not in get_available_trackers():
            raise config.ParamsError(f"real.log_with: {n} is not installed in this environment (pip install {n})")
    return names


def tracker_settings(record: dict) -> dict:
    """A training record as trackers take a run's settings: flat, scalar values (TensorBoard's hparams)."""
    flat = {"fingerprint": record["fingerprint"]} | config.dotted(record["settings"])
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def sample_images(teacher: Teacher, prompts: list[str], times: torch.Tensor, seed: int, directory: Path):
    """A curve_fn that shows training: at each logged step, the generator's few-step samples of `prompts` from the
    same noise every time, side by side in `<directory>/step_<step>.png` (written by the main process; under FSDP
    every process samples, as the sharded generator needs), and as `samples` (N x H x W x C uint8) to the
    experiment trackers that take images."""
    from torchvision.utils import save_image
    noise = torch.randn((len(prompts), *teacher.latent_shape), generator=torch.Generator().manual_seed(seed))
    noise = noise * flow.start_noise_scale(float(times[0]))
    with torch.no_grad():  # the same prompts every time: encoded once, as the loop encodes its batches
        cond = teacher.encode(prompts)
    bf16 = teacher.pipeline.dtype == torch.bfloat16  # trained fp32 masters meet bf16 text states as in the loop

    @torch.no_grad()
    def curve_fn(generator, step: int) -> dict:
        device = next(generator.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x0 = flow.sample_generator(generator, noise.to(device), cond, times)
            images = teacher.decode(x0).float()
        if not process_state().is_main_process:
            return {}
        pixels = (images.clamp(-1, 1) + 1) / 2
        directory.mkdir(parents=True, exist_ok=True)
        save_image(pixels, directory / f"step_{step:06d}.png", nrow=len(prompts))
        return {"samples": (pixels * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()}  # to the trackers
    return curve_fn


def exported(done: Path) -> bool:
    return (done / "model_index.json").exists()


def check_trained_as(done: Path, record: dict) -> None:
    """A stage already exported is reused only if this run would train it the same way; otherwise an error names
    the settings that differ, and nothing is overwritten."""
    path = done / TRAINING_FILE
    if not path.exists():
        print(f"{done}: no {TRAINING_FILE} (exported before dmdr wrote one), reused as it is")
        return
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") == record["fingerprint"]:
        return
    before, now = config.dotted(saved.get("settings", {})), config.dotted(record["settings"])
    # a setting added to dmdr after the export, at its default (which trains as the code did before), is no change
    later = {f"stage.{k}": v for k, v in config.dotted(json.loads(json.dumps(
        what_trains(config.DistillParams()), default=str))).items()}
    changed = [f"{k}: {before.get(k, '(none)')!r} then, {now.get(k, '(none)')!r} now"
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)
               and not (k not in before and k in later and now.get(k) == later[k])]
    if not changed:
        print(f"{done}: trained before dmdr had some of this run's settings, at their defaults: reused as it is")
        return
    raise config.ParamsError(f"{done} was trained with other settings than this run's ({'; '.join(changed)}): "
                             f"remove it to train the stage again, or pass another --out")


def stage(cfg, teacher: Teacher, prompts: list[str], seed: int, out: Path, name: str, reward,
          record: dict | None = None, log_with: list[str] | None = None, sample_prompts: list[str] | None = None,
          start: VelocityModel | None = None, start_fake: VelocityModel | None = None, previous: Path | None = None):
    """Train one stage (resuming from `<out>/checkpoints/<name>`) and export it to `<out>/<name>` with its
    training `record` (TRAINING_FILE); a stage already exported is loaded instead. Returns (generator, fake score)
    for the next stage. DynaDG's released form continues the shared LoRA exported by the `previous` stage, as the
    released code's stage 2 resumes stage 1's. Watching it: with trackers (`log_with`) the logged rows also go to
    the run `<preset>-<name>` (local logs under `<out>/logs`); with `sample_prompts`, each logged step's samples of
    them go to `<out>/samples/<name>/`."""
    done = out / name
    if exported(done):  # run() has checked that it was trained as this run would train it
        print(f"{done} exists: stage {name} is done")
        generator = teacher.wrap(load_backbone(done / teacher.component))
        fake = teacher.wrap(load_backbone(done / "fake")) if (done / "fake").is_dir() else None
        return generator, fake
    lora = previous / DYNADG_LORA_FILE if previous is not None else None
    tracking = (Tracking(log_with, out / "logs", f"{out.name}-{name}", tracker_settings(record) if record else {})
                if log_with else None)
    times = teacher.generator_times(cfg.generator_steps, cfg.shift)
    samples = sample_images(teacher, sample_prompts, times, seed, out / "samples" / name) if sample_prompts else None
    generator, fake, _ = distill_stage(
        cfg, teacher, prompts, seed, done, out / "checkpoints" / name, reward, start, start_fake,
        lora if lora is not None and lora.exists() else None,
        samples, out / "curves" / f"{name}.csv", record["fingerprint"] if record else "", tracking, record=record)
    if process_state().is_main_process:
        plt.close(plot_training(out))  # <out>/curves.png: every stage so far
    return generator, fake


def score(pipe_call, prompts: list[str], rewards: dict, seed: int, batch: int = 4) -> dict:
    """Mean of every reward over one image per prompt (dmdr.evaluator: each process samples its share and the
    per-image scores are gathered, so the numbers do not depend on the number of processes); `pipe_call(prompts,
    generators)` returns images in [0, 1], prompt i sampled with seed + i whichever process samples it. Rewards score
    the images as saved (8 bits)."""
    state = process_state()

    def sample(positions: list[int]) -> torch.Tensor:
        return pipe_call([prompts[i] for i in positions],
                         [torch.Generator().manual_seed(seed + i) for i in positions]).float() * 2 - 1
    per_image, _, _ = evaluator.sample_and_score(sample, prompts, rewards, batch, state, batch, state.device)
    return {name: float(v.mean()) for name, v in per_image.items()}


def evaluate(teacher: Teacher, exported: Path, pre, real_cfg: float, prompts: list[str], seed: int) -> dict:
    """Every reward of the preset on the few-step model (its own sampler) and on the teacher (pre.eval_steps, CFG)."""
    device = process_state().device
    rewards = {name: reward_model(name, where).to(device) for name, where in pre.reward_models.items()}
    pipe, sampler = load_exported(exported)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def few_step(chunk, generators):  # the export's own call: its steps or sigmas, size and text length
        return pipe(chunk, **sampler["call"], generator=generators, output_type="pt").images

    def teacher_call(chunk, generators):
        return teacher.pipeline(chunk, num_inference_steps=pre.eval_steps, guidance_scale=real_cfg,
                                **teacher.call_kwargs(), height=pre.resolution,
                                width=pre.resolution, generator=generators, output_type="pt").images
    return {"few_step": score(few_step, prompts, rewards, seed) | {"nfe": sampler["steps"]},
            "teacher": score(teacher_call, prompts, rewards, seed) | {"nfe": 2 * pre.eval_steps},
            "processes": process_state().num_processes}


def run(p: config.Params, name: str | None = None, teacher_source: str | None = None,
        train_prompts: str | None = None, eval_prompts: str | None = None, out: str | None = None) -> dict:
    """Stage 1 then stage 2 of preset `name` (default: real.preset); returns the exported directories."""
    name = name or p.real.preset
    pre, cfg1, cfg2 = config.preset(p, name)
    out = Path(out or p.real.out) / name
    train_prompts = train_prompts or p.real.train_prompts
    if not train_prompts:
        raise config.ParamsError("real.train_prompts: required (a file of training prompts, one per line)")
    prompts = load_prompts(Path(train_prompts))
    log_with = trackers(p.real.log_with)
    # under bf16 the teacher (text encoders, VAE, the real score) is held in bf16; trained weights have fp32 masters
    bf16 = cfg1.mixed_precision != "no" and cfg2.mixed_precision != "no"
    source = teacher_source or pre.teacher
    state = process_state()
    with state.main_process_first():  # a hub id's files fetched into the hub cache once, by the main process
        directory = pipeline_directory(source)
    digest = [pipeline_sha256(directory) if state.is_main_process else None]  # read once, by the main process
    if state.num_processes > 1:
        broadcast_object_list(digest)
    digest = digest[0]
    records = {"stage1": training_record(pre, cfg1, source, digest, p.seed, prompts)}
    records["dmdr"] = training_record(pre, cfg2, source, digest, p.seed, prompts, starts_from=records["stage1"])
    for done, record in records.items():  # before the teacher loads: a mismatch costs only the hashing
        if exported(out / done):
            check_trained_as(out / done, record)
    teacher = load_teacher(directory, pre.resolution, pre.max_sequence_length,
                           torch.bfloat16 if bf16 else torch.float32)
    teacher.pipeline.to(process_state().device)  # under accelerate launch: this process's GPU
    reward = {cfg.rl.reward: load_rewards(cfg.rl.reward, pre.reward_models, teacher.pipeline.dtype)
              for cfg in (cfg1, cfg2) if cfg.rl.weight > 0 or cfg.rtdm.enabled}
    eval_prompts = eval_prompts or p.real.eval_prompts
    evaluated = load_prompts(Path(eval_prompts)) if eval_prompts else []
    watched = (evaluated or prompts)[:p.real.sample_prompts]
    generator, fake = stage(cfg1, teacher, prompts, p.seed, out, "stage1", reward.get(cfg1.rl.reward),
                            records["stage1"], log_with, watched)
    stage(cfg2, teacher, prompts, p.seed, out, "dmdr", reward.get(cfg2.rl.reward), records["dmdr"], log_with, watched,
          start=generator, start_fake=fake, previous=out / "stage1")
    result = {"stage1": str(out / "stage1"), "dmdr": str(out / "dmdr")}
    if eval_prompts:  # sampled by every process, its share of the prompts
        metrics = evaluate(teacher, out / "dmdr", pre, cfg2.real_cfg, evaluated, p.seed)
        if process_state().is_main_process:
            write_json(metrics, out / "metrics.json")
        result["metrics"] = metrics
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dmdr.real", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", help="a preset of params.yaml (default: real.preset)")
    ap.add_argument("--teacher", help="a diffusers pipeline directory or hub id (default: the preset's)")
    ap.add_argument("--train-prompts", help="training prompts, one per line (default: real.train_prompts)")
    ap.add_argument("--eval-prompts", help="prompts to score the result on (default: real.eval_prompts)")
    ap.add_argument("--out", help="output directory (default: real.out)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a key of the params file (dotted, YAML value; repeatable), as `dvc exp run -S`: "
                         "--set presets.sd3-medium.stage1.optimizer=adamw")
    a = ap.parse_args(argv)
    result = run(config.load(a.params, config.overrides(a.set)), a.preset, a.teacher, a.train_prompts,
                 a.eval_prompts, a.out)
    print(json.dumps(result, indent=1))
    # A process that exits holding its process group leaves it to the interpreter's teardown, where a gloo process
    # was seen to abort ("terminate called without an active exception") while its peer still saved: let go first.
    state = process_state()
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
