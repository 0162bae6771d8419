"""Kernel launches per step, counted on CPU: the aten ops that one step of the bare passes and of the loop dispatch
(eager mode: one op is about one GPU kernel launch). The GPU benchmark found the real-scale step launch-bound, so
these counts track its cost where no GPU is at hand. The models have SD3-Medium's depth (24 joint blocks), the SD3
VAE's block structure and ViT-H-14's depth (32 blocks) with tiny widths, fp32 (no autocast casts); the loop's
configurations are benchmarks/gpu_step.py's.

    python benchmarks/launch_count.py [--out FILE]
"""
import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step as g  # noqa: E402
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402

from dmdr.distill import init_models, train  # noqa: E402
from dmdr.models import LatentDecoder, VelocityModel  # noqa: E402

NARROW_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 32, "width": 64, "head_width": 16,
                                              "patch_size": 14},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 24}}


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (backward's included: on CPU autograd runs them in this thread)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def per_step(run, steps: int) -> float:
    """Ops per step: `run(n)` does n steps after the same set-up; (ops of 1 + steps) - (ops of 1), over steps.
    Averaged, as the rollout's level (4 generator calls or none before the gradient call) is drawn per step."""
    counts = []
    for n in (1, 1 + steps):
        with OpCount() as c:
            run(n)
        counts.append(c.ops)
    return (counts[1] - counts[0]) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="steps averaged over")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "narrow-vit-h.json").write_text(json.dumps(NARROW_VIT))
        open_clip.add_model_config(Path(d) / "narrow-vit-h.json")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**dict(g.TINY, num_layers=g.SD3_MEDIUM["num_layers"]))
    vae = AutoencoderKL(**dict(g.SD3_VAE, block_out_channels=(16,) * 4, norm_num_groups=16)).requires_grad_(False)
    reward = g.ClipReward("narrow-vit-h").requires_grad_(False)
    teacher = VelocityModel(transformer).requires_grad_(False)
    c = transformer.config
    encode = lambda texts: (torch.randn(len(texts), 16, c.joint_attention_dim),
                            torch.randn(len(texts), c.pooled_projection_dim))
    latent = (c.in_channels, 16, 16)  # op counts do not depend on the resolution
    lines = [f"aten ops per step (~ kernel launches in eager mode), mean of {a.steps} steps; SD3-Medium's depth, the "
             f"SD3 VAE's blocks, ViT-H-14's depth, tiny widths; local batch {a.batch}, TTUR 1, gradient checkpointing"]
    bare = per_step(lambda n: g.bare_passes(teacher, encode, encode([""]), latent, a.batch, n, "cpu", "no"), a.steps)
    lines.append(f"bare passes of one DMD step: {bare:.0f} ops")
    for row, cfg in g.loop_configs(a.batch, "no").items():
        models = init_models(teacher, encode, encode([""]), cfg=cfg, decode=LatentDecoder(vae), reward=reward,
                             latent_shape=latent)
        ops = per_step(lambda n: train(dataclasses.replace(cfg, steps=n, log_every=10**9), models, ["a photo"] * 16,
                                       seed=0), a.steps)
        lines.append(f"{g.LOOP_ROWS[row]}: {ops:.0f} ops = {ops / bare:.2f}x the bare passes")
    for line in lines:
        print(line)
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
