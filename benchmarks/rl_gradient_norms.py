"""The rule that sets lambda of the RL objectives the paper gives no lambda for (DPO, GRPO): each gets the lambda at
which its RL gradient, on the stage-1 generator where stage 2 starts, has the mean norm that ReFL's has at the
paper's lambda (0.5 in `dmdr-4`), rounded to two significant digits. Measured here, before any of their runs, on the
world's teacher and reward: the generator's gradient norm of each loss alone (L_DMD for scale, and each RL
objective with lambda 1) over `--batches` batches of the recipe's size, its groups of `samples_per_prompt`.

    python benchmarks/rl_gradient_norms.py [--init models/distill/dmdr-stage1-4] [--batches 8] [--out FILE]

The class world's rule (Table 6), where stage 2 starts from the teacher: ReFL on the classifier gets the lambda at
which its gradient's norm is RATIO times DMD's on the recipe's start, RATIO being what lambda 0.5 gives ReFL on hps
at the stage-1 init (0.5 x 0.7614 / 0.5164 = 0.74, results/benchmarks/rl_gradient_norms.txt):

    python benchmarks/rl_gradient_norms.py --recipe cls-1-cfg1p5-rl --init models/world/teacher \
        --samples-per-prompt 1 --ratio 0.74
"""
import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config, distill  # noqa: E402
from dmdr.class_world import CAPTIONS  # noqa: E402
from dmdr.draws import Draws  # noqa: E402
from dmdr.embedded import WorldTeacher  # noqa: E402
from dmdr.loop import Engine  # noqa: E402
from dmdr.models import load_backbone  # noqa: E402
from dmdr.prompts import load_prompts  # noqa: E402
from dmdr.rewards import load_reward  # noqa: E402
from dmdr.standins import World  # noqa: E402

from output import emit  # noqa: E402

LOSSES = {"DMD": {"dmd_weight": 1.0, "rl": {"weight": 0.0}},
          "ReFL": {"dmd_weight": 0.0, "rl": {"weight": 1.0, "loss": "refl"}},
          "DPO": {"dmd_weight": 0.0, "rl": {"weight": 1.0, "loss": "dpo"}},
          "GRPO": {"dmd_weight": 0.0, "rl": {"weight": 1.0, "loss": "grpo"}}}


def gradient_norms(cfg, teacher, start, start_fake, reward, prompts, batches: int) -> list[float]:
    """The generator's gradient norm of the loss `cfg` makes (one generator step's, no update), per batch."""
    models = distill.init_models(teacher.model, teacher.encode, teacher.uncond, start, start_fake, cfg,
                                 decode=teacher.decode, reward=reward, latent_shape=teacher.latent_shape)
    engine = Engine(cfg)
    method = distill.DMDR(cfg, models, prompts, Draws(0, cfg.batch, engine.mine, engine.device), engine)
    engine.prepare(method)
    params = [p for p in method.generator.parameters() if p.requires_grad]
    norms = []

    def measure(name, loss_of, step):
        loss, _ = loss_of(slice(0, cfg.batch))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))))
        return loss.detach(), {}
    engine.fit = measure
    for step in range(batches):
        method.generator_step(step, 0.0)
    return norms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="models/distill/dmdr-stage1-4")
    ap.add_argument("--recipe", default="dmdr-4", help="the stage-2 recipe whose settings (and lambda) are ReFL's")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--ratio", type=float, help="instead: ReFL's lambda at which its gradient's norm is RATIO times "
                                                "DMD's (the class world's rule)")
    ap.add_argument("--out")
    a = ap.parse_args()
    p = config.load("params.yaml")
    base = config.recipe(p, a.recipe)
    torch.manual_seed(p.seed)
    world = World.load()
    teacher = WorldTeacher(world)
    start = start_fake = None  # from a teacher: generator and fake score are copies of it
    if a.init not in config.TEACHERS:
        start = teacher.wrap(load_backbone(Path(a.init), world.latent_shape))
        start_fake = teacher.wrap(load_backbone(Path(a.init) / "fake", world.latent_shape))
    reward = load_reward(base.rl.reward)
    prompts = list(CAPTIONS) if base.prompts == "classes" else load_prompts("data/prompts/train.txt")
    if a.ratio is not None:
        return class_rule(a, base, teacher, start, start_fake, reward, prompts)
    means = {}
    for name, over in LOSSES.items():
        cfg = config.build(config.DistillParams, config.deep_merge(
            dataclasses.asdict(base), over | {"samples_per_prompt": a.samples_per_prompt}))
        means[name] = statistics.mean(gradient_norms(cfg, teacher, start, start_fake, reward, prompts, a.batches))
    refl = base.rl.weight * means["ReFL"]
    lines = [f"generator gradient norms on {a.init}, batch {base.batch} ({a.samples_per_prompt} samples a prompt), "
             f"mean of {a.batches} batches; ReFL at the lambda of {a.recipe} ({base.rl.weight}): {refl:.4g}"]
    for name, norm in means.items():
        rule = f"   lambda {float(f'{refl / norm:.2g}'):g}" if name in ("DPO", "GRPO") else ""
        lines.append(f"{name:5s} |grad L| {norm:10.4g}{rule}")
    emit(lines, a.out)


def class_rule(a, base, teacher, start, start_fake, reward, prompts):
    means = {}
    for name in ("DMD", "ReFL"):
        cfg = config.build(config.DistillParams, config.deep_merge(
            dataclasses.asdict(base), LOSSES[name] | {"samples_per_prompt": a.samples_per_prompt}))
        means[name] = statistics.mean(gradient_norms(cfg, teacher, start, start_fake, reward, prompts, a.batches))
    lam = float(f"{a.ratio * means['DMD'] / means['ReFL']:.2g}")
    lines = [f"generator gradient norms of {a.recipe}'s settings on {a.init}, reward {base.rl.reward}, batch "
             f"{base.batch}, mean of {a.batches} batches",
             f"DMD   |grad L| {means['DMD']:10.4g}", f"ReFL  |grad L| {means['ReFL']:10.4g}",
             f"lambda at which |lambda grad ReFL| = {a.ratio:g} |grad DMD|: {lam:g}"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
