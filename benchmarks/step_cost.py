"""Cost of a training step of each DMDR phase relative to a DMD-only step, measured side by side in one run on the
world's teacher and rewards (`dmdr.distill.train`, the recipe defaults of params.yaml):

    RT-DM step  / DMD step   (goal <= 1.15x: the reward of the full few-step output, no reward gradient)
    stage-2 step / DMD step  (goal <= 1.3x: + ReFL through the VAE decoder and the reward model)
    DPO, GRPO stage-2 step / ReFL stage-2 step  (goal <= 2x: they draw their own samples, groups of 4 a prompt)

The phases take turns, `--rounds` times, and each reports its median seconds per generator step, so drift of the
machine's speed hits all of them alike, and how that step splits into the method's own turns (`DMDR.fake_step`,
`dynadg_step`, `generator_step`, timed where the loop calls them).

    python benchmarks/step_cost.py [--steps 4] [--rounds 3] [--batch 16] [--out FILE]

`--cores` measures instead how a DMD step uses this machine's cores, which `make repro`'s stages-at-once rests on
(pipeline/repro.py): its seconds per step in one process at 2 threads, at 1 thread, and in two processes at 1 thread
each running at once, and the work two such processes do against one process at 2 threads.
"""
import argparse
import contextlib
import copy
import dataclasses
import multiprocessing
import os
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

from output import emit  # noqa: E402

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


def setup(steps: int, batch: int | None):
    """The world, the training reward, the training prompts and the recipe defaults for `steps` timed steps."""
    p = config.load("params.yaml")
    world = World.load()
    world.vae.requires_grad_(False)
    base = dataclasses.asdict(p.distill) | {"steps": steps, "log_every": 10_000_000}  # no row but the last
    if batch:
        base["batch"] = batch
    return world, load_reward(p.distill.rl.reward), load_prompts("data/prompts/train.txt"), base


def time_phase(world, reward, prompts, base: dict, over: dict, seed: int) -> tuple[float, dict]:
    """Seconds per generator step of one phase (`over` on the recipe defaults), after a warm-up step, and its turns'."""
    cfg = config.build(config.DistillParams, config.deep_merge(base, over))
    models = distill.init_models(copy.deepcopy(world.teacher), world.encode, world.encode([""]), cfg=cfg,
                                 decode=LatentDecoder(world.vae), reward=reward)
    distill.train(dataclasses.replace(cfg, steps=1), models, prompts, seed=seed)  # warm-up: allocator, LoRA, threads
    t = time.perf_counter()
    with timed_turns({}) as seconds:
        distill.train(cfg, models, prompts, seed=seed)
    return (time.perf_counter() - t) / cfg.steps, {k: v / cfg.steps for k, v in seconds.items()}


def dmd_step_seconds(threads: int, steps: int, batch: int | None, start, result) -> None:
    """A process's DMD seconds per step at `threads` torch threads, timed once every process of its round is ready."""
    torch.set_num_threads(threads)
    world, reward, prompts, base = setup(steps, batch)
    start.wait()
    result.put(time_phase(world, reward, prompts, base, {}, seed=0)[0])


def cores(a) -> list[str]:
    """DMD's step in one process at 2 threads, at 1, and in two 1-thread processes at once (pipeline/repro.py)."""
    ctx = multiprocessing.get_context("spawn")
    seconds = {}
    for label, threads, processes in (("one process, 2 threads", 2, 1), ("one process, 1 thread", 1, 1),
                                      ("two processes at once, 1 thread each", 1, 2)):
        start, result = ctx.Barrier(processes), ctx.Queue()
        workers = [ctx.Process(target=dmd_step_seconds, args=(threads, a.steps, a.batch, start, result))
                   for _ in range(processes)]
        for w in workers:
            w.start()
        seconds[label] = [result.get() for _ in workers]
        for w in workers:
            w.join()
    one, two = seconds["one process, 2 threads"][0], seconds["two processes at once, 1 thread each"]
    lines = [f"DMD step, batch {a.batch or config.load('params.yaml').distill.batch}, {a.steps} timed generator steps, "
             f"{len(os.sched_getaffinity(0))} usable cores"]
    lines += [f"{label:40s} " + ", ".join(f"{s:5.2f}" for s in ss) + " s/step" for label, ss in seconds.items()]
    lines.append(f"two 1-thread processes do {sum(one / s for s in two):.2f}x the work of one at 2 threads; "
                 f"a second thread speeds one process up {seconds['one process, 1 thread'][0] / one:.2f}x")
    return lines


def phases(a) -> list[str]:
    """Each phase's median seconds per step over the rounds, its ratios and its turns."""
    world, reward, prompts, base = setup(a.steps, a.batch)
    times, turns = {k: [] for k in PHASES}, {k: [] for k in PHASES}
    for r in range(a.rounds):
        for name, over in PHASES.items():
            sec, split = time_phase(world, reward, prompts, base, over, seed=r)
            times[name].append(sec)
            turns[name].append(split)
    dmd, refl = statistics.median(times["DMD"]), statistics.median(times[REFL])
    lines = [f"batch {base['batch']}, {a.steps} generator steps x {a.rounds} rounds, ttur {base['ttur']}, "
             f"{base['generator_steps']}-step generator, CPU threads {torch.get_num_threads()}"]
    for name, ts in times.items():
        split = ", ".join(f"{k} {statistics.median(t.get(k, 0.0) for t in turns[name]):.2f} s" for k in TURNS
                          if any(k in t for t in turns[name]))
        versus = f"{statistics.median(ts) / refl:5.2f}x ReFL" if "stage 2" in name else " " * 10
        lines.append(f"{name:36s} {statistics.median(ts):6.2f} s/step   {statistics.median(ts) / dmd:5.2f}x DMD  "
                     f"{versus}   ({split})")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="generator steps per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, help="default: distill.batch of params.yaml")
    ap.add_argument("--cores", action="store_true", help="threads against processes (above) instead of the phases")
    ap.add_argument("--out", help="also write the printed lines to this file")
    a = ap.parse_args()
    lines = cores(a) if a.cores else phases(a)
    emit(lines, a.out)


if __name__ == "__main__":
    main()
