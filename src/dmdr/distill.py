"""DMDR: distribution matching distillation (Eq. 1) joined with reinforcement learning (Eq. 3), with the stage-1
tools RT-DM (Eq. 4), DynaDG and DynaRS. One training loop; recipes in params.yaml configure it.

Eq. 1 (DMD): the generator's gradient is the difference of the fake and real scores at a renoised sample,
    grad_theta KL = E_t,x [ w_t (s_fake(x_t, t) - s_real(x_t, t)) dG/dtheta ],
written, as in the released code, with the scores' clean-sample predictions and DMD's per-sample normaliser.
The fake score is trained with the diffusion loss on generator samples (two time-scale: `ttur` fake updates per
generator update); samples come by backward simulation of the generator's own few-step ODE (DMD2).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import flow, resume, sharded, zero
from .config import DistillParams
from .files import write_csv
from .rewards import weighted_terms
from .sharded import inner_optimizer, params_of


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


def rtdm_weights(reward: torch.Tensor, beta: float, form: str = "exp") -> torch.Tensor:
    """Eq. 4, RT-DM: per-sample weights of the DMD loss from the reward of each sample's full few-step output (no
    reward gradient). `exp`: w_i = B softmax(r / beta)_i, self-normalised importance weights of the tilted target
    p_beta(x) = p_real(x) exp(r(x) / beta) / Z. `reward`: w_i = r_i / mean(r), the reward itself as the weight.

    Derivation, and what weighting alone does: KL(p_fake || p_beta) = KL(p_fake || p_real) - E_fake[r] / beta + c,
    whose gradient needs grad r. Without it, weighting the generator's DMD gradient re-weights which samples learn
    (high-reward ones faster) but keeps p_fake = p_real a fixed point: there s_fake - s_real = 0 for every sample.
    The tilted optimum itself follows when the fake score also learns the down-weighted generator distribution
    p_fake(x) exp(-r(x) / beta) (`fake_weights`): DMD then drives p_fake exp(-r / beta) to p_real, i.e. p_fake to
    p_beta. Both are tested on a one-dimensional Gaussian (tests/test_dmdr_math.py)."""
    r = reward.detach().float()
    if form == "exp":
        return len(r) * torch.softmax(r / beta, dim=0)
    if form == "reward":
        r = r.clamp_min(0)
        return r / r.mean().clamp_min(1e-8)
    raise ValueError(f"unknown RT-DM weight form {form!r}")


def fake_weights(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Weights of the fake score's diffusion loss that make it model p_fake(x) exp(-r(x) / beta) (see rtdm_weights):
    w_i = B softmax(-r / beta)_i."""
    return len(reward) * torch.softmax(-reward.detach().float() / beta, dim=0)


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


def rl_loss(reward: torch.Tensor | list[tuple[float, torch.Tensor]], form: str = "refl",
            margin: float = 0.7) -> torch.Tensor:
    """ReFL on the generator's x0 for r = sum_k w_k r_k (a reward, or the (w_k, r_k) of a sum): -r (the paper), or
    the released code's hinge sum_k w_k relu(margin - r_k), each reward under its own hinge."""
    parts = [(1.0, reward)] if isinstance(reward, torch.Tensor) else reward
    if form == "refl":
        return -sum(w * r for w, r in parts).mean()
    if form == "hinge":
        return sum(w * torch.relu(margin - r).mean() for w, r in parts)
    raise ValueError(f"unknown RL loss {form!r}")


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


def parted(cond: flow.Cond, part: slice) -> flow.Cond:
    """The conditioning of a part of a batch (a micro-batch)."""
    return tuple(c[part] for c in cond)


# --- LoRA adapters (peft through diffusers): DynaDG's, and the generator's option -------------------------------

LORA = "dynadg"
GENERATOR_LORA = "generator"
# the released SD3 scripts put both of their LoRAs on the attention projections of the joint blocks
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def attention_targets(backbone) -> list[str]:
    """The ATTENTION projections a backbone has (a UNet has no context stream)."""
    return sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
                   for n, _ in backbone.named_modules()} & set(ATTENTION))


def add_lora(model, rank: int, form: str = "paper"):
    """DynaDG's peft LoRA adapter (once); only it is trainable. Paper form: on the attention and feed-forward
    projections. Released form, as train_sd3_refl_deepspeed.py's shared LoRA: on the attention projections only,
    SD3's context stream included, Gaussian init."""
    from peft import LoraConfig
    backbone = model.backbone
    backbone.requires_grad_(False)
    if LORA not in (getattr(backbone, "peft_config", None) or {}):
        config = (LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                             target_modules=attention_targets(backbone)) if form == "released" else
                  LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
        backbone.add_adapter(config, adapter_name=LORA)
    params = [p for n, p in backbone.named_parameters() if "lora_" in n]
    for q in params:
        q.requires_grad_(True)
    return params


def add_generator_lora(model, rank: int, alpha: float) -> None:
    """The generator as a LoRA on a frozen copy of its start (the released code's `--use-lora-gen`: rank 64, alpha
    128, Gaussian init, attention projections); the adapter starts at zero, so the generator starts as its start."""
    from peft import LoraConfig
    backbone = backbone_of(model)
    backbone.requires_grad_(False)
    backbone.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=attention_targets(backbone)), adapter_name=GENERATOR_LORA)


def set_lora_scale(model, scale: float) -> None:
    """DynaDG's adapter at `scale` (its alpha is its rank: the scale is the multiplier itself). Its layers share one
    0-dim tensor, set in place: compiled blocks take it as an input, so the annealed scale does not recompile them,
    and a call costs no walk over the modules. A CPU scalar, so that CUDA kernels read it at full precision."""
    backbone = model.backbone
    if not hasattr(backbone, "_dynadg_layers"):  # plain attributes: not in the state dict
        from peft.tuners.lora import LoraLayer
        backbone._dynadg_layers = [m for m in backbone.modules() if isinstance(m, LoraLayer) and LORA in m.scaling]
        backbone._dynadg_scale = torch.zeros(())
    backbone._dynadg_scale.fill_(scale)
    for m in backbone._dynadg_layers:  # each call: peft's own set_scale would leave a float there
        m.scaling[LORA] = backbone._dynadg_scale


def fused_copy(model, scale: float = 1.0):
    """A plain fp32 copy of a LoRA'd model with its adapter merged in at `scale` (what a checkpoint stores)."""
    out = copy.deepcopy(model)
    backbone = backbone_of(out)
    (name,) = backbone.peft_config
    backbone.set_adapters([name], weights=[1.0])
    backbone.fuse_lora(lora_scale=scale)
    backbone.unload_lora()
    return out.float()


def plain(model):
    """The model as a checkpoint stores it: a LoRA generator merged into its base, anything else as it is."""
    return fused_copy(model) if getattr(backbone_of(model), "peft_config", None) else model


def lora_state(model) -> dict[str, torch.Tensor]:
    """DynaDG's adapter weights (to continue the released form's shared LoRA in the next stage)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model.backbone, adapter_name=LORA).items()}


def load_lora_state(model, rank: int, state: dict[str, torch.Tensor]) -> None:
    """Give `model` DynaDG's adapter (rank `rank`; the form whose layers the saved state has) with the weights of
    `lora_state`."""
    from peft import set_peft_model_state_dict
    saved = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    if saved != rank:
        raise ValueError(f"the saved DynaDG LoRA has rank {saved}, the recipe asks for dynadg.rank {rank}")
    add_lora(model, rank, "paper" if any(".ff.net." in k for k in state) else "released")
    result = set_peft_model_state_dict(model.backbone, state, adapter_name=LORA)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"the saved DynaDG LoRA does not fit this model: {result.unexpected_keys[:3]} ...")


def master_weights(model, mixed_precision: str, fsdp: bool = False) -> None:
    """How a model's weights are held in training. bf16 (autocast): trained weights in fp32 (bf16 AdamW steps at
    the released learning rates round away to nothing), frozen ones in bf16 as the released code stores them
    (autocast computes in bf16 anyway). bf16-weights: every weight in bf16 and no autocast, so no per-op casts; the
    optimizer steps fp32 masters of the trained ones (MasterWeights). Under FSDP, bf16-weights holds them as bf16
    does: the fp32 shards are the masters, and FSDP's own mixed precision (fsdp_mixed_precision) gathers them in
    bf16 to compute."""
    every_weight_bf16 = mixed_precision == "bf16-weights" and not fsdp
    for p in model.parameters():
        if every_weight_bf16 or (mixed_precision != "no" and not p.requires_grad):
            p.data = p.data.to(torch.bfloat16)
        elif p.requires_grad:
            p.data = p.data.float()


def fsdp_mixed_precision(mixed_precision: str):
    """FSDP2's mixed precision policy for `mixed_precision`. bf16-weights: each unit's fp32 shards gathered in bf16
    and computed in bf16 without autocast, gradients reduced in fp32 into the fp32 shards, which AdamW steps (the
    masters, with no copy). Inputs are not cast by FSDP: the model wrappers cast their states (models.computed_in),
    not the time, which in bf16 would move the noise level by up to 1/256 of itself. Otherwise none (autocast, or
    fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mixed_precision != "bf16-weights":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


class MasterWeights:
    """fp32 master copies of a model's bf16 trained weights (mixed_precision bf16-weights): the optimizer steps the
    masters, the model computes with their bf16 roundings."""

    def __init__(self, params):
        self.params = list(params)
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.params]

    @torch.no_grad()
    def take_grads(self, group_bytes: int = 1 << 29):
        """The model's bf16 gradients (averaged over processes by then) as the masters' fp32 ones, a group of up to
        512 MiB of fp32 gradients at a time: one fused copy per group (few kernel launches), each group's bf16
        gradients let go. A generator: it yields each group's masters once their gradients are converted, so that
        the caller can step and free them before the next group is converted."""
        group, size = [], 0
        for p, m in zip(self.params, self.masters):
            if p.grad is not None:
                group.append((p, m))
                size += m.numel() * m.element_size()
            if size >= group_bytes:
                yield self._to_masters(group)
                group, size = [], 0
        if group:
            yield self._to_masters(group)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the model's bf16 gradients, accumulated in fp32: that of their fp32 copies."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))

    @torch.no_grad()
    def step(self, opt, max_norm: float | None = None, group_bytes: int = 1 << 29) -> None:
        """One step of `opt` (over the masters) from the model's bf16 gradients, then the masters' bf16 roundings
        into the model. A group of up to 512 MiB of fp32 gradients at a time is converted, clipped as the norm of
        all gradients asks (torch's clip_grads_with_norm_, as clip_grad_norm_), stepped (AdamW steps only the
        parameters that have gradients) and freed: fp32 gradients of one group are held at a time, not of the whole
        model (3.8 GiB less at the step of a 2 B-parameter generator, where its memory peaks)."""
        norm = None if max_norm is None else self.grad_norm()
        for masters in self.take_grads(group_bytes):
            if norm is not None:
                torch.nn.utils.clip_grads_with_norm_(masters, max_norm, norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.give_weights()

    @staticmethod
    def _to_masters(group) -> list[torch.nn.Parameter]:
        """One fused copy of the group's bf16 gradients into new fp32 ones on the masters (returned); the bf16 ones
        let go."""
        fp32 = [torch.empty_like(m) for _, m in group]
        torch._foreach_copy_(fp32, [p.grad for p, _ in group])
        for (p, m), g in zip(group, fp32):
            m.grad, p.grad = g, None
        return [m for _, m in group]

    @torch.no_grad()
    def give_weights(self) -> None:
        """The masters' bf16 roundings into the model, in one fused copy."""
        if self.params:
            torch._foreach_copy_(self.params, self.masters)

    def release(self) -> None:
        """The model takes the fp32 masters themselves: after training it holds fp32 trained weights, as under
        autocast."""
        for p, m in zip(self.params, self.masters):
            p.data = m.data


# --- the loop -------------------------------------------------------------------------------------------------


def what_trains(cfg: DistillParams) -> dict:
    """The settings that define what a run trains: all of `cfg` but how the batch is passed (micro_batches), which,
    as the number of processes, changes the result only by float rounding."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "micro_batches"}


def backbone_of(model):
    """The diffusers backbone inside a velocity model (or its CFG wrapper)."""
    return (model.model if isinstance(model, flow.Guided) else model).backbone


def optimizer(params, lr: float, cfg: DistillParams, weight_decay: float = 0.0):
    """AdamW over the trainable `params`, or bitsandbytes' 8-bit AdamW for real-scale memory."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only); "
                              "it is not among dmdr's pinned dependencies") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # on GPUs the fused kernel: faster, and no parameter-sized temporaries (the foreach form's peak memory)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)


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
class Tracking:
    """Experiment trackers that the loop's logged rows also go to: accelerate's (`log_with`: 'tensorboard', 'wandb',
    'dvclive', ... or GeneralTracker instances), a run `name` with its settings (`config`: flat, scalar values),
    local logs under `directory`."""
    log_with: list
    directory: Path
    name: str
    config: dict = dataclasses.field(default_factory=dict)


def log_images(trackers, images: dict[str, np.ndarray], step: int) -> None:
    """Images (N, H, W, C uint8 arrays) to the trackers that take them (accelerate's TensorBoard, W&B, ClearML, ...;
    TensorBoard is told the layout, the others take the images one by one)."""
    for t in trackers:
        if hasattr(t, "log_images"):
            t.log_images(images, step=step, **({"dataformats": "NHWC"} if t.name == "tensorboard" else {}))


def train(cfg: DistillParams, models: Models, prompts: list[str], seed: int, curve_fn=None,
          curve_path: Path | None = None, checkpoint_dir: Path | None = None, run_identity: str = "",
          tracking: Tracking | None = None) -> list[dict]:
    """The one training loop: fake-score updates (TTUR) then one generator update with
    L = dmd_weight * L_DMD(RT-DM weights) + lambda * L_RL. `curve_fn(generator, step)` returns held-out numbers
    logged every `log_every` generator steps, written to `curve_path` as CSV (values that are image arrays, N x H x W x C
    uint8, go to the trackers instead). Returns the logged rows.

    With `checkpoint_dir`, the whole state is saved there every `checkpoint_every` steps and a run finding a
    checkpoint of the same settings resumes from it (dmdr.resume); `run_identity` names what else defines the run
    (the real runner's training record: teacher, reward models, the stage it starts from). With `tracking`, each
    logged row also goes to experiment trackers (TensorBoard, W&B, ...). A non-finite loss skips its update and is counted
    (`nonfinite_skipped` in the rows); `max_nonfinite` of them in a row stop the run.

    Under several processes (accelerate: DDP or FSDP) `cfg.batch` is the global batch: every process draws
    the whole batch's prompts and noise from the same generators and keeps its own slice, batch-wide quantities
    (RT-DM's softmax weights, the non-finite check, logged losses) are gathered, and gradients are averaged; so N
    processes compute what one process computes at the same global batch; with `micro_batches` each process passes
    its part in that many micro-batches (the draws and batch-wide quantities of the whole batch first), the
    gradients summed and synchronised once. Under FSDP (configs/accelerate/fsdp.yaml)
    the trained models are sharded and, at the end, gathered back into plain modules in `models` on every process;
    under DeepSpeed ZeRO 1 or 2 (configs/accelerate/deepspeed.yaml) each trained model is an engine of its own
    (dmdr.zero), its fp32 weights and AdamW states partitioned over the processes.
    """
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    prng = np.random.default_rng(seed)
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=tracking.log_with if tracking else None,
                      project_dir=tracking.directory if tracking else None)
    if tracking:
        acc.init_trackers(tracking.name, config=tracking.config)
    fsdp, deepspeed = sharded.active(acc), zero.active(acc)
    if fsdp and not acc.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    if fsdp and cfg.optimizer == "adamw8bit":
        raise ValueError("optimizer adamw8bit under FSDP: bitsandbytes' 8-bit AdamW does not handle sharded (DTensor) "
                         "parameters (bitsandbytes issue #1633). Set optimizer: adamw in the preset's stages (with "
                         "dmdr.real: --set presets.NAME.stage1.optimizer=adamw --set presets.NAME.stage2.optimizer="
                         "adamw): FSDP shards AdamW's fp32 states (8 bytes per parameter) over the processes, which "
                         "beyond 4 processes holds less per GPU than whole 8-bit states (2 bytes per parameter)")
    if fsdp:  # set for each call: the plugin is accelerate's process-wide state, shared by the stages
        acc.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision(cfg.mixed_precision)
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    if cfg.batch % acc.num_processes:
        raise ValueError(f"batch {cfg.batch} does not divide over {acc.num_processes} processes")
    local = cfg.batch // acc.num_processes
    mine = slice(acc.process_index * local, (acc.process_index + 1) * local)  # this process's part of each draw
    if local % cfg.micro_batches:
        raise ValueError(f"micro_batches {cfg.micro_batches} does not divide the local batch {local} (batch "
                         f"{cfg.batch} over {acc.num_processes} processes)")
    size = local // cfg.micro_batches
    micro = [slice(i * size, (i + 1) * size) for i in range(cfg.micro_batches)]  # of this process's part
    if deepspeed:
        zero.configure(acc, cfg, size)
    distill, rl = cfg.dmd_weight > 0, cfg.rl.weight > 0
    dynadg, shared = cfg.dynadg.form != "off", cfg.dynadg.form == "released"
    reuse_final = cfg.rollout_reuse and cfg.rtdm.enabled  # RT-DM's reward is then taken on the fake's rollout
    real = models.real.requires_grad_(False).eval()
    lora = add_lora(real, cfg.dynadg.rank, cfg.dynadg.form) if dynadg else []
    fake = real if shared else models.fake
    if distill and fake is None:
        raise ValueError("DMD needs a fake score (Models.fake) unless DynaDG's released form shares the real's LoRA")
    needs_reward = rl or cfg.rtdm.enabled
    if needs_reward and (models.reward is None or models.decode is None):
        raise ValueError("RT-DM and RL need Models.reward and Models.decode")
    for m in (models.generator, fake, real):
        if m is not None:
            master_weights(m, cfg.mixed_precision, fsdp)
    # under FSDP, sharding changes the trained models in place: plain copies (without storage) take their weights
    # at the end. Taken before checkpointing and compilation, which export and evaluation do not need.
    trained_models = {"generator": models.generator, "fake": fake if distill and not shared else None,
                      "real": real if dynadg else None}
    plain_copies = {k: sharded.storage_free_copy(m) for k, m in trained_models.items() if fsdp and m is not None}
    if cfg.gradient_checkpointing:  # the reward's too: RL differentiates through it
        from .models import checkpoint_blocks
        for m in (models.generator, fake, real, models.reward):
            if m is not None:
                checkpoint_blocks(m)
    if cfg.compile != "off":  # after every LoRA is in place: the compiled blocks trace them
        from .models import compile_blocks
        for m in (models.generator, fake, real, models.reward, models.decode):
            if isinstance(m, torch.nn.Module):
                compile_blocks(m, cfg.compile)
    masters: dict[str, MasterWeights] = {}  # bf16-weights: the fp32 weights each optimizer steps, by its name

    def optimizer_of(name: str, params, lr: float, weight_decay: float = 0.0):
        params = [p for p in params if p.requires_grad]
        if cfg.mixed_precision == "bf16-weights" and not (fsdp or deepspeed):  # else shards or ZeRO partitions
            masters[name] = MasterWeights(params)
            params = masters[name].masters
        return optimizer(params, lr, cfg, weight_decay)

    engines = []  # under DeepSpeed, one a trained model

    def prepared(model, opt):
        """A model with its optimizer, in one call as FSDP requires; under DeepSpeed each by its own Accelerator,
        as an engine trains one model."""
        if not deepspeed:
            return acc.prepare(model, opt)
        by = Accelerator(cpu=not torch.cuda.is_available()) if engines else acc
        by.gradient_accumulation_steps = cfg.micro_batches  # as DeepSpeed's config has them (silences a warning)
        model, opt = by.prepare(model, opt)
        engines.append(model)
        return model, opt

    generator, g_opt = prepared(models.generator, optimizer_of("generator", models.generator.parameters(),
                                                               cfg.generator_lr, cfg.generator_weight_decay))
    if distill and not shared:
        fake, f_opt = prepared(fake, optimizer_of("fake", fake.parameters(), cfg.fake_lr))
    if dynadg:  # its LoRA is trained state, so it goes into checkpoints
        real, lora_opt = prepared(real, optimizer_of("fake" if shared else "dynadg", lora,
                                                     cfg.fake_lr if shared else cfg.dynadg.lr))
        if shared:
            fake, f_opt = real, lora_opt
        else:
            d_opt = lora_opt
    # DynaDG's adapter is scaled on the plain module, unwrapped once: each unwrap_model walks every module and reads
    # package metadata (about 1 ms), host time that a launch-bound step would otherwise pay several times a step
    dynadg_model = acc.unwrap_model(real) if dynadg else None
    # each trained model once (DynaDG's shared LoRA: the fake score is the LoRA'd real score), in the order prepared
    trained = [m for m in (generator, fake if distill and not shared else None, real if dynadg else None)
               if m is not None]
    processes = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
    if fsdp and acc.is_main_process:
        units = sorted({type(m).__name__.removeprefix("FSDP") for m in generator.modules()
                        if m is not generator and hasattr(m, "unshard")})
        print(f"FSDP2: {', '.join(plain_copies)} sharded over {processes}, by {', '.join(units)}")
    if deepspeed and acc.is_main_process:
        names = ", ".join(k for k, m in trained_models.items() if m is not None)
        print(f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}: {names} trained by an engine each, their "
              f"fp32 weights and AdamW states partitioned over {processes}")
    ckpt = (resume.Checkpoint(checkpoint_dir, cfg.checkpoint_every,
                              resume.fingerprint(what_trains(cfg), seed, resume.texts_digest(prompts),
                                                 *((run_identity,) if run_identity else ())), rng, prng)
            if checkpoint_dir is not None and cfg.checkpoint_every else None)
    times = models.times if models.times is not None else flow.generator_times(cfg.generator_steps, cfg.shift)
    t_max = min(cfg.t_max, models.max_t)
    c = backbone_of(models.generator).config
    latent_shape = models.latent_shape or (c.in_channels, c.sample_size, c.sample_size)
    dev = acc.device

    def batch():
        texts = [prompts[i] for i in prng.integers(len(prompts), size=cfg.batch)][mine]
        with torch.no_grad():
            cond = models.encode(texts)
        return texts, cond

    def to_dev(x: torch.Tensor) -> torch.Tensor:
        """Draws are made on the host (the same on every device and process); a pinned copy does not stall it."""
        return x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x

    def randn():  # one noise tensor per sample of the global batch; this process's slice
        return to_dev(torch.randn((cfg.batch, *latent_shape), generator=rng)[mine].contiguous())

    def rand():
        return to_dev(torch.rand(cfg.batch, generator=rng)[mine].contiguous())

    def start_noise():  # the generator's starting point at times[0]
        scale = flow.start_noise_scale(float(times[0]))
        return randn() if scale == 1.0 else randn() * scale

    def levels(dynars: bool) -> torch.Tensor:
        """Noise levels in [0, 1] for this process's part of the batch: DynaRS's annealed Beta at this step, or
        uniform."""
        if not dynars:
            return rand()
        a, b = dynars_beta(step, cfg.dynars.steps, cfg.dynars.a, cfg.dynars.b)
        return to_dev(torch.from_numpy(prng.beta(a, b, size=cfg.batch)[mine]).float())

    def score_times():  # noise levels of the fake score's diffusion loss, within the scores' range
        u = levels(cfg.dynars.enabled and cfg.dynars.fake_score)  # released: from DynaRS's Beta too
        return u if models.max_t == 1.0 else u * models.max_t

    def batch_wide(x: torch.Tensor) -> torch.Tensor:
        """A per-sample quantity of the whole global batch (the identity under one process)."""
        return acc.gather(x.contiguous()) if acc.num_processes > 1 else x

    def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
        return acc.reduce(x.detach(), "mean") if acc.num_processes > 1 else x.detach()

    def reward_of(latents, texts):
        return models.reward(models.decode(latents.float()), texts)

    def decoded(latents) -> torch.Tensor:
        """Images of `latents`, with gradient. With `reward_chunk`, decoded that many samples at a time, each chunk
        recomputed in backward, so that the decoder's full-resolution activations are held for one chunk at a time
        (the reward models then score the whole batch at once: fewer, larger calls)."""
        n = cfg.reward_chunk
        if not n or len(latents) <= n:
            return models.decode(latents.float())
        from torch.utils.checkpoint import checkpoint
        return torch.cat([checkpoint(models.decode, z.float(), use_reentrant=False) for z in latents.split(n)])

    def reward_parts(latents, texts) -> list[tuple[float, torch.Tensor]]:
        """(w_k, r_k) of the reward's terms on the decoded latents, with gradient."""
        images = decoded(latents)
        return [(w, r(images, texts)) for w, r in weighted_terms(models.reward)]

    def clip_gradients(opt):
        """Gradient norm clipped to 1 over what `opt` steps. (Under FSDP, torch's own clipping of the sharded
        gradients: accelerate's compares parameter lists with ==, which fails on two sharded models of one shape.)"""
        if fsdp:
            torch.nn.utils.clip_grad_norm_(params_of(opt), 1.0)
        else:
            acc.clip_grad_norm_(params_of(opt), 1.0)

    def backward_in_micro_batches(model, loss_of) -> torch.Tensor:
        """Gradients of the mean loss over this process's part of the batch, `loss_of(part)` (a slice of it, its
        mean loss) computed and differentiated one micro-batch at a time, each weighted by its share, so that only
        one micro-batch's activations are held (cfg.micro_batches; the gradients are synchronised across processes
        on the last one only). Returns the batch's loss, detached."""
        total = 0
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with acc.no_sync(model) if not (last or deepspeed) else contextlib.nullcontext():
                loss = loss_of(part) * (1 / len(micro))
                if deepspeed:
                    zero.backward(model, loss, last)
                else:
                    acc.backward(loss)
            total = total + loss.detach()
        return total

    def score_loss_of(model, x0, cond, weight=None):
        """The diffusion loss of a score `model` on samples `x0` at fresh noise levels and noise (drawn now, for
        the whole batch), as a function of the part of the batch it is taken on (backward_in_micro_batches)."""
        s_t, noise = score_times(), randn()

        def loss_of(part):
            with autocast:
                return flow.flow_matching_loss(model, x0[part].float(), parted(cond, part), s_t[part], noise[part],
                                               None if weight is None else weight[part])
        return loss_of

    def update(loss, opt, name: str, model, what: str, step: int) -> None:
        """After backward: the gradient norm clipped to 1 and one step of `opt` (of the fp32 masters under
        bf16-weights), skipped when the batch's `loss` is non-finite (settle counts it). A fused AdamW skips on the
        device (its found_inf, as under a GradScaler), so the host does not wait for the GPU to decide, and settle
        reads the loss at the next logged row or checkpoint; elsewhere the host decides at once."""
        pending.append((what, step, mean_over_processes(loss)))  # every process takes the same decision
        if deepspeed:  # the engine clips, and skips a step whose gradient norm (a non-finite loss's) is not finite
            settle()
            model.step()
            return
        inner = inner_optimizer(opt)
        if not fsdp and getattr(inner, "defaults", {}).get("fused"):
            inner.found_inf = (~torch.isfinite(pending[-1][2])).float()
        elif not settle():
            model.zero_grad(set_to_none=True)
            return
        if name in masters:
            masters[name].step(opt, max_norm=1.0)
            return
        clip_gradients(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    master_state = {f"master.{name}.{i}": m for name, w in masters.items() for i, m in enumerate(w.masters)}

    def fake_x0(x_t, t, cond):
        if shared:
            set_lora_scale(dynadg_model, cfg.dynadg.fake_scale)
        return flow.x0_from_velocity(x_t, fake(x_t, t, *cond), t)

    rows, t0, last, start, skipped, in_a_row = [], time.time(), {}, 0, 0, 0
    if (state := resume.load(acc, ckpt, master_state, trained)) is not None:
        rows, last, start, skipped = state["rows"], state["last"], state["step"], state["skipped"]
        for w in masters.values():
            w.give_weights()

    pending = []  # (what, step, loss) of the updates whose loss the host has not read yet

    def settle() -> bool:
        """Reads the pending updates' losses: each non-finite one is counted (its update was skipped), and
        `max_nonfinite` of them without a good generator update in between stop the run. Returns whether the last
        was finite."""
        nonlocal skipped, in_a_row
        finite = True
        for what, step, value in pending:
            finite = bool(torch.isfinite(value))
            if finite:
                in_a_row = 0 if what == "generator" else in_a_row
                continue
            skipped, in_a_row = skipped + 1, in_a_row + 1
            print(f"step {step}: non-finite {what} loss ({float(value)}), update skipped ({skipped} so far)")
            if in_a_row >= cfg.max_nonfinite:
                pending.clear()
                raise FloatingPointError(
                    f"{in_a_row} non-finite losses in a row (last: {what} at step {step}); stopping. Lower the "
                    f"learning rates or check the reward. The last good checkpoint stays in {checkpoint_dir}")
        pending.clear()
        return finite

    def read(values: dict) -> dict:
        """The logged values as numbers, the pending losses settled first (the host waits here for the GPU: once a
        logged row or checkpoint, not once a step)."""
        settle()
        return {k: float(v) for k, v in values.items()}

    bar = tqdm(range(start, cfg.steps + 1), desc=f"{'DMD' if distill else ''}{'+RL' if rl else ''}", mininterval=5)
    for step in bar:
        if (step % cfg.log_every == 0 or step == cfg.steps) and not (state and step == start):
            last = read(last)
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if k.startswith("loss")}, refresh=False)
            row, images = {"step": step, "seconds": round(time.time() - t0, 2)}, {}
            if curve_fn is not None and (acc.is_main_process or fsdp):  # a sharded model needs every process
                generator.eval()
                held_out = curve_fn(acc.unwrap_model(generator), step)
                images = {k: held_out.pop(k) for k in [k for k, v in held_out.items()
                                                       if isinstance(v, np.ndarray) and v.ndim == 4]}
                row |= held_out if acc.is_main_process else {}
            rows.append(row | last | ({"nonfinite_skipped": skipped} if skipped else {}))
            if tracking:
                acc.log({k: v for k, v in rows[-1].items() if k != "step" and isinstance(v, (int, float))}, step=step)
                if images and acc.is_main_process:
                    log_images(acc.trackers, images, step)
            if curve_path is not None and acc.is_main_process:
                write_csv(rows, curve_path)
        if step == cfg.steps:
            break
        if ckpt is not None and step > start and step % ckpt.every == 0:
            last = read(last)
            if not resume.save(acc, ckpt, {"step": step, "rows": rows, "last": last, "skipped": skipped}, trained,
                               master_state):
                raise FloatingPointError(f"non-finite weights at step {step}: not checkpointed; the last good "
                                         f"checkpoint stays in {checkpoint_dir}")
        last = {}
        # fake score: diffusion loss on generator samples (two time-scale update rule)
        if distill:
            generator.eval()
            fake.train()
            for i in range(cfg.ttur):
                texts, cond = batch()
                with torch.no_grad(), autocast:
                    x_t, t_k, final = rollout(generator, start_noise(), cond, times, rng, cfg.rollout,
                                              cfg.rtdm.tilt_fake or reuse_final, randn)
                    w = (fake_weights(batch_wide(reward_of(final, texts)), cfg.rtdm.beta)[mine]
                         if cfg.rtdm.tilt_fake else None)
                # released: the generator update reuses the last inner step's rollout, and in one batch its call, so
                # that call is made once, with gradient and in train mode as the update would make it, and only its
                # detached sample trains the fake (in micro-batches the update makes it again, a part at a time)
                reuse = cfg.rollout_reuse and i == cfg.ttur - 1
                keep = reuse and len(micro) == 1
                if reuse:
                    generator.train()
                with torch.set_grad_enabled(keep), autocast:
                    x0 = flow.generator_step(generator, x_t, t_k, cond)
                reused, x0 = (texts, cond, x_t, t_k, final, x0 if keep else None), x0.detach()
                if shared:
                    set_lora_scale(dynadg_model, cfg.dynadg.fake_scale)
                fake_loss = backward_in_micro_batches(fake, score_loss_of(fake, x0, cond, w))
                update(fake_loss, f_opt, "fake", fake, "fake-score", step)
            last["loss_fake"] = mean_over_processes(fake_loss)
            scale = dynadg_scale(step, cfg.dynadg.steps, cfg.dynadg.scale) if dynadg else 0.0
            if dynadg and not shared and scale > 0:
                # DynaDG (paper): the real score's own LoRA learns the generator's samples, so p_real overlaps p_fake
                set_lora_scale(dynadg_model, 1.0)
                update(backward_in_micro_batches(real, score_loss_of(real, x0, cond)), d_opt, "dynadg", real,
                       "DynaDG", step)
            if dynadg:
                last["dynadg_scale"] = scale
        # generator: Eq. 3 with Eq. 1 (RT-DM-weighted, Eq. 4) as its distillation term
        generator.train()
        if cfg.rollout_reuse and distill:  # released: the last fake update's rollout (and its call with grad)
            texts, cond, x_t, t_k, final, kept = reused
        else:
            texts, cond = batch()
            with torch.no_grad(), autocast:
                x_t, t_k, final = rollout(generator, start_noise(), cond, times, rng, cfg.rollout, cfg.rtdm.enabled,
                                          randn)
            kept = None
        weight = None
        if distill:
            if cfg.rtdm.enabled:
                with torch.no_grad(), autocast:
                    r_final = batch_wide(reward_of(final, texts))
                weight = rtdm_weights(r_final, cfg.rtdm.beta, cfg.rtdm.form)[mine]
                last["reward_rollout"] = r_final.mean()
            t = cfg.t_min + (t_max - cfg.t_min) * levels(cfg.dynars.enabled)
            noise = randn()
            guidance = cfg.real_cfg + cfg.cfg_jitter * (2 * rand() - 1)
        logged = {"loss_dmd": 0, "reward_x0": 0}

        def generator_loss_of(part):
            """L of Eq. 3 on a part of the batch, from the generator's call at its rollout point."""
            cond_part = parted(cond, part)
            loss_dmd = loss_rl = torch.zeros((), device=dev)
            with autocast:
                x0 = kept if kept is not None else flow.generator_step(generator, x_t[part], t_k, cond_part)
                if distill:
                    x_r = flow.renoise(x0.detach(), noise[part], t[part])
                    with torch.no_grad():
                        fake.eval()
                        x0_fake = fake_x0(x_r, t[part], cond_part)
                        if dynadg:
                            set_lora_scale(dynadg_model, scale)
                        x0_real = flow.x0_from_velocity(
                            x_r, flow.guided_velocity(real, x_r, t[part], cond_part, models.uncond, guidance[part]),
                            t[part])
                    loss_dmd = dmd_loss(x0, dmd_gradient(x0.detach().float(), x0_real.float(), x0_fake.float()),
                                        None if weight is None else weight[part])
                    logged["loss_dmd"] += loss_dmd.detach() / len(micro)
                if rl:
                    parts = reward_parts(x0, texts[part])
                    loss_rl = rl_loss(parts, cfg.rl.loss, cfg.rl.margin)
                    logged["reward_x0"] += sum(w * r for w, r in parts).mean().detach() / len(micro)
                return joint_loss(loss_dmd, loss_rl, cfg.rl.weight, cfg.dmd_weight)
        loss = backward_in_micro_batches(generator, generator_loss_of)
        if distill:
            last["loss_dmd"] = mean_over_processes(logged["loss_dmd"])
        if rl:
            last["reward_x0"] = mean_over_processes(logged["reward_x0"])
        update(loss, g_opt, "generator", generator, "generator", step)
    for w in masters.values():
        w.release()
    zero.release(engines)
    for k, m in plain_copies.items():  # on the host: beside the sharded models, a full SD3.5-Large may not fit a GPU
        setattr(models, k, sharded.gathered(trained_models[k], m, "cpu"))
    if dynadg:
        set_lora_scale(models.real, 0.0)
    if tracking:
        acc.end_training()
    return rows


# --- recipes --------------------------------------------------------------------------------------------------


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


def run_recipe(p, name: str, prompt_dir: Path = Path("data/prompts"), out: Path = Path("models/distill"),
               curves: Path = Path("results/curves"), checkpoints: Path = Path("checkpoints")) -> list[dict]:
    """The `distill` stage for one recipe: train from its init checkpoint on the train prompts, curves on held-out
    and train prompts, the generator (and fake score) saved as diffusers model directories with the sampler
    settings (sampler.json)."""
    from .config import TEACHER, recipe
    from .evaluation import World, curve_metrics
    from .models import LatentDecoder, VelocityModel, atomic_dir, load_backbone, require_dir
    from .prompts import load_prompts, load_records, test_specs
    from .rewards import load_reward
    from .world import grammar

    cfg = recipe(p, name)
    world = World.load()
    start = start_fake = None
    if cfg.init != TEACHER:
        init = require_dir(Path(cfg.init), f"recipe {name}'s init")
        start = VelocityModel(load_backbone(init, world.latent_shape))
        if (init / "fake").is_dir():
            start_fake = VelocityModel(load_backbone(init / "fake", world.latent_shape))
    reward = load_reward(cfg.rl.reward)
    models = init_models(world.teacher, world.encode, world.encode([""]), start, start_fake, cfg,
                         decode=LatentDecoder(world.vae), reward=reward)
    world.vae.requires_grad_(False)
    specs = test_specs(prompt_dir, cfg.curve_prompts_per_tag)
    dense = [grammar.read(r["prompt"]) for r in load_records(prompt_dir / "test_dpg.csv")][: 6 * cfg.curve_prompts_per_tag]
    train_prompts = load_prompts(prompt_dir / "train.txt")
    seed = p.seed + cfg.seed

    def curve_fn(generator, step):
        return curve_metrics(world, generator, cfg.generator_steps, cfg.shift, specs, seed, dense, reward,
                             train_prompts[: len(specs)])

    checkpoint = checkpoints / name
    read = [Path("models/world"), Path("models/rewards")] + ([Path(cfg.init)] if cfg.init != TEACHER else [])
    rows = train(cfg, models, train_prompts, seed, curve_fn, curves / f"{name}.csv", checkpoint,
                 run_identity=resume.files_fingerprint(*read))

    def write(d: Path):
        backbone_of(plain(models.generator)).save_pretrained(d, safe_serialization=True)
        fake = fused_copy(models.real, cfg.dynadg.fake_scale) if cfg.dynadg.form == "released" else models.fake
        if fake is not None:
            fake.backbone.save_pretrained(d / "fake", safe_serialization=True)
        (d / "sampler.json").write_text(json.dumps({"steps": cfg.generator_steps, "shift": cfg.shift,
                                                    "times": flow.generator_times(cfg.generator_steps, cfg.shift).tolist(),
                                                    "cfg": cfg.generator_cfg, "prediction": "velocity", "recipe": name},
                                                   indent=1))
    atomic_dir(out / name, write)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: nothing left to resume
    return rows
