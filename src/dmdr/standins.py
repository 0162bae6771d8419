"""The learned stand-ins of the embedded world, trained by the `world` stage: the tiny CLIP (text encoder of the
teachers, CLIP reward), an independently seeded CLIP for the clip_score metric, the VAE, and the flow teacher; and by
the `teacher_eps` stage, on the same latents, the epsilon teacher (SDXL's kind)."""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import flow, resume
from .config import ClipConfig, TeacherParams
from .evaluator import to_tensor, to_uint8
from .files import write_csv, write_json
from .loop import Engine, Settings, Trainee, run
from .models import (EpsilonAsFlow, VelocityModel, atomic_dir, build_backbone, build_vae, decode_latents,
                     encode_latents, load_backbone, require_dir, save_diffusers)
from .tiny_clip import TinyClip
from .world import grammar, parse, render
from .world.score import geneval_correct, geneval_summary

CAPTION_TAGS = grammar.GENEVAL_TAGS + ("dense",)


@dataclass
class World:
    """The trained stand-ins of the world stage."""
    clip: TinyClip
    clip_eval: TinyClip
    vae: AutoencoderKL
    teacher: VelocityModel

    @classmethod
    def load(cls, root: Path = Path("models/world")) -> "World":
        root = require_dir(root, "world")
        return cls(TinyClip.load(root / "clip"), TinyClip.load(root / "clip_eval"),
                   AutoencoderKL.from_pretrained(require_dir(root / "vae", "VAE"), use_safetensors=True).eval(),
                   VelocityModel(load_backbone(root / "teacher")).eval())

    @torch.no_grad()
    def encode(self, texts: list[str]):
        return self.clip.encode(texts)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.teacher.backbone.config
        return (c.in_channels, c.sample_size, c.sample_size)


def world_batch(rng: np.random.Generator, n: int, tags=CAPTION_TAGS) -> tuple[np.ndarray, list[str]]:
    """n random (render, caption) pairs: a spec of a random template, then a scene that satisfies it exactly."""
    images, captions = [], []
    for _ in range(n):
        spec = grammar.sample_spec(rng, tags[int(rng.integers(len(tags)))])
        images.append(render(grammar.scene_for(spec, rng)))
        captions.append(grammar.text(spec))
    return np.stack(images), captions


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def warmup_cosine(warmup: int, steps: int):
    """The stand-ins' learning-rate factor: linear warm-up over `warmup` updates, then cosine decay to 0 at `steps`."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))


class Fit:
    """The stand-ins' method for the generic loop (dmdr.loop.run): one model minimising `loss_fn(step)`."""
    networks = backpropagated = called = ()  # held as built: no precision change, checkpointing or compilation

    def __init__(self, engine: Engine, trainee: Trainee, loss_fn, name: str):
        self.engine, self.trainee, self.loss_fn, self.name = engine, trainee, loss_fn, name
        self.model = trainee.model

    def trainees(self) -> list[Trainee]:
        return [self.trainee]

    def bind(self, prepared: dict) -> None:
        self.model = prepared[self.trainee.name]

    def step(self, step: int) -> dict:
        self.model.train()

        def loss_of(part):
            with self.engine.autocast:
                return self.loss_fn(step), {}

        loss, _ = self.engine.fit(self.trainee.name, loss_of, step)
        return {"loss": loss}

    def evaluated(self) -> torch.nn.Module:
        return self.engine.unwrap(self.model)


def train_loop(model: torch.nn.Module, loss_fn, steps: int, lr: float, desc: str, warmup: int = 100,
               weight_decay: float = 0.0, on_log=None, log_every: int = 100, mixed_precision: str = "no",
               ema: EMAModel | None = None, checkpoint: resume.Checkpoint | None = None) -> list[dict]:
    """A stand-in's training by the generic loop: AdamW with a linear warm-up then cosine decay (`warmup_cosine`),
    gradients clipped to 1, an optional EMA. `loss_fn(step)` returns the loss; `on_log(model, step)` may return
    held-out numbers for the row logged after `step` updates (every `log_every`, and after the last).

    With `checkpoint`, the whole state (model, optimizer, schedule, EMA, global RNGs and the loss's own generators)
    is saved every `checkpoint.every` steps and once more at the end, and a run finding a checkpoint of the same
    settings continues from it: a finished loop is not run again."""
    engine = Engine(Settings(mixed_precision=mixed_precision), checkpoint_dir=checkpoint.path if checkpoint else None)
    trainee = Trainee("model", "model", model, list(model.parameters()), lr, weight_decay,
                      schedule=warmup_cosine(warmup, steps), ema=ema)
    method = Fit(engine, trainee, loss_fn, desc)
    engine.prepare(method)
    return run(engine, method, steps, log_every, on_log, ckpt=checkpoint, checkpoint_at_end=True)


# --- CLIP -----------------------------------------------------------------------------------------------------


def clip_loss(clip: TinyClip, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE; identical captions in a batch are all positives."""
    img = clip.encode_image(images)
    txt = clip.encode_text(captions)
    logits = clip.clip.logit_scale.exp().clamp(max=100) * img @ txt.T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=logits.device)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))


@torch.no_grad()
def retrieval_accuracy(clip: TinyClip, seed: int, n: int = 500, candidates: int = 50) -> dict:
    """Image -> text top-1 accuracy among `candidates` dense captions (held-out renders), and text -> image."""
    rng = np.random.default_rng(seed)
    images, captions = world_batch(rng, n, tags=("dense",))
    clip.eval()
    img = clip.encode_image(to_tensor(images, device_of(clip)))
    txt = clip.encode_text(captions)
    i2t = t2i = 0
    for s in range(0, n, candidates):
        sim = img[s:s + candidates] @ txt[s:s + candidates].T
        ok = torch.arange(sim.shape[0])
        caps = captions[s:s + candidates]
        i2t += sum(caps[j] == caps[i] for i, j in zip(ok.tolist(), sim.argmax(1).tolist()))
        t2i += sum(caps[j] == caps[i] for i, j in zip(ok.tolist(), sim.argmax(0).tolist()))
    return {"image_to_text_top1": i2t / n, "text_to_image_top1": t2i / n, "candidates": candidates}


def checkpointing(path: Path | None, every: int, *settings, rng=None, prng=None) -> resume.Checkpoint | None:
    """Checkpoints of one stand-in's training under `path`, identified by its settings (None: no checkpoints)."""
    # "loop.run": the generic loop's checkpoints (those of the world's own loop before it are not resumed)
    return None if path is None or every <= 0 else resume.Checkpoint(path, every, resume.fingerprint(
        "loop.run", *settings), rng, prng)


def train_clip(cfg: ClipConfig, seed: int, steps: int, batch: int, lr: float, mixed_precision: str = "bf16",
               checkpoint_dir: Path | None = None, checkpoint_every: int = 500) -> tuple[TinyClip, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clip = TinyClip(cfg)
    ckpt = checkpointing(checkpoint_dir, checkpoint_every, "clip", dataclasses.asdict(cfg), seed, steps, batch, lr,
                         mixed_precision, prng=rng)

    def loss_fn(step):
        images, captions = world_batch(rng, batch)
        return clip_loss(clip, to_tensor(images, device_of(clip)), captions)

    history = train_loop(clip, loss_fn, steps, lr, desc=f"CLIP seed {seed}", weight_decay=0.1,
                         mixed_precision=mixed_precision, checkpoint=ckpt)
    return clip.eval(), {"history": history} | retrieval_accuracy(clip, seed + 1000)


# --- VAE ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def vae_parse_accuracy(vae, seed: int, n: int = 400) -> float:
    """Fraction of renders whose VAE reconstruction parses to the same objects (shape, colour, size)."""
    rng = np.random.default_rng(seed)
    images, captions = world_batch(rng, n)
    recon = to_uint8(vae.decode(vae.encode(to_tensor(images, device_of(vae))).latent_dist.mean).sample)
    key = lambda dets: sorted((d.shape, d.color, d.size) for d in dets)
    return float(np.mean([key(parse(a)) == key(parse(b)) for a, b in zip(images, recon)]))


def train_vae(seed: int, steps: int, batch: int, lr: float, kl_weight: float = 1e-6, mixed_precision: str = "bf16",
              check_renders: int = 400, checkpoint_dir: Path | None = None, checkpoint_every: int = 500) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae()
    ckpt = checkpointing(checkpoint_dir, checkpoint_every, "vae", seed, steps, batch, lr, kl_weight, mixed_precision,
                         prng=rng)

    def loss_fn(step):
        x = to_tensor(world_batch(rng, batch)[0], device_of(vae))
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        return (recon - x).abs().mean() + (recon - x).pow(2).mean() + kl_weight * post.kl().mean()

    history = train_loop(vae, loss_fn, steps, lr, desc="VAE", mixed_precision=mixed_precision, checkpoint=ckpt)
    vae.eval()
    # SD-style latent normalisation, measured on fresh renders
    with torch.no_grad():
        z = vae.encode(to_tensor(world_batch(rng, 1024)[0], device_of(vae))).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return vae, {"history": history, "reconstruction_parse_exact": vae_parse_accuracy(vae, seed + 1000, check_renders)}


# --- flow teacher ---------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_pool(vae, seed: int, n: int, chunk: int = 500) -> tuple[torch.Tensor, list[str]]:
    """n (latent, caption) pairs, encoded once: the teacher's pre-training set."""
    rng = np.random.default_rng(seed)
    latents, captions = [], []
    for s in tqdm(range(0, n, chunk), desc="encode latents", mininterval=5):
        images, caps = world_batch(rng, min(chunk, n - s))
        latents.append(encode_latents(vae, to_tensor(images, device_of(vae))))
        captions += caps
    return torch.cat(latents), captions


def epsilon_schedule() -> DDPMScheduler:
    """The epsilon teacher's VP schedule: SD's and SDXL's (scaled-linear betas from 0.00085 to 0.012 over 1000
    timesteps), its sampler starting at the noisiest timestep ("trailing" spacing)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="epsilon", timestep_spacing="trailing")


SCHEDULER_DIR = "scheduler"  # an epsilon model's VP schedule, beside its weights


def load_schedule(directory: Path) -> DDPMScheduler:
    """The VP schedule saved beside an epsilon model's weights (SCHEDULER_DIR)."""
    return DDPMScheduler.from_pretrained(require_dir(Path(directory) / SCHEDULER_DIR, f"{directory}'s schedule"))


def load_epsilon_teacher(root: Path) -> tuple[EpsilonAsFlow, DDPMScheduler]:
    """The epsilon teacher saved by the teacher_eps stage (a UNet, its schedule beside it), as a velocity model, and
    its schedule."""
    schedule = load_schedule(require_dir(root, "epsilon teacher"))
    return EpsilonAsFlow(load_backbone(root), schedule.alphas_cumprod).eval(), schedule


@torch.no_grad()
def geneval_accuracy(model, clip: TinyClip, vae, specs: list, seed: int, steps: int, cfg: float,
                     batch: int = 128, sigmas: list[float] | None = None) -> dict:
    """GenEval-analogue accuracy per tag of one image per spec, sampled with `steps` Euler steps and CFG `cfg` (at
    the flow times `sigmas`, a VP teacher's, from noise scaled to the first: flow.sample_teacher)."""
    g = torch.Generator().manual_seed(seed)
    uncond = clip.encode([""])
    verdicts = []
    for s in range(0, len(specs), batch):
        chunk = specs[s:s + batch]
        cond = clip.encode([grammar.text(x) for x in chunk])
        noise = torch.randn(len(chunk), vae.config.latent_channels, 8, 8, generator=g).to(device_of(vae))
        if sigmas is not None:
            noise = noise * flow.start_noise_scale(sigmas[0])
        latents = flow.sample_teacher(model, noise, cond, uncond, steps, cfg, sigmas=sigmas)
        images = to_uint8(decode_latents(vae, latents))
        verdicts += [(spec.tag, geneval_correct(parse(im), *grammar.geneval_clauses(spec), spec.tag))
                     for spec, im in zip(chunk, images)]
    return geneval_summary(verdicts)


def train_teacher(cfg: TeacherParams, clip: TinyClip, vae, seed: int, eval_specs: list, desc: str = "flow teacher",
                  checkpoint_dir: Path | None = None, checkpoint_every: int = 500) -> tuple[torch.nn.Module, dict]:
    """Flow matching on VAE latents (or, with `cfg.prediction` epsilon, DDPM's epsilon loss on `epsilon_schedule`'s
    timesteps, drawn uniformly), conditioned on the frozen CLIP's text tower, with CFG dropout and EMA.
    Returns the EMA model, as a velocity model, and the training history (with GenEval-analogue accuracy against
    time)."""
    torch.manual_seed(seed)
    latents, captions = latent_pool(vae, seed, cfg.pool_size)
    clip.requires_grad_(False)
    backbone = build_backbone(cfg.backbone, clip.cfg.width, clip.cfg.embed_dim, vae.config.latent_channels,
                              channels=cfg.channels, layers=cfg.layers, heads=cfg.heads, head_dim=cfg.head_dim)
    schedule = epsilon_schedule() if cfg.prediction == "epsilon" else None
    if schedule is None:
        model, sigmas = VelocityModel(backbone).to(device_of(vae)), None
    else:
        model = EpsilonAsFlow(backbone, schedule.alphas_cumprod).to(device_of(vae))
        sigmas = flow.vp_sampler_times(schedule, cfg.eval_steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(seed)
    ckpt = checkpointing(checkpoint_dir, checkpoint_every, "teacher", dataclasses.asdict(cfg), seed,
                         [(grammar.text(s), s.tag) for s in eval_specs], rng=g)
    with torch.no_grad():
        uncond = clip.encode([""])

    def loss_fn(step):
        idx = torch.randint(len(captions), (cfg.batch,), generator=g)
        x0 = latents[idx.to(latents.device)]
        with torch.no_grad():
            states, pooled = clip.encode([captions[i] for i in idx.tolist()])
        drop = (torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout).to(x0.device)
        states = torch.where(drop[:, None, None], uncond[0], states)
        pooled = torch.where(drop[:, None], uncond[1], pooled)
        if schedule is None:
            t, loss = flow.sample_train_times(cfg.batch, cfg.timesteps, g), flow.flow_matching_loss
        else:
            timesteps = torch.randint(schedule.config.num_train_timesteps, (cfg.batch,), generator=g)
            t, loss = flow.vp_flow_times(schedule.alphas_cumprod, timesteps), flow.epsilon_loss
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        return loss(model, x0, (states, pooled), t.to(x0.device), noise)

    def on_log(model, step):
        if step == 0 or step % cfg.eval_every and step != cfg.steps:
            return {}
        shadow = copy.deepcopy(model).eval()
        ema.copy_to(shadow.parameters())
        return geneval_accuracy(shadow, clip, vae, eval_specs, seed, cfg.eval_steps, cfg.cfg, sigmas=sigmas)

    history = train_loop(model, loss_fn, cfg.steps, cfg.lr, desc=desc, warmup=cfg.warmup,
                         on_log=on_log, log_every=max(1, cfg.eval_every // 10), mixed_precision=cfg.mixed_precision,
                         ema=ema, checkpoint=ckpt)
    ema.copy_to(model.parameters())
    return model.eval(), {"history": history} | ({} if schedule is None else {"schedule": schedule})


# --- the world stage ------------------------------------------------------------------------------------------


def build_world(p, eval_specs: list, out: Path, metrics_path: Path, curve_path: Path,
                checkpoints: Path = Path("checkpoints/world")) -> dict:
    """Train every stand-in of the `world` stage and save them under `out` (clip, clip_eval, vae, teacher).
    `eval_specs` are the held-out prompts on which the teacher's accuracy is followed during training.

    Each stand-in checkpoints under `checkpoints/<name>` every `world.checkpoint_every` steps and when it is done,
    so a killed stage resumes where it stopped; the checkpoints go once the whole world is saved."""
    w, seed, timings = p.world, p.seed, {}
    every = w.checkpoint_every
    clip_cfg = ClipConfig(**{f.name: getattr(w.clip, f.name) for f in dataclasses.fields(ClipConfig)})

    t = time.time()
    clip, clip_info = train_clip(clip_cfg, seed, w.clip.steps, w.clip.batch, w.clip.lr,
                                 checkpoint_dir=checkpoints / "clip", checkpoint_every=every)
    clip.save(out / "clip")
    clip_eval, clip_eval_info = train_clip(clip_cfg, w.clip_eval_seed, w.clip.steps, w.clip.batch, w.clip.lr,
                                           checkpoint_dir=checkpoints / "clip_eval", checkpoint_every=every)
    clip_eval.save(out / "clip_eval")
    timings["clip_minutes"] = (time.time() - t) / 60

    t = time.time()
    vae, vae_info = train_vae(seed, w.vae.steps, w.vae.batch, w.vae.lr, w.vae.kl_weight,
                              check_renders=w.vae.check_renders, checkpoint_dir=checkpoints / "vae",
                              checkpoint_every=every)
    save_diffusers(vae, out / "vae")
    timings["vae_minutes"] = (time.time() - t) / 60

    t = time.time()
    teacher, teacher_info = train_teacher(w.teacher, clip, vae, seed, eval_specs,
                                          checkpoint_dir=checkpoints / "teacher", checkpoint_every=every)
    save_diffusers(teacher.backbone, out / "teacher")
    timings["teacher_minutes"] = (time.time() - t) / 60

    rows = [r for r in teacher_info["history"] if "geneval_overall" in r]
    write_csv(rows, curve_path)
    metrics = {
        "clip_image_to_text_top1": clip_info["image_to_text_top1"],
        "clip_text_to_image_top1": clip_info["text_to_image_top1"],
        "clip_eval_image_to_text_top1": clip_eval_info["image_to_text_top1"],
        "retrieval_candidates": clip_info["candidates"],
        "vae_reconstruction_parse_exact": vae_info["reconstruction_parse_exact"],
        "teacher_geneval_overall_during_training": rows[-1]["geneval_overall"] if rows else None,
        "teacher_params_millions": sum(x.numel() for x in teacher.parameters()) / 1e6,
        "teacher_class": type(teacher.backbone).__name__,
    } | {k: round(v, 2) for k, v in timings.items()}
    write_json(metrics, metrics_path)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the world is complete: nothing left to resume
    return metrics


def build_teacher_eps(p, eval_specs: list, world_dir: Path, out: Path, metrics_path: Path, curve_path: Path,
                      checkpoints: Path = Path("checkpoints/teacher_eps")) -> dict:
    """The `teacher_eps` stage: the epsilon teacher (`p.teacher_eps`) on the world's latents and text encoder, from
    the flow teacher's seed (the same initial weights and data order: only the prediction and schedule differ),
    saved under `out` with its schedule beside it (SCHEDULER_DIR). Resumable as the world's stand-ins are."""
    world = World.load(world_dir)
    t = time.time()
    model, info = train_teacher(p.teacher_eps, world.clip, world.vae, p.seed, eval_specs, desc="epsilon teacher",
                                checkpoint_dir=checkpoints, checkpoint_every=p.world.checkpoint_every)

    def write(d: Path):
        model.backbone.save_pretrained(d, safe_serialization=True)
        info["schedule"].save_pretrained(d / SCHEDULER_DIR)
    atomic_dir(out, write)
    rows = [r for r in info["history"] if "geneval_overall" in r]
    write_csv(rows, curve_path)
    metrics = {"teacher_geneval_overall_during_training": rows[-1]["geneval_overall"] if rows else None,
               "teacher_params_millions": sum(x.numel() for x in model.parameters()) / 1e6,
               "teacher_class": type(model.backbone).__name__, "prediction": "epsilon", "max_t": model.max_t,
               "teacher_minutes": round((time.time() - t) / 60, 2)}
    write_json(metrics, metrics_path)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics
