"""Distribution Matching Distillation (DMD2) of a flow teacher into a few-step generator.

Eq. 1 of the paper: the generator's gradient is the difference of the fake and real scores at a renoised sample,
    grad_theta KL = E_t,x [ w_t (s_fake(x_t, t) - s_real(x_t, t)) dG/dtheta ],
written, as in the released code, with the scores' clean-sample predictions and DMD's per-sample normaliser.
The fake score is trained with the diffusion loss on generator samples (two time-scale: `ttur` fake updates per
generator update); samples come by backward simulation of the generator's own few-step ODE (DMD2).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import flow
from .config import DistillParams
from .files import write_csv


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 1 in clean-sample form: grad = (x0_fake - x0_real) / (mean |x0 - x0_real| per sample + 1e-8).

    x0_real / x0_fake are the real / fake scores' clean predictions at x_t = (1 - t) x0 + t eps. Since
    s(x_t) = -(x_t - (1 - t) x0_hat) / t^2, s_fake - s_real = (1 - t) / t^2 (x0_fake - x0_real): the same direction,
    and the normaliser is DMD's weight w_t."""
    dims = tuple(range(1, x0.dim()))
    norm = (x0 - x0_real).abs().mean(dim=dims, keepdim=True)
    return (x0_fake - x0_real) / (norm + 1e-8)


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_DMD = 0.5 || x0 - stopgrad(x0 - grad) ||^2 (mean over elements), so dL/dx0 is proportional to grad: a step
    moves x0 toward the real score's prediction and away from the fake's. `weight` scales each sample."""
    per_sample = 0.5 * ((x0.float() - (x0 - grad).detach().float()) ** 2).flatten(1).mean(1)
    return (per_sample if weight is None else per_sample * weight).mean()


def backward_simulate(generator, noise: torch.Tensor, cond, times: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """DMD2's backward simulation (released form): run the few-step ODE without gradient, pick one of its levels
    uniformly, renoise the final sample to it, and make one generator call there, with gradient. Returns x0."""
    n = len(times) - 1
    k = int(torch.randint(n, (1,), generator=rng))
    if k == 0:
        x_t = noise
    else:
        with torch.no_grad():
            final = flow.sample_generator(generator, noise, cond, times)
        x_t = flow.renoise(final, torch.randn(noise.shape, generator=rng), times[k].expand(noise.shape[0]))
    return flow.generator_step(generator, x_t, float(times[k]), cond)


@dataclass
class Models:
    """What a DMD run trains and consults: generator G, fake score, frozen real score (teacher), text encoder."""
    generator: torch.nn.Module
    fake: torch.nn.Module
    real: torch.nn.Module
    encode: callable  # list[str] -> cond
    uncond: tuple


def train(cfg: DistillParams, models: Models, prompts: list[str], seed: int, curve_fn=None,
          curve_path: Path | None = None) -> list[dict]:
    """The one DMD training loop. `curve_fn(generator, step)` returns held-out numbers logged every `log_every`
    generator steps, written to `curve_path` as CSV. Returns the logged rows."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    prng = np.random.default_rng(seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    models.real.requires_grad_(False).eval()
    g_opt = torch.optim.AdamW(models.generator.parameters(), lr=cfg.generator_lr, weight_decay=0.0)
    f_opt = torch.optim.AdamW(models.fake.parameters(), lr=cfg.fake_lr, weight_decay=0.0)
    generator, fake, g_opt, f_opt = acc.prepare(models.generator, models.fake, g_opt, f_opt)
    times = flow.generator_times(cfg.generator_steps, cfg.shift)

    def batch():
        texts = [prompts[i] for i in prng.integers(len(prompts), size=cfg.batch)]
        with torch.no_grad():
            cond = models.encode(texts)
        return texts, cond

    def noise_like(cond):
        return torch.randn((cond[0].shape[0], *latent_shape), generator=rng)

    c = models.generator.backbone.config
    latent_shape = (c.in_channels, c.sample_size, c.sample_size)
    rows, t0 = [], time.time()
    fake_loss = torch.tensor(0.0)
    bar = tqdm(range(cfg.steps + 1), desc="DMD", mininterval=5)
    for step in bar:
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "seconds": round(time.time() - t0, 2)}
            if curve_fn is not None:
                generator.eval()
                row |= curve_fn(generator, step)
            rows.append(row)
            if curve_path is not None:
                write_csv(rows, curve_path)
        if step == cfg.steps:
            break
        # fake score: diffusion loss on generator samples (two time-scale update rule)
        generator.eval()
        fake.train()
        for _ in range(cfg.ttur):
            _, cond = batch()
            with torch.no_grad(), autocast:
                x0 = backward_simulate(generator, noise_like(cond), cond, times, rng)
            t = torch.rand(cfg.batch, generator=rng)
            with autocast:
                fake_loss = flow.flow_matching_loss(fake, x0.float(), cond, t, torch.randn(x0.shape, generator=rng))
            acc.backward(fake_loss)
            acc.clip_grad_norm_(fake.parameters(), 1.0)
            f_opt.step()
            f_opt.zero_grad(set_to_none=True)
        # generator: Eq. 1
        generator.train()
        fake.eval()
        _, cond = batch()
        with autocast:
            x0 = backward_simulate(generator, noise_like(cond), cond, times, rng)
            t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(cfg.batch, generator=rng)
            x_t = flow.renoise(x0.detach(), torch.randn(x0.shape, generator=rng), t)
            with torch.no_grad():
                w = cfg.real_cfg + cfg.cfg_jitter * (2 * torch.rand(cfg.batch, generator=rng) - 1)
                x0_real = flow.x0_from_velocity(x_t, flow.guided_velocity(models.real, x_t, t, cond, models.uncond, w), t)
                x0_fake = flow.x0_from_velocity(x_t, fake(x_t, t, *cond), t)
            loss = dmd_loss(x0, dmd_gradient(x0.detach().float(), x0_real.float(), x0_fake.float()))
        acc.backward(loss)
        acc.clip_grad_norm_(generator.parameters(), 1.0)
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        if rows:
            rows[-1].setdefault("loss_dmd", float(loss.detach()))
            rows[-1].setdefault("loss_fake", float(fake_loss.detach()))
        bar.set_postfix(dmd=f"{float(loss.detach()):.4f}", fake=f"{float(fake_loss.detach()):.4f}")
    return rows


def init_models(teacher, encode, uncond) -> Models:
    """Generator and fake score both start as copies of the teacher (DMD2)."""
    return Models(generator=copy.deepcopy(teacher).train(), fake=copy.deepcopy(teacher).train(),
                  real=teacher, encode=encode, uncond=uncond)


def run_recipe(p, name: str, prompt_dir: Path = Path("data/prompts"), out: Path = Path("models/distill"),
               curves: Path = Path("results/curves")) -> list[dict]:
    """The `distill` stage for one recipe: DMD from the world's teacher on the train prompts, curves on held-out
    prompts, the generator saved as a diffusers model directory with its sampler settings (sampler.json)."""
    from .config import recipe
    from .evaluation import World, curve_metrics
    from .models import atomic_dir
    from .prompts import load_prompts, load_records, test_specs
    from .world import grammar

    cfg = recipe(p, name)
    world = World.load()
    models = init_models(world.teacher, world.encode, world.encode([""]))
    specs = test_specs(prompt_dir, cfg.curve_prompts_per_tag)
    dense = [grammar.read(r["prompt"]) for r in load_records(prompt_dir / "test_dpg.csv")][: 6 * cfg.curve_prompts_per_tag]

    def curve_fn(generator, step):
        return curve_metrics(world, generator, cfg.generator_steps, cfg.shift, specs, p.seed, dense)

    rows = train(cfg, models, load_prompts(prompt_dir / "train.txt"), p.seed, curve_fn, curves / f"{name}.csv")

    def write(d: Path):
        models.generator.backbone.save_pretrained(d, safe_serialization=True)
        (d / "sampler.json").write_text(json.dumps({"steps": cfg.generator_steps, "shift": cfg.shift,
                                                    "times": flow.generator_times(cfg.generator_steps, cfg.shift).tolist(),
                                                    "prediction": "velocity", "recipe": name}, indent=1))
    atomic_dir(out / name, write)
    return rows
