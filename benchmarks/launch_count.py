"""Kernel launches per step, counted on CPU: the aten ops that one step of the bare passes and of the loop dispatch
and that launch a GPU kernel in eager mode (about one each). Views, aliases and allocations launch none and are not
counted. The GPU benchmark found the real-scale step launch-bound, so these counts track its cost where no GPU is at
hand. The models have SD3-Medium's depth (24 joint blocks), the SD3 VAE's block structure and ViT-H-14's depth (32
blocks) with tiny widths, in fp32 (no autocast casts, no master copies) or with `--precision bf16-weights` (the bare
passes and the loop both with fp32 masters); AdamW is the fused kernel, as both use it on GPUs (on CPU they would
otherwise step parameter by parameter, about five ops each). The loop's configurations are benchmarks/gpu_step.py's.
`--by-op N`: the N ops whose counts differ most between each loop row and the bare passes.

    python benchmarks/launch_count.py [--precision bf16-weights] [--by-op 12] [--out FILE]
"""
import argparse
import collections
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

from output import emit  # noqa: E402

NARROW_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 32, "width": 64, "head_width": 16,
                                              "patch_size": 14},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 24}}


# ops that launch no kernel beyond views (func.is_view): allocations, and a view that is not flagged as one
NO_KERNEL = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
             torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
             torch.ops.aten._unsafe_view.default}


class OpCount(TorchDispatchMode):
    """Counts, by name, the aten ops dispatched inside it that launch a kernel (backward's included: on CPU autograd
    runs them in this thread)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func in NO_KERNEL):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class FusedAdamW(torch.optim.AdamW):
    """AdamW as both the bare passes and the loop build it on GPUs: the fused kernel."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs | {"fused": True})


def ops_of(fn) -> collections.Counter:
    """The kernel-launching ops `fn()` dispatches, by name."""
    with OpCount() as c:
        fn()
    return c.ops


def per_step(run, steps: int, count=ops_of, warm_up: bool = True) -> collections.Counter:
    """What `count` counts per step, by name: `run(n)` does n steps after the same set-up; (count of 1 + steps) -
    (count of 1), over steps, after one warm-up run (a first run casts the models to their precision). Averaged, as
    the rollout's level (4 generator calls or none before the gradient call) is drawn per step."""
    if warm_up:
        run(1)
    counts = [count(lambda: run(n)) for n in (1, 1 + steps)]
    return collections.Counter({k: (counts[1][k] - counts[0][k]) / steps for k in counts[1] | counts[0]})


def differences(row: collections.Counter, bare: collections.Counter, n: int) -> list[str]:
    """The `n` ops whose per-step counts differ most between a loop row and the bare passes."""
    diff = {k: row[k] - bare[k] for k in row | bare}
    return [f"    {d:+8.1f} {k} ({bare[k]:.0f} -> {row[k]:.0f})"
            for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:n] if d]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="steps averaged over")
    ap.add_argument("--precision", choices=("no", "bf16-weights"), default="no",
                    help="fp32 everywhere, or bf16 weights with fp32 masters in the bare passes and the loop")
    ap.add_argument("--by-op", type=int, default=0, metavar="N",
                    help="list the N ops whose counts differ most between each loop row and the bare passes")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.optim.AdamW = FusedAdamW  # read at call time by the bare passes and by dmdr.distill.adamw
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "narrow-vit-h.json").write_text(json.dumps(NARROW_VIT))
        open_clip.add_model_config(Path(d) / "narrow-vit-h.json")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**dict(g.TINY, num_layers=g.SD3_MEDIUM["num_layers"]))
    vae = AutoencoderKL(**dict(g.SD3_VAE, block_out_channels=(16,) * 4, norm_num_groups=16)).requires_grad_(False)
    reward = g.ClipReward("narrow-vit-h").requires_grad_(False)
    teacher = VelocityModel(transformer).requires_grad_(False)
    c = transformer.config
    encode = g.random_text(transformer, tokens=16)
    latent = (c.in_channels, 16, 16)  # op counts do not depend on the resolution
    lines = [f"aten ops per step that launch a kernel (views and allocations not counted), mean of {a.steps} steps; "
             f"SD3-Medium's depth, the SD3 VAE's blocks, ViT-H-14's depth, tiny widths; local batch {a.batch}, TTUR 1, "
             f"gradient checkpointing, fused AdamW, {g.BARE[a.precision]}"]
    bare = per_step(lambda n: g.bare_passes(teacher, encode, encode([""]), latent, a.batch, n, "cpu", a.precision),
                    a.steps)
    lines.append(f"bare passes of one DMD step: {bare.total():.0f} ops")
    for row, cfg in g.loop_configs(a.batch, a.precision).items():
        models = init_models(teacher, encode, encode([""]), cfg=cfg, decode=LatentDecoder(vae), reward=reward,
                             latent_shape=latent)
        ops = per_step(lambda n: train(dataclasses.replace(cfg, steps=n, log_every=10**9), models, ["a photo"] * 16,
                                       seed=0), a.steps)
        lines.append(f"{g.LOOP_ROWS[row]}: {ops.total():.0f} ops = {ops.total() / bare.total():.2f}x the bare passes")
        lines += differences(ops, bare, a.by_op)
    emit(lines, a.out)


if __name__ == "__main__":
    main()
