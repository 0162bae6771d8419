"""Tiny real models for fast tests: an open_clip CLIP, a diffusers backbone and VAE, a CLIP reward."""
import torch

from dmdr.config import DistillParams, build, deep_merge
from dmdr.distill import init_models
from dmdr.models import ClipConfig, TinyClip, VelocityModel, build_backbone, build_vae, decode_latents
from dmdr.rewards import CosineReward


def tiny_clip() -> TinyClip:
    torch.manual_seed(0)
    return TinyClip(ClipConfig(embed_dim=16, width=16, vision_layers=1, text_layers=1, heads=2)).eval()


def tiny_models(clip, kind: str = "unet", overrides: dict | None = None, reward=None):
    """(cfg, teacher, Models) of a 2-step run at batch 4 on a random tiny teacher; `overrides` merge into the
    recipe defaults."""
    torch.manual_seed(0)
    kw = dict(channels=(16, 16), head_dim=8) if kind == "unet" else dict(layers=1, heads=2, head_dim=8)
    teacher = VelocityModel(build_backbone(kind, 16, 16, **kw)).eval()
    encode = lambda texts: tuple(x.detach() for x in clip.encode(texts))
    vae = build_vae((16, 16, 16)).eval().requires_grad_(False)
    cfg = build(DistillParams, deep_merge(dict(steps=2, batch=4, ttur=1, log_every=1, mixed_precision="no",
                                               generator_steps=2), overrides or {}))
    reward = reward if reward is not None else CosineReward(clip).requires_grad_(False)
    models = init_models(teacher, encode, encode([""]), cfg=cfg, decode=lambda z: decode_latents(vae, z),
                         reward=reward)
    return cfg, teacher, models
