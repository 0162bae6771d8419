"""Sampling-time ratio of the teacher (50 steps, CFG) to the distilled 4-step generator, measured side by side at the
same batch in one run (latents to pixels, VAE decode included). The NFE bound is 100 / 4 = 25x.

    python benchmarks/sampling_speed.py [--batch 64] [--repeats 3] [--generator models/distill/dmd2-4]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr.config import EvalModel  # noqa: E402
from dmdr.evaluation import load_model, nfe, sample_latents, sampler_times  # noqa: E402
from dmdr.standins import World  # noqa: E402
from dmdr.models import decode_latents  # noqa: E402
from dmdr.prompts import load_prompts  # noqa: E402

from output import emit  # noqa: E402


def timed(world, model, m, texts, noise, times, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            decode_latents(world.vae, sample_latents(world, model, m, texts, noise, times))
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generator", default="models/distill/dmd2-4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", help="also write the printed lines to this file (the README quotes "
                                  "results/benchmarks/sampling_speed.txt)")
    a = ap.parse_args()
    torch.manual_seed(0)
    world = World.load()
    texts = (load_prompts("data/prompts/test_geneval.jsonl") * a.batch)[: a.batch]
    noise = torch.randn(a.batch, *world.latent_shape)
    teacher_m = EvalModel(checkpoint="models/world/teacher", kind="teacher", steps=50, cfg=3.0)
    gen_m = EvalModel(checkpoint=a.generator, steps=a.steps)
    teacher, family, _ = load_model(world, teacher_m)
    generator, gen_family, shift = load_model(world, gen_m)
    t_teacher = timed(world, teacher, teacher_m, texts, noise, sampler_times(family, teacher_m), a.repeats)
    t_gen = timed(world, generator, gen_m, texts, noise, sampler_times(gen_family, gen_m, shift), a.repeats)
    lines = [f"batch {a.batch}, best of {a.repeats}, {torch.get_num_threads()} threads, device cpu",
             f"teacher 50 steps CFG (NFE {nfe(teacher_m)}): {t_teacher:.3f} s  ({t_teacher / a.batch * 1e3:.2f} ms/image)",
             f"generator {a.steps} steps (NFE {nfe(gen_m)}):     {t_gen:.3f} s  ({t_gen / a.batch * 1e3:.2f} ms/image)",
             f"speed-up: {t_teacher / t_gen:.1f}x (NFE bound {nfe(teacher_m) / nfe(gen_m):.0f}x)"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
