"""DMDR: distribution matching distillation (Eq. 1) joined with reinforcement learning (Eq. 3), with the stage-1
tools RT-DM (Eq. 4), DynaDG and DynaRS. The equations, then the method (`DMDR`: its fake-score and generator steps),
which the generic loop (dmdr.loop) runs; recipes in params.yaml configure it.

Eq. 1 (DMD): the generator's gradient is the difference of the fake and real scores at a renoised sample,
    grad_theta KL = E_t,x [ w_t (s_fake(x_t, t) - s_real(x_t, t)) dG/dtheta ],
written, as in the released code, with the scores' clean-sample predictions and DMD's per-sample normaliser.
The fake score is trained with the diffusion loss on generator samples (two time-scale: `ttur` fake updates per
generator update); samples come by backward simulation of the generator's own few-step ODE (DMD2).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import flow, loop, resume, rl
from .config import DistillParams
from .draws import Draws
from .lora import (add_generator_lora, add_lora, backbone_of, fused_copy, load_lora_state, lora_state, plain,
                   set_lora_scale)
from .loop import Engine, Trainee, Tracking  # noqa: F401  (Tracking: the runners pass it to train)
from .reward_terms import weighted_terms

# --- the equations --------------------------------------------------------------------------------------------


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


def rtdm_weights(reward: torch.Tensor, beta: float, form: str = "exp", group: int = 0) -> torch.Tensor:
    """Eq. 4, RT-DM: per-sample weights of the DMD loss from the reward of each sample's full few-step output (no
    reward gradient). `exp`: w_i = B softmax(r / beta)_i, self-normalised importance weights of the tilted target
    p_beta(x) = p_real(x) exp(r(x) / beta) / Z. `reward`: w_i = r_i / mean(r), the reward itself as the weight.
    With `group` k > 0 the batch is runs of k samples of one prompt, each run normalised on its own (B = k): the
    tilt of each prompt's own distribution, p_real(x | c) exp(r(x, c) / beta), as the paper writes it, rather than a
    re-weighting of prompts; 0: the whole batch at once.

    Derivation, and what weighting alone does: KL(p_fake || p_beta) = KL(p_fake || p_real) - E_fake[r] / beta + c,
    whose gradient needs grad r. Without it, weighting the generator's DMD gradient re-weights which samples learn
    (high-reward ones faster) but keeps p_fake = p_real a fixed point: there s_fake - s_real = 0 for every sample.
    The tilted optimum itself follows when the fake score also learns the down-weighted generator distribution
    p_fake(x) exp(-r(x) / beta) (`fake_weights`): DMD then drives p_fake exp(-r / beta) to p_real, i.e. p_fake to
    p_beta. Both are tested on a one-dimensional Gaussian (tests/test_dmdr_math.py)."""
    r = reward.detach().float().reshape(-1, group or len(reward))
    if form == "exp":
        return (r.shape[1] * torch.softmax(r / beta, dim=1)).reshape(-1)
    if form == "reward":
        r = r.clamp_min(0)
        return (r / r.mean(1, keepdim=True).clamp_min(1e-8)).reshape(-1)
    raise ValueError(f"unknown RT-DM weight form {form!r}")


def effective_sample_size(weights: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Kish's effective sample size of importance weights, (sum w)^2 / sum w^2: the number of samples when the
    weights are equal, 1 when one sample takes all the weight. How far RT-DM's weights tilt the batch; with `group`
    k, the mean over the runs of k samples that are normalised together."""
    w = weights.reshape(-1, group or len(weights))
    return (w.sum(1) ** 2 / (w ** 2).sum(1).clamp_min(1e-12)).mean()


def beta_for_ess(reward: torch.Tensor, fraction: float, group: int = 0, form: str = "exp") -> float:
    """The RT-DM temperature whose weights keep `fraction` of each normalised run's samples: the beta at which
    effective_sample_size(rtdm_weights(reward, beta, group)) = fraction * k (bisection on log beta; the ESS rises
    with beta, from 1 toward k). The rule that sets beta from the reward's spread, where the paper gives none."""
    k = group or len(reward)
    ess = lambda log_beta: float(effective_sample_size(rtdm_weights(reward, math.exp(log_beta), form, group), group))
    low, high = math.log(1e-6), math.log(1e3)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if ess(mid) < fraction * k else (low, mid)
    return math.exp((low + high) / 2)


def fake_weights(reward: torch.Tensor, beta: float, group: int = 0) -> torch.Tensor:
    """Weights of the fake score's diffusion loss that make it model p_fake(x) exp(-r(x) / beta) (see rtdm_weights):
    w_i = B softmax(-r / beta)_i, over runs of `group` samples of one prompt (0: the batch)."""
    return rtdm_weights(-reward, beta, "exp", group)


def cosine_anneal(step: int, steps: int) -> float:
    """c = 0.5 (1 + cos(pi min(step / K, 1))): 1 at step 0, 0 from step K on."""
    return 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))


def dynadg_scale(step: int, steps: int, scale: float) -> float:
    """DynaDG: the real score's LoRA scale, `scale` at step 0 annealed to 0 at step K (released: scale 0.5)."""
    return scale * cosine_anneal(step, steps)


def dynars_beta(step: int, steps: int, a: float, b: float) -> tuple[float, float]:
    """DynaRS: Beta(a, b) renoise levels (a > b: high noise) annealed to Beta(1, 1), uniform, at step K:
    a <- 1 + (a - 1) c, b <- 1 + (b - 1) c with c = cosine_anneal(step, K)."""
    c = cosine_anneal(step, steps)
    return 1 + (a - 1) * c, 1 + (b - 1) * c

def joint_loss(loss_dmd: torch.Tensor, loss_rl: torch.Tensor, rl_weight: float, dmd_weight: float = 1.0):
    """Eq. 3: L = L_DMD + lambda L_RL (dmd_weight 0: RL alone, e.g. RL after distillation)."""
    return dmd_weight * loss_dmd + rl_weight * loss_rl


# --- rollouts -------------------------------------------------------------------------------------------------


def rollout(generator, noise: torch.Tensor, cond, times: torch.Tensor, rng: torch.Generator,
            mode: str = "renoise", need_final: bool = False, randn=None):
    """Where the generator's gradient call happens, without gradient. `renoise` (DMD2's backward simulation,
    released form): run the few-step ODE, pick one of its levels uniformly and renoise the final sample to it.
    `trajectory` (ReFL): stop the ODE at a level in its second half. Returns (x_t, its level, the full ODE output:
    RT-DM's reward is taken on it; None unless computed anyway or `need_final`). `randn()` draws the renoising
    noise (default: like `noise`, from `rng`)."""
    n = len(times) - 1
    final = None
    with torch.no_grad():
        if mode == "trajectory":
            k = int(torch.randint(n // 2, n, (1,), generator=rng))
            x_t = flow.sample_generator(generator, noise, cond, times, upto=k) if k else noise
        else:
            k = int(torch.randint(n, (1,), generator=rng))
            eps = (randn() if randn is not None else torch.randn(noise.shape, generator=rng)).to(noise.device)
            if k or need_final:
                final = flow.sample_generator(generator, noise, cond, times)
            x_t = noise
            if k:  # the level made on the device: a copy from the host would make the host wait for the GPU
                x_t = flow.renoise(final, eps, torch.full((noise.shape[0],), float(times[k]), device=noise.device))
    return x_t, float(times[k]), final


def valid(images: torch.Tensor) -> torch.Tensor:
    """Decoded images as every reward sees them: clamped to the valid range [-1, 1], as evaluation (8-bit images) and
    the released code clamp them. A pixel outside the range passes no reward gradient back (clamp's gradient is 0
    there), so RL cannot raise a reward by pushing pixels past what an image can show."""
    return images.clamp(-1, 1)


def latent_shape_of(model) -> tuple[int, int, int]:
    c = backbone_of(model).config
    return c.in_channels, c.sample_size, c.sample_size


def parted(cond: flow.Cond, part: slice) -> flow.Cond:
    """The conditioning of a part of a batch (a micro-batch)."""
    return tuple(c[part] for c in cond)


# --- the method -----------------------------------------------------------------------------------------------


@dataclass
class Models:
    """What a run trains and consults: generator G, fake score, real score, text encoder, and for RT-DM and RL the
    VAE decoder (latents -> images in [-1, 1]) and the reward (images, texts -> scores)."""
    generator: torch.nn.Module
    fake: torch.nn.Module | None  # None: RL alone, or DynaDG's released form (the fake is the real at fake_scale)
    real: torch.nn.Module
    encode: callable  # list[str] -> cond
    uncond: tuple
    decode: callable = None
    reward: torch.nn.Module | None = None
    latent_shape: tuple[int, int, int] | None = None  # default: the backbone's (in_channels, sample_size, sample_size)
    times: torch.Tensor | None = None  # the generator's flow times; default flow.generator_times (a VP teacher's own)
    max_t: float = 1.0  # the noisiest flow time the scores are defined at (< 1 for a VP schedule such as SDXL's)


@dataclass
class Policy:
    """The generator as an RL objective that draws its own samples sees it (dmdr.rl.Sampling): its few-step times
    and text encoder, the run's seeded draws (made for the whole batch, the same on every process, which keeps
    its part), the size of a group of one prompt's samples (consecutive in the batch), and, for objectives that
    ask for it (`needs_reference`), a frozen copy of the generator at the stage's start."""
    generator: torch.nn.Module
    times: torch.Tensor
    encode: callable  # list[str] -> cond
    draws: Draws
    latent_shape: tuple[int, int, int]
    group: int = 1
    reference: torch.nn.Module | None = None

    def noise(self) -> torch.Tensor:
        """Fresh starting noise at times[0], one per sample of this process's part of the batch."""
        scale = flow.start_noise_scale(float(self.times[0]))
        noise = self.randn()
        return noise if scale == 1.0 else noise * scale

    def randn(self) -> torch.Tensor:
        """A standard normal latent per sample of this process's part of the batch."""
        return self.draws.randn(self.latent_shape)

    def sample(self, noise: torch.Tensor, cond, upto: int | None = None) -> torch.Tensor:
        """The few-step ODE from `noise` (flow.sample_generator): the final x0, or the point at times[upto]."""
        return flow.sample_generator(self.generator, noise, cond, self.times, upto)


class DMDR:
    """One DMDR run: per step, `ttur` fake-score updates (`fake_step`), DynaDG's update in its paper form, then one
    generator update (`generator_step`) with L = dmd_weight * L_DMD(RT-DM weights) + lambda * L_RL. The engine
    (dmdr.loop.Engine) fits each loss; `draws` makes every random draw."""

    def __init__(self, cfg: DistillParams, models: Models, prompts: list[str], draws: Draws, engine: Engine):
        self.cfg, self.models, self.prompts, self.draws, self.engine = cfg, models, prompts, draws, engine
        self.distill, self.rl = cfg.dmd_weight > 0, cfg.rl.weight > 0
        self.dynadg, self.shared = cfg.dynadg.form != "off", cfg.dynadg.form == "released"
        self.name = f"{'DMD' if self.distill else ''}{'+RL' if self.rl else ''}"
        self.real = models.real.requires_grad_(False).eval()
        self.lora = add_lora(self.real, cfg.dynadg.rank, cfg.dynadg.form) if self.dynadg else []
        self.fake = self.real if self.shared else models.fake
        if self.distill and self.fake is None:
            raise ValueError("DMD needs a fake score (Models.fake) unless DynaDG's released form shares the real's "
                             "LoRA")
        if (self.rl or cfg.rtdm.enabled) and (models.reward is None or models.decode is None):
            raise ValueError("RT-DM and RL need Models.reward and Models.decode")
        self.objective = rl.make(cfg.rl) if self.rl else None
        self.generator = models.generator
        self.times = models.times if models.times is not None else flow.generator_times(cfg.generator_steps,
                                                                                         cfg.shift)
        self.t_max = min(cfg.t_max, models.max_t)
        self.latent_shape = models.latent_shape or latent_shape_of(models.generator)
        self.reused = None  # released: the last fake update's rollout, for the generator update
        self.group = cfg.samples_per_prompt if cfg.rtdm.normalise == "prompt" else 0  # RT-DM's normalised runs
        self.beta = cfg.rtdm.beta  # RT-DM's temperature; with rtdm.target_ess, set by `calibrate` before training
        # RL on the DMD turn's x0 (ReFL, hinge), or on samples the objective draws itself (rl.Sampling)
        self.own_samples = self.rl and rl.samples_itself(self.objective)
        self.reference = (copy.deepcopy(plain(models.generator)).requires_grad_(False).eval()
                          if getattr(self.objective, "needs_reference", False) else None)
        if len(range(cfg.batch)[engine.mine]) % cfg.samples_per_prompt:
            raise ValueError(f"samples_per_prompt {cfg.samples_per_prompt} does not divide this process's part of the "
                             f"batch ({cfg.batch} over the processes): a prompt's samples would be split")

    # --- what the engine prepares ---------------------------------------------------------------------------------

    @property
    def networks(self) -> list:
        """The diffusion models, held in training precision."""
        return [m for m in (self.generator, self.fake, self.real, self.reference) if m is not None]

    @property
    def backpropagated(self) -> list:
        """The models backward runs through (RL: the reward too)."""
        return self.networks + [m for m in (self.models.reward,) if m is not None]

    @property
    def called(self) -> list:
        """Every model a step calls (the decoder too)."""
        return self.backpropagated + [m for m in (self.models.decode,) if isinstance(m, torch.nn.Module)]

    def trainees(self) -> list[Trainee]:
        """The generator; the fake score; DynaDG's LoRA on the real score (the released form's is the fake's)."""
        cfg = self.cfg
        out = [Trainee("generator", "generator", self.generator, list(self.generator.parameters()),
                       cfg.generator_lr, cfg.generator_weight_decay)]
        if self.distill and not self.shared:
            out.append(Trainee("fake", "fake", self.fake, list(self.fake.parameters()), cfg.fake_lr,
                               label="fake-score"))
        if self.dynadg:  # its LoRA is trained state, so it goes into checkpoints
            out.append(Trainee("fake", "real", self.real, self.lora, cfg.fake_lr, label="fake-score") if self.shared
                       else Trainee("dynadg", "real", self.real, self.lora, cfg.dynadg.lr, label="DynaDG"))
        return out

    def bind(self, prepared: dict) -> None:
        self.generator = prepared["generator"]
        self.policy = Policy(self.generator, self.times, self.models.encode, self.draws, self.latent_shape,
                             self.cfg.samples_per_prompt, self.reference)
        if self.shared:
            self.fake = self.real = prepared.get("fake", self.real)
        else:
            self.fake, self.real = prepared.get("fake", self.fake), prepared.get("dynadg", self.real)
        # DynaDG's adapter is scaled on the plain module, unwrapped once: each unwrap walks every module and reads
        # package metadata (about 1 ms), host time that a launch-bound step would otherwise pay several times a step
        self.dynadg_model = self.engine.unwrap(self.real) if self.dynadg else None

    def evaluated(self):
        """The generator as the curves sample it."""
        self.generator.eval()
        return self.engine.unwrap(self.generator)

    def finish(self, gathered: dict) -> None:
        """The trained models into `models` (those FSDP sharded, by role: gathered back into plain modules)."""
        for role, m in gathered.items():
            setattr(self.models, role, m)
        if self.dynadg:
            set_lora_scale(self.models.real, 0.0)

    # --- one step ---------------------------------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        """One generator step: `ttur` fake-score updates, DynaDG's (paper form), then the generator's."""
        logs, scale = {}, 0.0
        if self.distill:
            for i in range(self.cfg.ttur):
                logs["loss_fake"], x0, cond = self.fake_step(step, last=i == self.cfg.ttur - 1)
            scale = dynadg_scale(step, self.cfg.dynadg.steps, self.cfg.dynadg.scale) if self.dynadg else 0.0
            if self.dynadg and not self.shared and scale > 0:
                self.dynadg_step(step, x0, cond)
            if self.dynadg:
                logs["dynadg_scale"] = scale
        return logs | self.generator_step(step, scale)

    def fake_step(self, step: int, last: bool):
        """The fake score's diffusion loss on the generator's samples (two time-scale: `ttur` of these a step).
        Returns its loss and the samples."""
        cfg, autocast = self.cfg, self.engine.autocast
        self.generator.eval()
        self.fake.train()
        texts, cond = self.batch()
        with torch.no_grad(), autocast:
            x_t, t_k, final = self.rollout(cond, cfg.rtdm.tilt_fake or (cfg.rollout_reuse and cfg.rtdm.enabled))
            w = (fake_weights(self.engine.gather(self.reward(final, texts)), self.beta, self.group)[self.draws.mine]
                 if cfg.rtdm.tilt_fake else None)
        # released: the generator update reuses the last inner step's rollout, and in one batch its call, so that
        # call is made once, with gradient and in train mode as the update would make it, and only its detached
        # sample trains the fake (in micro-batches the update makes it again, a part at a time)
        reuse = cfg.rollout_reuse and last
        keep = reuse and len(self.engine.micro) == 1
        if reuse:
            self.generator.train()
        with torch.set_grad_enabled(keep), autocast:
            x0 = flow.generator_step(self.generator, x_t, t_k, cond)
        if reuse:
            self.reused = (texts, cond, x_t, t_k, final, x0 if keep else None)
        x0 = x0.detach()
        if self.shared:
            set_lora_scale(self.dynadg_model, cfg.dynadg.fake_scale)
        loss, _ = self.engine.fit("fake", self.score_loss(self.fake, x0, cond, step, w), step)
        return loss, x0, cond

    def dynadg_step(self, step: int, x0, cond) -> None:
        """DynaDG (paper form): the real score's own LoRA learns the generator's samples, so p_real overlaps
        p_fake."""
        set_lora_scale(self.dynadg_model, 1.0)
        self.engine.fit("dynadg", self.score_loss(self.real, x0, cond, step), step)

    def generator_step(self, step: int, scale: float) -> dict:
        """Eq. 3 with Eq. 1 (RT-DM-weighted, Eq. 4) as its distillation term, at the generator's rollout point; the
        real score at DynaDG's `scale`."""
        cfg, autocast, logs = self.cfg, self.engine.autocast, {}
        self.generator.train()
        takes_x0 = self.distill or not self.own_samples  # the DMD turn's x0 is taken
        if self.reused is not None:  # released: the last fake update's rollout (and its call with grad)
            (texts, cond, x_t, t_k, final, kept), self.reused = self.reused, None
        else:
            texts, cond = self.batch()
            with torch.no_grad(), autocast:
                x_t, t_k, final = self.rollout(cond, cfg.rtdm.enabled) if takes_x0 else (None, None, None)
            kept = None
        if self.own_samples:
            with torch.no_grad(), autocast:
                own = self.objective.sample(self.policy, texts, self.reward_terms)
        if self.distill:
            weight = None
            if cfg.rtdm.enabled:
                with torch.no_grad(), autocast:
                    r_final = self.engine.gather(self.reward(final, texts))
                weights = rtdm_weights(r_final, self.beta, cfg.rtdm.form, self.group)
                weight = weights[self.draws.mine]
                logs["reward_rollout"], logs["rtdm_ess"] = r_final.mean(), effective_sample_size(weights, self.group)
            t = cfg.t_min + (self.t_max - cfg.t_min) * self.levels(step, cfg.dynars.enabled)
            noise = self.draws.randn(self.latent_shape)
            guidance = cfg.real_cfg + cfg.cfg_jitter * (2 * self.draws.rand() - 1)

        def loss_of(part):
            cond_part, logged = parted(cond, part), {}
            loss_dmd = loss_rl = torch.zeros((), device=self.engine.device)
            with autocast:
                x0 = (kept if kept is not None else flow.generator_step(self.generator, x_t[part], t_k, cond_part)
                      if takes_x0 else None)
                if self.distill:
                    x_t_part = flow.renoise(x0.detach(), noise[part], t[part])
                    x0_real, x0_fake = self.scores(x_t_part, t[part], cond_part, guidance[part], scale)
                    if self.dynadg and scale > 0 and self.logged(step):
                        logged["dynadg_pull"] = self.dynadg_pull(x_t_part, t[part], cond_part, guidance[part],
                                                                 x0_real, x0_fake)
                    loss_dmd = dmd_loss(x0, dmd_gradient(x0.detach().float(), x0_real.float(), x0_fake.float()),
                                        None if weight is None else weight[part])
                    logged["loss_dmd"] = loss_dmd
                if self.own_samples:
                    loss_rl, logged["reward_x0"] = self.objective.loss_on(
                        self.policy, {k: v[part] for k, v in own.items()}, self.reward_terms)
                elif self.rl:
                    loss_rl, logged["reward_x0"] = self.objective.loss(x0, texts[part], self.reward_terms)
                return joint_loss(loss_dmd, loss_rl, cfg.rl.weight, cfg.dmd_weight), logged
        return logs | self.engine.fit("generator", loss_of, step)[1]

    # --- its parts ------------------------------------------------------------------------------------------------

    def scores(self, x_t, t, cond, guidance, scale: float):
        """The real score's (guided, at DynaDG's LoRA `scale`) and the fake score's clean predictions at x_t."""
        with torch.no_grad():
            self.fake.eval()
            if self.shared:
                set_lora_scale(self.dynadg_model, self.cfg.dynadg.fake_scale)
            x0_fake = flow.x0_from_velocity(x_t, self.fake(x_t, t, *cond), t)
            if self.dynadg:
                set_lora_scale(self.dynadg_model, scale)
            v_real = flow.guided_velocity(self.real, x_t, t, cond, self.models.uncond, guidance)
            return flow.x0_from_velocity(x_t, v_real, t), x0_fake

    def logged(self, step: int) -> bool:
        """Whether this step's logs reach a curve row: the loop writes a row every `log_every` steps and at the end,
        with the logs of the step before it (so a diagnostic that costs network calls is made only then)."""
        return (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps

    def dynadg_pull(self, x_t, t, cond, guidance, x0_real, x0_fake) -> torch.Tensor:
        """How far DynaDG's LoRA moves the real score toward the fake: mean |x0_real(LoRA) - x0_real(no LoRA)| as a
        fraction of the DMD signal mean |x0_fake - x0_real(no LoRA)| (0: no pull; 1: as far as the signal)."""
        with torch.no_grad():
            set_lora_scale(self.dynadg_model, 0.0)
            plain_real = flow.x0_from_velocity(
                x_t, flow.guided_velocity(self.real, x_t, t, cond, self.models.uncond, guidance), t)
        return (x0_real - plain_real).abs().mean() / (x0_fake - plain_real).abs().mean().clamp_min(1e-12)

    @torch.no_grad()
    def calibrate(self, seed: int) -> float:
        """rtdm.target_ess's rule: beta from the reward's spread on the start generator's own samples, one batch of
        the training prompts (samples_per_prompt each) from draws of their own (a generator seeded apart, so the
        run's draws are left as they are and a resumed run, calibrated before its checkpoint loads, finds the same
        beta): the beta at which the weights keep that fraction of each normalised run."""
        probe = dataclasses.replace(self.policy, draws=Draws(seed + 7919, self.cfg.batch, slice(None),
                                                             self.engine.device))
        texts = probe.draws.prompts(self.prompts, self.cfg.samples_per_prompt)
        noise = probe.noise()
        self.generator.eval()
        with self.engine.autocast:
            final = probe.sample(noise, self.models.encode(texts))
            r = self.reward(final, texts)
        self.beta = beta_for_ess(r, self.cfg.rtdm.target_ess, self.group, self.cfg.rtdm.form)
        return self.beta

    def batch(self):
        texts = self.draws.prompts(self.prompts, self.cfg.samples_per_prompt)
        with torch.no_grad():
            cond = self.models.encode(texts)
        return texts, cond

    def rollout(self, cond, need_final: bool):
        """The generator's rollout point from fresh noise at times[0] (`rollout`)."""
        return rollout(self.generator, self.policy.noise(), cond, self.times, self.draws.rng, self.cfg.rollout,
                       need_final, self.policy.randn)

    def levels(self, step: int, dynars: bool) -> torch.Tensor:
        """Noise levels in [0, 1] for this process's part of the batch: DynaRS's annealed Beta at this step, or
        uniform."""
        if not dynars:
            return self.draws.rand()
        return self.draws.beta(*dynars_beta(step, self.cfg.dynars.steps, self.cfg.dynars.a, self.cfg.dynars.b))

    def score_loss(self, model, x0, cond, step: int, weight=None):
        """The diffusion loss of a score `model` on samples `x0` at fresh noise levels (within the scores' range;
        released: from DynaRS's Beta too) and noise, drawn now for the whole batch, as a function of the part of
        the batch it is taken on (Engine.fit)."""
        s_t = self.levels(step, self.cfg.dynars.enabled and self.cfg.dynars.fake_score)
        s_t = s_t if self.models.max_t == 1.0 else s_t * self.models.max_t
        noise = self.draws.randn(self.latent_shape)

        def loss_of(part):
            with self.engine.autocast:
                return flow.flow_matching_loss(model, x0[part].float(), parted(cond, part), s_t[part], noise[part],
                                               None if weight is None else weight[part]), {}
        return loss_of

    def reward(self, latents, texts) -> torch.Tensor:
        return self.models.reward(valid(self.models.decode(latents.float())), texts)

    def reward_terms(self, latents, texts) -> list[tuple[float, torch.Tensor]]:
        """(w_k, r_k) of the reward's terms on the decoded latents (`valid` images), with gradient. With
        `reward_chunk`, decoded that many samples at a time, each chunk recomputed in backward, so that the decoder's
        full-resolution activations are held for one chunk at a time (the reward models then score the whole batch
        at once)."""
        n = self.cfg.reward_chunk
        if not n or len(latents) <= n:
            images = self.models.decode(latents.float())
        else:
            from torch.utils.checkpoint import checkpoint
            images = torch.cat([checkpoint(self.models.decode, z.float(), use_reentrant=False)
                                for z in latents.split(n)])
        return [(w, r(valid(images), texts)) for w, r in weighted_terms(self.models.reward)]


# settings added after models were trained with their default: recorded only when set otherwise, so that the records
# (and resumable checkpoints) of those models stay theirs
ADDED_LATER = {"prompts": "world"}


def what_trains(cfg: DistillParams) -> dict:
    """The settings that define what a run trains: all of `cfg` but how the batch is passed (micro_batches), which,
    as the number of processes, changes the result only by float rounding (and ADDED_LATER's at their default)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k != "micro_batches" and ADDED_LATER.get(k, object()) != v}


def training_record(cfg: DistillParams, seed: int, prompts: list[str], **identity) -> dict:
    """What defines a trained model, written beside it (dmdr.sampler.TRAINING_FILE): the stage's resolved settings
    (what_trains), the seed, the training prompts (by content) and `identity`, what else it was trained from (the
    teacher, reward models, the stage or recipe it starts from). Its fingerprint decides whether a later run may
    reuse it; `trained_with` records the software, which does not define it."""
    import diffusers
    settings = identity | {"stage": what_trains(cfg), "seed": seed,
                           "train_prompts": {"count": len(prompts),
                                             "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}}
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
    return {"fingerprint": resume.fingerprint(settings), "settings": settings,
            "trained_with": {"torch": torch.__version__, "diffusers": diffusers.__version__}}


def train(cfg: DistillParams, models: Models, prompts: list[str], seed: int, curve_fn=None,
          curve_path: Path | None = None, checkpoint_dir: Path | None = None, run_identity: str = "",
          tracking: Tracking | None = None) -> list[dict]:
    """DMDR on `models` (the trained ones replaced in place at the end) by the generic loop (dmdr.loop.run), over
    `prompts`, every draw from `seed`. `curve_fn(generator, step)` returns held-out numbers logged every `log_every`
    generator steps, written to `curve_path` as CSV (values that are image arrays, N x H x W x C uint8, go to the
    trackers instead). Returns the logged rows.

    With `checkpoint_dir`, the whole state is saved there every `checkpoint_every` steps and a run finding a
    checkpoint of the same settings resumes from it (dmdr.resume); `run_identity` names what else defines the run
    (the real runner's training record: teacher, reward models, the stage it starts from). With `tracking`, each
    logged row also goes to experiment trackers (TensorBoard, W&B, ...). A non-finite loss skips its update and is
    counted (`nonfinite_skipped` in the rows); `max_nonfinite` of them in a row stop the run.

    Under several processes (accelerate: DDP or FSDP) `cfg.batch` is the global batch: every process draws
    the whole batch's prompts and noise from the same generators and keeps its own slice, batch-wide quantities
    (RT-DM's softmax weights, the non-finite check, logged losses) are gathered, and gradients are averaged; so N
    processes compute what one process computes at the same global batch; with `micro_batches` each process passes
    its part in that many micro-batches (the draws and batch-wide quantities of the whole batch first), the
    gradients summed and synchronised once. Under FSDP (configs/accelerate/fsdp.yaml) the trained models are
    sharded and, at the end, gathered back into plain modules in `models` on every process; under DeepSpeed ZeRO 1
    or 2 (configs/accelerate/deepspeed.yaml) each trained model is an engine of its own (dmdr.zero), its fp32
    weights and AdamW states partitioned over the processes.
    """
    torch.manual_seed(seed)
    engine = Engine(cfg, tracking, checkpoint_dir)
    draws = Draws(seed, cfg.batch, engine.mine, engine.device)
    method = DMDR(cfg, models, prompts, draws, engine)
    engine.prepare(method)
    if cfg.rtdm.enabled and cfg.rtdm.target_ess:
        print(f"RT-DM: beta {method.calibrate(seed):.4g} keeps {cfg.rtdm.target_ess:g} of each run's samples")
    ckpt = (resume.Checkpoint(checkpoint_dir, cfg.checkpoint_every,
                              resume.fingerprint(what_trains(cfg), seed, resume.texts_digest(prompts),
                                                 *((run_identity,) if run_identity else ())), draws.rng, draws.prng)
            if checkpoint_dir is not None and cfg.checkpoint_every else None)
    rows = loop.run(engine, method, cfg.steps, cfg.log_every, curve_fn, curve_path, ckpt)
    method.finish(engine.finish())
    engine.end_tracking()
    return rows


def init_models(teacher, encode, uncond, start=None, start_fake=None, cfg: DistillParams | None = None,
                decode=None, reward=None, latent_shape=None) -> Models:
    """Generator and fake score start as copies of `start` (default: the teacher, DMD2) or of a parent recipe's
    generator and fake score; the real score is the teacher, or `start` itself when cfg.real == 'init'."""
    cfg = cfg or DistillParams()
    start = teacher if start is None else start
    real = start if cfg.real == "init" else teacher
    # a start may come frozen (a fused real score), or as a LoRA generator (merged: a new adapter trains on it)
    generator = copy.deepcopy(plain(start)).train().requires_grad_(True)
    if cfg.generator_lora.enabled:
        add_generator_lora(generator, cfg.generator_lora.rank, cfg.generator_lora.alpha)
    if cfg.generator_cfg > 1:
        generator = flow.Guided(generator, uncond, cfg.generator_cfg)
    fake = None
    if cfg.dmd_weight > 0 and cfg.dynadg.form != "released":
        fake = copy.deepcopy(start_fake if start_fake is not None else start).train().requires_grad_(True)
    return Models(generator=generator, fake=fake, real=copy.deepcopy(real), encode=encode, uncond=uncond,
                  decode=decode, reward=reward, latent_shape=latent_shape)


def distill_stage(cfg: DistillParams, teacher, prompts: list[str], seed: int, directory: Path, checkpoint: Path,
                  reward=None, start=None, start_fake=None, dynadg_lora: Path | None = None, curve_fn=None,
                  curve_path: Path | None = None, run_identity: str = "", tracking: Tracking | None = None,
                  **export) -> tuple[torch.nn.Module, torch.nn.Module | None, list[dict]]:
    """One stage of distillation on any teacher (dmdr.teacher.Teacher): the models from the teacher, or from a
    previous stage's generator and fake score (`start`, `start_fake`; the released DynaDG form continues the shared
    LoRA saved in the file `dynadg_lora`), trained (resuming from `checkpoint`), then exported by the main process to
    `directory` in the teacher's own format (`export`: what else its export takes). Returns the generator and the
    fake score, for a next stage, and the loop's logged rows."""
    from accelerate import PartialState
    models = init_models(teacher.model, teacher.encode, teacher.uncond, start, start_fake, cfg, decode=teacher.decode,
                         reward=reward if cfg.rl.weight > 0 or cfg.rtdm.enabled else None,
                         latent_shape=teacher.latent_shape)
    models.times, models.max_t = teacher.generator_times(cfg.generator_steps, cfg.shift), teacher.max_t
    shared = cfg.dynadg.form == "released"
    if shared and dynadg_lora is not None:
        load_lora_state(models.real, cfg.dynadg.rank, load_file(dynadg_lora))
    rows = train(cfg, models, prompts, seed, curve_fn, curve_path, checkpoint, run_identity, tracking)
    fake = fused_copy(models.real, cfg.dynadg.fake_scale) if shared else models.fake
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        teacher.export(models.generator, fake, directory, cfg, dynadg_lora=lora_state(models.real) if shared else None,
                       **export)
        shutil.rmtree(checkpoint, ignore_errors=True)  # exported: nothing left to resume
    state.wait_for_everyone()
    return models.generator, fake, rows
