"""FLOPs per real-scale step, counted on CPU: the matmuls, convolutions and attention (forward and backward) of one
step of the bare passes and of the loop, as benchmarks/gpu_step.py runs them (an SD3-Medium transformer of 2.03 B
parameters, the SD3 VAE, a ViT-H-14 reward; 512 px, local batch 8, TTUR 1, gradient checkpointing), counted by
torch.utils.flop_counter on fake tensors: the real shapes, no memory and no arithmetic. launch_count.py counts what
a launch-bound step's time follows; this counts what a compute-bound step's time follows. These over a measured
step time give the throughput the GPU reached.

Ops that no fake tensor flows into run for real (the loop's host-side draws: its rollout levels, renoise levels and
prompts are those of a real run with the same seed); a fake scalar read on the host (a logged loss, a finiteness
check) is answered by a stand-in, which changes no shape.

    python benchmarks/flop_count.py [--steps 8] [--batch 8] [--resolution 512] [--out FILE]
"""
import argparse
import collections
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step as g  # noqa: E402
import launch_count  # noqa: E402
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402

from dmdr.distill import init_models, train  # noqa: E402
from dmdr.models import LatentDecoder, VelocityModel  # noqa: E402

from output import emit  # noqa: E402


class HostForReal(TorchDispatchMode):
    """Under a FakeTensorMode: runs for real each op that no fake tensor flows into, and answers a fake scalar's
    `.item()` with True, 1 or 0.5 by its dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(t, FakeTensor) for t in tree_leaves((args, kwargs))):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 0.5 if dtype.is_floating_point else 1
        return func(*args, **kwargs)


def fake_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer of `module` replaced by a fake CPU tensor of its shape and dtype (call it under the
    FakeTensorMode)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty_like(b, device="cpu")
    return module


def unchanged_swap(swap):
    """torch.nn.Module.to swaps a fake parameter for its converted self even when nothing changes, and the swap fails
    on the fake tensor's weak references: such a no-op `.to()` is let through as the no-op it is."""
    def swap_tensors(a, b):
        if isinstance(a, FakeTensor) and (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape):
            return
        swap(a, b)
    return swap_tensors


@contextlib.contextmanager
def faked(*modules):
    """The modules with fake weights (fake_weights), under a FakeTensorMode and HostForReal, and Module.to's no-op
    swaps let through (unchanged_swap) until the end."""
    swap = torch.utils.swap_tensors
    torch.utils.swap_tensors = unchanged_swap(swap)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            fakes = [fake_weights(m) for m in modules]
            with HostForReal():
                yield fakes
    finally:
        torch.utils.swap_tensors = swap


PARTS = {"VelocityModel": "transformer", "LatentDecoder": "VAE decoder", "ClipReward": "reward"}


def flops_of(fn) -> collections.Counter:
    """FLOPs of `fn()` in all ("total") and by part (PARTS, by the top-level module's class: the generator and the
    fake and real scores are all the transformer)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    return collections.Counter({"total": sum(counts["Global"].values())} |
                               {part: sum(counts[name].values()) for name, part in PARTS.items() if name in counts})


def breakdown(row: collections.Counter) -> str:
    return ", ".join(f"{part} {row[part] / 1e12:.1f}" for part in PARTS.values() if row[part])


ROWS = g.LOOP_ROWS | {"stage2-unchunked": "stage 2 with reward_chunk 0 (the decoder run once, not recomputed)"}


def counted(teacher, vae, reward, batch: int, resolution: int, steps: int, rows=tuple(ROWS)) -> dict:
    """FLOPs per step by part (flops_of), mean of `steps` steps, of the bare passes ("bare") and of each loop row
    (ROWS: gpu_step.loop_configs in fp32, as FLOPs do not depend on the precision, and stage 2 without reward
    chunks), for these models: real ones, or fake ones (`faked`)."""
    c = teacher.backbone.config
    encode = g.random_text(teacher.backbone)
    latent = (c.in_channels, resolution // 8, resolution // 8)
    out = {"bare": launch_count.per_step(
        lambda n: g.bare_passes(teacher, encode, encode([""]), latent, batch, n, "cpu", "no"), steps, flops_of,
        warm_up=False)}
    configs = g.loop_configs(batch, "no")
    configs["stage2-unchunked"] = g.loop_configs(batch, "no", reward_chunk=0)["stage2"]
    for row, cfg in configs.items():
        if row in rows:
            models = init_models(teacher, encode, encode([""]), cfg=cfg, decode=LatentDecoder(vae), reward=reward,
                                 latent_shape=latent)
            out[row] = launch_count.per_step(
                lambda n: train(dataclasses.replace(cfg, steps=n, log_every=10**9), models, ["a photo"] * 16, seed=0),
                steps, flops_of, warm_up=False)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="steps averaged over")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")  # deepcopy's check, harmless
    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**g.SD3_MEDIUM)
        vae = AutoencoderKL(**g.SD3_VAE).requires_grad_(False)
    reward = g.ClipReward("ViT-H-14").requires_grad_(False)  # open_clip moves it to the CPU: built for real, once
    parameters = sum(p.numel() for p in transformer.parameters()) / 1e9
    with faked(transformer, vae, reward) as (transformer, vae, reward):
        flops = counted(VelocityModel(transformer).requires_grad_(False), vae, reward, a.batch, a.resolution, a.steps)
    bare = flops.pop("bare")
    lines = [f"FLOPs per step (matmuls, convolutions, attention; forward and backward), mean of {a.steps} steps; "
             f"SD3-Medium ({parameters:.2f} B parameters), the SD3 VAE, ViT-H-14; {a.resolution} px, local batch "
             f"{a.batch}, TTUR 1, gradient checkpointing",
             f"bare passes of one DMD step: {bare['total'] / 1e12:.1f} TFLOP ({breakdown(bare)})"]
    lines += [f"{ROWS[row]}: {f['total'] / 1e12:.1f} TFLOP = {f['total'] / bare['total']:.2f}x the bare passes "
              f"({breakdown(f)})" for row, f in flops.items()]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
