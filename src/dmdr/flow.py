"""Rectified-flow math shared by teachers, generators and fake scores.

Convention (SD3): x_t = (1 - t) x0 + t eps for t in [0, 1], velocity v = eps - x0, so x0 = x_t - t v.
A conditioning `cond` is a pair (text states, pooled text) from `TinyClip.encode`.
"""
from __future__ import annotations

import math

import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

Cond = tuple[torch.Tensor, torch.Tensor]


def renoise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = (1 - t) x0 + t eps."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * noise


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction of a velocity model: x0 = x_t - t v."""
    return x_t - t.view(-1, *[1] * (x_t.dim() - 1)) * v


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of the noise level: s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_train_times(n: int, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training noise levels: 'uniform' or 'logit_normal' (SD3's default, sigmoid of a standard normal)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"unknown timestep sampling {kind!r}")


def flow_matching_loss(model, x0: torch.Tensor, cond: Cond, t: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion loss of a flow model: || v(x_t, t) - (eps - x0) ||^2, optionally weighted per sample."""
    v = model(renoise(x0, noise, t), t, *cond)
    if weight is None:
        return torch.nn.functional.mse_loss(v.float(), (noise - x0).float())
    return (((v.float() - (noise - x0).float()) ** 2).flatten(1).mean(1) * weight).mean()


def epsilon_loss(model, x0: torch.Tensor, cond: Cond, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The diffusion loss of an epsilon model (DDPM's || eps_hat - eps ||^2) through its velocity view: from
    x_t = (1 - t) x0 + t eps and v = eps - x0, eps_hat = x_t + (1 - t) v."""
    x_t = renoise(x0, noise, t)
    eps = x_t + (1 - t.view(-1, *[1] * (x0.dim() - 1))) * model(x_t, t, *cond)
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def expand(cond: Cond, n: int) -> Cond:
    return tuple(c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c for c in cond)


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u), both halves in one batch. `scale` may be per sample."""
    n = x.shape[0]
    uncond = expand(uncond, n)
    t = t.expand(n) if t.dim() == 0 else t
    v = model(torch.cat([x, x]), torch.cat([t, t]), *(torch.cat([c, u]) for c, u in zip(cond, uncond)))
    v_c, v_u = v.chunk(2)
    w = torch.as_tensor(scale, dtype=v.dtype, device=v.device).view(-1, *[1] * (x.dim() - 1))
    return v_u + w * (v_c - v_u)


class Guided(torch.nn.Module):
    """A velocity model under classifier-free guidance, itself a velocity model (multi-step RL tunes the teacher
    as it samples, with CFG)."""

    def __init__(self, model, uncond: Cond, scale: float):
        super().__init__()
        self.model, self.uncond, self.scale = model, uncond, scale

    def forward(self, x, t, *cond):
        return guided_velocity(self.model, x, t, cond, self.uncond, self.scale)


@torch.no_grad()
def sample_teacher(model, noise: torch.Tensor, cond: Cond, uncond: Cond, steps: int = 50, cfg: float = 3.0,
                   shift: float = 1.0, sigmas: list[float] | None = None) -> torch.Tensor:
    """Multi-step Euler sampling with diffusers' FlowMatchEulerDiscreteScheduler; cfg <= 1 means no guidance.
    `sigmas`: the flow times of the steps (a VP teacher's own, `vp_sampler_times`), else the scheduler's `steps`
    levels from 1. `noise` is the starting point at the first level (`start_noise_scale`)."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if sigmas is None:
        sched.set_timesteps(steps, device=noise.device)
    else:
        sched.set_timesteps(sigmas=sigmas, device=noise.device)
    x = noise
    for ts in sched.timesteps:
        t = (ts / 1000).to(x.dtype).expand(x.shape[0])
        v = guided_velocity(model, x, t, cond, uncond, cfg) if cfg > 1 else model(x, t, *cond)
        x = sched.step(v, ts, x).prev_sample
    return x


def generator_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The few-step generator's noise levels: linspace(1, 0.001, N + 1), shifted (released code)."""
    return shift_time(torch.linspace(1.0, 0.001, steps + 1), shift)


def start_noise_scale(t0: float) -> float:
    """The std of the generator's starting point at times[0]: 1 for pure noise at t = 1; below (a VP schedule's
    end, or SDXL's one-step timestep 399) the pipeline starts from VP noise, which is eps sqrt(t^2 + (1 - t)^2) as a
    flow point."""
    return 1.0 if t0 == 1.0 else math.sqrt(t0 ** 2 + (1 - t0) ** 2)


def vp_flow_times(alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """The flow times of a VP schedule's (integer) timesteps: t = k / (1 + k) with k = sqrt((1 - abar) / abar), the
    point a x0 + s eps being the flow point (1 - t) x0 + t eps scaled by a + s (models.EpsilonAsFlow)."""
    abar = alphas_cumprod.double()[torch.as_tensor(timesteps, dtype=torch.long)]
    k = ((1 - abar) / abar).sqrt()
    return (k / (1 + k)).float()


def vp_sampler_times(schedule, steps: int) -> list[float]:
    """The flow times of a VP teacher's own `steps`-step Euler sampler (diffusers' EulerDiscreteScheduler on its
    schedule's config), from the noisiest."""
    sched = EulerDiscreteScheduler.from_config(schedule.config)
    sched.set_timesteps(steps)
    k = sched.sigmas[:-1].double()
    return (k / (1 + k)).tolist()


def vp_generator_timesteps(steps: int) -> list[int]:
    """DMD2's few-step timesteps on a 1000-step VP schedule (its SDXL models): 399 for one step, else 999 down by
    1000 // N (four steps: 999, 749, 499, 249)."""
    return [399] if steps == 1 else [999 - i * (1000 // steps) for i in range(steps)]


def generator_step(model, x_t: torch.Tensor, t: float, cond: Cond) -> torch.Tensor:
    """One generator call: its clean-sample prediction from x_t at noise level t."""
    tt = torch.full((x_t.shape[0],), float(t), dtype=x_t.dtype, device=x_t.device)
    return x0_from_velocity(x_t, model(x_t, tt, *cond), tt)


def sample_generator(model, noise: torch.Tensor, cond: Cond, times: torch.Tensor, upto: int | None = None) -> torch.Tensor:
    """The few-step ODE: at each level predict x0 and move to the next level along the straight line through it,
    x_{t'} = (1 - t') x0 + t' eps_hat (an Euler step). Returns the final x0, or x_{times[upto]} when `upto` is given."""
    x = noise
    n = len(times) - 1 if upto is None else upto
    for i in range(n):
        t, t_next = float(times[i]), float(times[i + 1])
        x0 = generator_step(model, x, t, cond)
        if upto is None and i == n - 1:
            return x0
        eps = (x - (1 - t) * x0) / t
        x = (1 - t_next) * x0 + t_next * eps
    return x
