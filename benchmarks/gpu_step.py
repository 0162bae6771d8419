"""GPU benchmark of the real-scale loop (issue "Real models and scale", run it on a lent GPU): an SD3-Medium
transformer with random weights (2.03 B parameters; text conditioning as random tensors of SD3's shapes), the
sd3-medium preset's stage 1 (DynaDG's released shared LoRA, rank 32; DynaRS) and stage 2 (hinge reward through an
SD3 VAE decoder and a random ViT-H-14 CLIP reward), bf16 autocast over fp32 master weights, gradient checkpointing.
Prints seconds per generator step and peak GPU memory at 512 px, local batch 8, then sampling latency at 1024 px
for the 4-step generator against 28- and 50-step CFG sampling.

    python benchmarks/gpu_step.py [--steps 3] [--batch 8] [--resolution 512] [--out FILE]
    python benchmarks/gpu_step.py --tiny     # the same code on a tiny transformer, on CPU: a check that it runs
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402

from dmdr import config, flow  # noqa: E402
from dmdr.distill import init_models, train  # noqa: E402
from dmdr.models import VelocityModel, decode_latents  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY = dict(SD3_MEDIUM, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=16)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, shift_factor=0.0609, scaling_factor=1.5035)
TINY_VAE = dict(SD3_VAE, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=16)
TEXT_TOKENS = 77 + 256  # CLIP tokens + T5 tokens


class ClipReward(torch.nn.Module):
    """A random open_clip ViT-H-14 (HPSv2.1's architecture) on resized decoded images: the reward's real cost."""

    def __init__(self, arch: str):
        super().__init__()
        import open_clip
        self.model = open_clip.create_model(arch, pretrained=None)
        self.size = self.model.visual.preprocess_cfg["size"][0]
        self.register_buffer("text", torch.nn.functional.normalize(torch.randn(self.model.visual.output_dim), dim=0))

    def forward(self, images, texts):
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bicubic")
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1) @ self.text


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_training(cfg, models, prompts, steps: int) -> float:
    """Seconds per generator step over `steps` steps after one warm-up step."""
    cfg.steps, cfg.log_every = 1, 10**9
    train(cfg, models, prompts, seed=0)
    sync()
    cfg.steps = steps
    t = time.perf_counter()
    train(cfg, models, prompts, seed=1)
    sync()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--sample-resolution", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="a tiny transformer and VAE (CPU check)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.tiny:
        a.resolution, a.sample_resolution = min(a.resolution, 64), min(a.sample_resolution, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    _, stage1, stage2 = config.preset(p, "sd3-medium")
    for cfg in (stage1, stage2):
        cfg.batch, cfg.checkpoint_every = a.batch, 0
        cfg.mixed_precision = "bf16" if dev == "cuda" else "no"
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**(TINY if a.tiny else SD3_MEDIUM)).to(dev)
    transformer.enable_gradient_checkpointing()
    vae = AutoencoderKL(**(TINY_VAE if a.tiny else SD3_VAE)).to(dev).requires_grad_(False)
    reward = ClipReward("ViT-B-32" if a.tiny else "ViT-H-14").to(dev).requires_grad_(False)
    c = transformer.config
    width, pooled = c.joint_attention_dim, c.pooled_projection_dim
    encode = lambda texts: (torch.randn(len(texts), TEXT_TOKENS, width, device=dev),
                            torch.randn(len(texts), pooled, device=dev))
    uncond = encode([""])
    latent = (c.in_channels, a.resolution // 8, a.resolution // 8)
    lines = [f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; transformer "
             f"{sum(x.numel() for x in transformer.parameters()) / 1e9:.2f} B parameters; {a.resolution} px, local "
             f"batch {a.batch}; {'bf16 autocast, ' if dev == 'cuda' else 'fp32, '}fp32 master weights, gradient "
             f"checkpointing"]
    prompts = ["a photo"] * 64
    for name, cfg in (("stage 1 (DMD + DynaDG released + DynaRS)", stage1), ("stage 2 (DMD + hinge RL)", stage2)):
        models = init_models(VelocityModel(transformer), encode, uncond, cfg=cfg,
                             decode=lambda z: decode_latents(vae, z), reward=reward, latent_shape=latent)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sec = timed_training(cfg, models, prompts, a.steps)
        lines.append(f"{name}: {sec:.3f} s per generator step, peak {peak_gib():.1f} GiB allocated")
        del models
        if dev == "cuda":
            torch.cuda.empty_cache()

    model = VelocityModel(transformer).eval()
    n = 1 if a.tiny else 4
    noise = torch.randn(n, c.in_channels, a.sample_resolution // 8, a.sample_resolution // 8, device=dev)
    cond = encode(["a photo"] * n)
    times = {}
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        for label, run in [("4-step generator", lambda: flow.sample_generator(model, noise, cond,
                                                                               flow.generator_times(4, 3.0))),
                           ("28-step CFG", lambda: flow.sample_teacher(model, noise, cond, uncond, 28, 7.0, 3.0)),
                           ("50-step CFG", lambda: flow.sample_teacher(model, noise, cond, uncond, 50, 7.0, 3.0))]:
            run()
            sync()
            t = time.perf_counter()
            run()
            sync()
            times[label] = (time.perf_counter() - t) / n
    lines.append(f"sampling at {a.sample_resolution} px, batch {n}, per image: "
                 + ", ".join(f"{k} {v:.3f} s" for k, v in times.items())
                 + f"; 50-step CFG / 4-step = {times['50-step CFG'] / times['4-step generator']:.1f}x (NFE bound 25x)")
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
