"""Cost of a training step of each DMDR phase relative to a DMD-only step, measured side by side in one run on the
world's teacher and rewards (`dmdr.distill.train`, the recipe defaults of params.yaml):

    RT-DM step  / DMD step   (goal <= 1.15x: the reward of the full few-step output, no reward gradient)
    stage-2 step / DMD step  (goal <= 1.3x: + ReFL through the VAE decoder and the reward model)
    DPO, GRPO stage-2 step / ReFL stage-2 step  (goal <= 2x: they draw their own samples, groups of 4 a prompt)

The phases take turns, `--rounds` times, and each reports its median seconds per generator step, so drift of the
machine's speed hits all of them alike, and how that step splits into the method's own turns (`DMDR.fake_step`,
`dynadg_step`, `generator_step`, timed where the loop calls them).

    python benchmarks/step_cost.py [--steps 4] [--rounds 3] [--batch 16] [--out FILE]
"""
import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config, distill  # noqa: E402
from dmdr.distill import DMDR  # noqa: E402
from dmdr.models import LatentDecoder  # noqa: E402
from dmdr.prompts import load_prompts  # noqa: E402
from dmdr.rewards import load_reward  # noqa: E402
from dmdr.standins import World  # noqa: E402

PHASES = {
    "DMD": {},
    "RT-DM": {"rtdm": {"enabled": True}},
    "stage 1 (RT-DM + DynaDG + DynaRS)": {"rtdm": {"enabled": True}, "dynadg": {"form": "paper"},
                                          "dynars": {"enabled": True}},
    "stage 2 (DMD + ReFL)": {"rl": {"weight": 0.5}},
    "stage 2 (DMD + DPO)": {"rl": {"weight": 0.5, "loss": "dpo"}, "samples_per_prompt": 4},
    "stage 2 (DMD + GRPO)": {"rl": {"weight": 0.5, "loss": "grpo"}, "samples_per_prompt": 4},
}
REFL = "stage 2 (DMD + ReFL)"
TURNS = ("fake_step", "dynadg_step", "generator_step")


@contextlib.contextmanager
def timed_turns(seconds: dict):
    """The method's turns, each adding its wall time to `seconds[turn]` while the loop runs them."""
    originals = {name: getattr(DMDR, name) for name in TURNS}

    def timed(name, turn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return turn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
        return run
    for name, turn in originals.items():
        setattr(DMDR, name, timed(name, turn))
    try:
        yield seconds
    finally:
        for name, turn in originals.items():
            setattr(DMDR, name, turn)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="generator steps per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, help="default: distill.batch of params.yaml")
    ap.add_argument("--out", help="also write the printed lines to this file")
    a = ap.parse_args()
    p = config.load("params.yaml")
    world = World.load()
    world.vae.requires_grad_(False)
    reward = load_reward(p.distill.rl.reward)
    prompts = load_prompts("data/prompts/train.txt")
    base = dataclasses.asdict(p.distill) | {"steps": a.steps, "log_every": 10_000_000}  # no row but the last
    if a.batch:
        base["batch"] = a.batch
    times, turns = {k: [] for k in PHASES}, {k: [] for k in PHASES}
    for r in range(a.rounds):
        for name, over in PHASES.items():
            cfg = config.build(config.DistillParams, config.deep_merge(base, over))
            models = distill.init_models(copy.deepcopy(world.teacher), world.encode, world.encode([""]), cfg=cfg,
                                         decode=LatentDecoder(world.vae), reward=reward)
            distill.train(dataclasses.replace(cfg, steps=1), models, prompts, seed=r)  # warm-up: allocator, LoRA, threads
            t = time.perf_counter()
            with timed_turns({}) as seconds:
                distill.train(cfg, models, prompts, seed=r)
            times[name].append((time.perf_counter() - t) / a.steps)
            turns[name].append({k: v / a.steps for k, v in seconds.items()})
    dmd, refl = statistics.median(times["DMD"]), statistics.median(times[REFL])
    lines = [f"batch {base['batch']}, {a.steps} generator steps x {a.rounds} rounds, ttur {base['ttur']}, "
             f"{base['generator_steps']}-step generator, CPU threads {torch.get_num_threads()}"]
    for name, ts in times.items():
        split = ", ".join(f"{k} {statistics.median(t.get(k, 0.0) for t in turns[name]):.2f} s" for k in TURNS
                          if any(k in t for t in turns[name]))
        versus = f"{statistics.median(ts) / refl:5.2f}x ReFL" if "stage 2" in name else " " * 10
        lines.append(f"{name:36s} {statistics.median(ts):6.2f} s/step   {statistics.median(ts) / dmd:5.2f}x DMD  "
                     f"{versus}   ({split})")
    print("\n".join(lines))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
