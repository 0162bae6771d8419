"""Model builders and adapters: the VAE (diffusers AutoencoderKL) and flow backbones
(diffusers UNet2DConditionModel or SD3Transformer2DModel) seen through one interface, `VelocityModel`; an
epsilon-prediction UNet (SDXL's, the world's epsilon teacher) seen through the same one, `EpsilonAsFlow`.

Everything is saved as safetensors plus a JSON config, written to a temporary directory and renamed into place, so
a crash never leaves half a checkpoint; loading never unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, ModelMixin, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn


# --- atomic checkpoints ---------------------------------------------------------------------------------------


def atomic_dir(path: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `path`, replacing what was there only once writing succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        readable(tmp)
        move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def readable(root: Path) -> None:
    """Give a written directory and its files the modes the user's umask gives new ones (0755 and 0644 under 022):
    mkdtemp makes 0700 and safetensors writes 0600, readable by their owner only."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~mask)


def move_into_place(written: Path, path: Path) -> None:
    """Rename a completely written directory to `path`, replacing what was there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(written, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(written, path)


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} checkpoint directory {path} does not exist (run the stage that writes it)")
    return path


# --- VAE ------------------------------------------------------------------------------------------------------


def build_vae(channels=(32, 64, 64), latent_channels: int = 4) -> AutoencoderKL:
    """32x32x3 -> 8x8x4: one downsampling per block after the first."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=16, sample_size=32)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """images in [-1, 1] -> normalised latents (posterior mean, shifted and scaled as in SD3)."""
    z = vae.encode(images).latent_dist.mean
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """normalised latents -> images in [-1, 1] (differentiable)."""
    return vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample


def computed_in(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype of `module`'s weights: a model held in bf16 and run without autocast (mixed_precision
    bf16-weights) computes in it. Under autocast, which casts per op, `x` is left as it is."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(next(module.parameters()).dtype)


def returned_as(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A model's output in its caller's dtype (fp32 flow arithmetic on bf16 outputs), except under autocast."""
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


class LatentDecoder(nn.Module):
    """decode_latents as a module (latents cast to the VAE's dtype), so that the loop can compile its blocks."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, z.to(self.vae.dtype))


# --- flow backbones -------------------------------------------------------------------------------------------


def build_backbone(kind: str, text_width: int, pooled_dim: int, latent_channels: int = 4, latent_size: int = 8,
                   channels=(64, 128), layers: int = 6, heads: int = 4, head_dim: int = 32):
    """A diffusers backbone for latent flow matching: 'unet' (UNet2DConditionModel, text tokens by cross-attention,
    pooled text added to the time embedding) or 'sd3' (SD3Transformer2DModel, patch 1, joint attention)."""
    if kind == "unet":
        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * len(channels),
            up_block_types=("CrossAttnUpBlock2D",) * len(channels),
            block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=text_width,
            attention_head_dim=head_dim, norm_num_groups=16,
            class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim)
    if kind == "sd3":
        return SD3Transformer2DModel(
            sample_size=latent_size, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
            num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=latent_size)
    raise ValueError(f"unknown backbone kind {kind!r}; expected 'unet' or 'sd3'")


def load_backbone(path: Path, latent_shape: tuple[int, int, int] | None = None):
    """A diffusers backbone saved with save_pretrained; with `latent_shape` (channels, height, width) its config
    must produce latents of that shape, the world's, else the images it makes would be of the wrong size."""
    path = require_dir(path, "backbone")
    config = json.loads((path / "config.json").read_text())
    cls_name = config.get("_class_name")
    cls = {"UNet2DConditionModel": UNet2DConditionModel, "SD3Transformer2DModel": SD3Transformer2DModel}.get(cls_name)
    if cls is None:
        raise ValueError(f"{path}/config.json: unsupported backbone class {cls_name!r}")
    if latent_shape is not None:
        found = (config.get("in_channels"), config.get("sample_size"), config.get("sample_size"))
        if found != tuple(latent_shape):
            raise ValueError(f"{path}/config.json: in_channels {found[0]} and sample_size {found[1]} make latents "
                             f"of shape {found}, the world's VAE expects {tuple(latent_shape)}")
    return cls.from_pretrained(path, use_safetensors=True)


def save_diffusers(model, path: Path) -> Path:
    """A diffusers model's save_pretrained (safetensors), atomically."""
    return atomic_dir(path, lambda d: model.save_pretrained(d, safe_serialization=True))


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing (activations recomputed in backward, block by block) in the diffusers models and the
    open_clip transformers inside `model`. (transformers' CLIP checkpoints only in train mode, so PickScore, held
    in eval mode, is left as it is.)"""
    for m in model.modules():
        if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing:
            m.enable_gradient_checkpointing()
        elif isinstance(m, open_clip.transformer.Transformer):
            m.grad_checkpointing = True


# the repeated blocks of the backbones (diffusers' `_repeated_blocks`), of the VAE's decoder and of the CLIP rewards
# (open_clip, transformers)
REPEATED_BLOCKS = ("JointTransformerBlock", "BasicTransformerBlock", "UpDecoderBlock2D", "ResidualAttentionBlock",
                   "CLIPEncoderLayer")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Regional compilation, as diffusers' `compile_repeated_blocks`: torch.compile each repeated block in place
    (parameter names unchanged). A real-scale step is launch-bound in eager mode; compiled blocks launch fewer,
    fused kernels, and blocks of one class share their compiled graphs. Returns how many blocks were compiled."""
    # a block runs with and without grad, in train and eval mode, with and without a LoRA: more variants than
    # dynamo's default limit of 8 per function, past which it would silently run the block eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [m for m in model.modules() if type(m).__name__ in REPEATED_BLOCKS]
    for block in blocks:
        # static shapes: a block called at several shapes (the decoder's, CFG's doubled batch) gets one graph each;
        # with dynamic graphs a checkpoint's recompute could select another graph than its forward did
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def shard_units(backbone: nn.Module) -> list[str]:
    """The blocks FSDP shards the backbone by: diffusers' `_no_split_modules` of its class that occur in it (accelerate
    raises on a listed class the model lacks). Wrappers pass them on as their own `_no_split_modules`, which
    accelerate's TRANSFORMER_BASED_WRAP uses when its config names no classes."""
    present = {type(m).__name__ for m in backbone.modules()}
    return [n for n in getattr(backbone, "_no_split_modules", None) or [] if n in present]


class VelocityModel(nn.Module):
    """Any diffusers flow backbone as v(x_t, t, text states, pooled text), t in [0, 1] (x_t = (1 - t) x0 + t eps,
    v = eps - x0). This is the only place that knows the backbone's call signature."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    _no_split_modules = property(lambda self: shard_units(self.backbone))

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        b = self.backbone
        x_in, states, pooled = computed_in(b, x), computed_in(b, states), computed_in(b, pooled)
        if isinstance(b, UNet2DConditionModel):
            return returned_as(b(x_in, t * 1000, encoder_hidden_states=states, class_labels=pooled).sample, x)
        return returned_as(b(hidden_states=x_in, timestep=t * 1000, encoder_hidden_states=states,
                             pooled_projections=pooled).sample, x)


class EpsilonAsFlow(nn.Module):
    """An epsilon-prediction UNet on a VP schedule (SDXL's, the world's epsilon teacher) as a velocity model
    v(x_t, t, states, pooled) of the flow x_t = (1 - t) x0 + t eps: with k = t / (1 - t) (the Euler/Karras sigma,
    sqrt((1 - abar) / abar)), a = 1 / sqrt(1 + k^2) and s = k a, the VP point is a x0 + s eps = (a + s) x_t, the
    UNet is called at the (fractional) timestep of k on its schedule, as EulerDiscreteScheduler does, and
    v = eps - x0 with x0 = (x_vp - s eps) / a. SDXL's micro-conditioning is fixed: `time_ids` of the training
    resolution; without them the UNet is the world's (pooled text as its class embedding, as in VelocityModel)."""

    def __init__(self, backbone, alphas_cumprod: torch.Tensor, time_ids: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("log_sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().float(),
                             persistent=False)
        self.register_buffer("time_ids", None if time_ids is None else time_ids.float(), persistent=False)

    _no_split_modules = property(lambda self: shard_units(self.backbone))

    @property
    def max_t(self) -> float:
        """The noisiest flow time on the schedule (SD's and SDXL's betas: 0.936)."""
        k = float(self.log_sigmas[-1].exp())
        return k / (1 + k)

    def timestep(self, k: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of sigma k: log-sigma interpolation (EulerDiscreteScheduler._sigma_to_t)."""
        log_k = k.clamp_min(1e-10).log()
        low = (log_k[None] >= self.log_sigmas[:, None]).sum(0).sub(1).clamp(0, len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_k) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t).float()
        k = t / (1 - t)
        a = (1 + k * k).rsqrt().view(-1, 1, 1, 1)
        s = k.view(-1, 1, 1, 1) * a
        x_vp = x * (a + s)
        b = self.backbone
        if self.time_ids is None:
            cond = {"class_labels": computed_in(b, pooled)}
        else:
            cond = {"added_cond_kwargs": {"text_embeds": computed_in(b, pooled),
                                          "time_ids": self.time_ids.expand(x.shape[0], -1)}}
        eps = b(computed_in(b, x_vp), self.timestep(k), encoder_hidden_states=computed_in(b, states), **cond).sample
        return returned_as(eps - (x_vp - s * eps) / a, x)
