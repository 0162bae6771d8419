"""How far DynaDG actually pulls the real score toward the fake one, for the learning rates it could train with: the
first generator steps of a stage-1 recipe from the teacher (RT-DM, DynaDG and DynaRS as the recipe has them), once per
`dynadg.lr`, logging every 2 steps the pull |x0_real(LoRA) - x0_real(no LoRA)| / |x0_fake - x0_real(no LoRA)| (the
curve's `dynadg_pull`: 0 is no pull, 1 as far as the DMD signal) and the test reward.

The rule this measures for (issue 21, item 2), stated before any run that uses it: DynaDG's learning rate is the
smallest of the grid whose mean pull over the first 20 steps reaches 0.1 of the DMD signal; if none does, the largest.

    python benchmarks/dynadg_pull.py [--recipe dmdr-stage1-4] [--steps 20] [--lrs 1e-4,1e-3,1e-2] [--out FILE]
"""
import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config  # noqa: E402
from dmdr.distill import distill_stage  # noqa: E402
from dmdr.embedded import WorldTeacher  # noqa: E402
from dmdr.prompts import load_prompts  # noqa: E402
from dmdr.rewards import load_reward  # noqa: E402
from dmdr.standins import World  # noqa: E402

from output import emit  # noqa: E402

THRESHOLD = 0.1


def pulls(cfg, teacher, reward, prompts, seed: int) -> list[dict]:
    """The logged rows of `cfg` from the teacher (exported to a scratch folder, then dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        *_, rows = distill_stage(cfg, teacher, prompts, seed, Path(tmp) / "out", Path(tmp) / "ckpt", reward)
    return [r for r in rows if r.get("dynadg_pull") not in (None, "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="dmdr-stage1-4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    ap.add_argument("--out")
    a = ap.parse_args()
    p = config.load("params.yaml")
    base = config.recipe(p, a.recipe)
    if base.dynadg.form != "paper" or base.init not in config.TEACHERS:
        sys.exit(f"{a.recipe}: a stage-1 recipe from a teacher with dynadg.form paper is needed")
    torch.manual_seed(p.seed)
    teacher = WorldTeacher(World.load())
    reward = load_reward(base.rl.reward)
    prompts = load_prompts("data/prompts/train.txt")
    lines = [f"DynaDG's pull over the first {a.steps} steps of {a.recipe} (rank {base.dynadg.rank}, "
             f"{base.dynadg.steps} annealing steps), logged every 2 steps; rule: the smallest lr whose mean pull "
             f"reaches {THRESHOLD}"]
    chosen = None
    for lr in [float(x) for x in a.lrs.split(",")]:
        cfg = dataclasses.replace(base, steps=a.steps, log_every=2, checkpoint_every=0,
                                  dynadg=dataclasses.replace(base.dynadg, lr=lr))
        rows = pulls(cfg, teacher, reward, prompts, p.seed + cfg.seed)
        mean = statistics.mean(float(r["dynadg_pull"]) for r in rows)
        lines.append(f"lr {lr:8.0e}  mean pull {mean:7.4f}  max {max(float(r['dynadg_pull']) for r in rows):7.4f}  "
                     f"by step: " + " ".join(f"{int(r['step'])}:{float(r['dynadg_pull']):.3f}" for r in rows))
        if chosen is None and mean >= THRESHOLD:
            chosen = lr
    lines.append(f"rule: dynadg.lr {chosen if chosen is not None else float(a.lrs.split(',')[-1]):g}")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
