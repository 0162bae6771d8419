"""Can the hps analogue learn preference near the model's own samples? (issue 21, item 1.)

Measures the rewards stage's hps analogue and one trained on near data with the stage's own fit
(`dmdr.rewards.train_reward`, its label noise, batch and learning rate) on the rewards stage's near pairs (every pair of one test prompt's 4 teacher-4 samples whose gold
differs: `rewards.near_agreement`'s pairs), split by what differs in the pair: faithfulness (then gold's sign is always
faithfulness's) or only aesthetics:
- stage: `models/rewards/hps`, trained on per train prompt the teacher at 6 steps CFG 3 and 3 steps CFG 1, an exact and
  a degraded render;
- near: as HPS v2 was collected, many samplers' images of one prompt: the teacher's weights in the 4-step generator
  sampler (twice, as a 4-step student starts), and the teacher at 4 steps CFG 2, 6 steps CFG 3, 12 steps CFG 4.5 and
  3 steps CFG 1, with the two renders, on as many train prompts; `--steps` updates.
The world's CLIP untrained (the clip reward) is the reference. The gate it is measured against is issue 21's, stated
there before any run: near agreement at least `rewards.NEAR_GATE`.

    python benchmarks/near_rewards.py [--prompts 1000] [--steps 2000] [--out FILE]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config  # noqa: E402
from dmdr.evaluator import to_tensor  # noqa: E402
from dmdr.prompts import load_prompts, test_specs  # noqa: E402
from dmdr.rewards import (NEAR_GATE, CosineReward, build_pairs, few_step_samples, load_reward,  # noqa: E402
                          sample_images, train_reward)
from dmdr.standins import World  # noqa: E402
from dmdr.world import grammar, parse  # noqa: E402
from dmdr.world.score import faithfulness  # noqa: E402

from output import emit  # noqa: E402

SAMPLERS = (("generator", 4, 1.0), ("generator", 4, 1.0), ("teacher", 4, 2.0), ("teacher", 6, 3.0),
            ("teacher", 12, 4.5), ("teacher", 3, 1.0))


def samples(world, specs: list, sampler: str, steps: int, cfg: float, seed: int, batch: int = 256) -> np.ndarray:
    """One image per prompt from the teacher's weights in the generator's `steps`-step sampler or its own with CFG."""
    return sample_images(world, [grammar.text(x) for x in specs], torch.Generator().manual_seed(seed), sampler, steps,
                         cfg, batch)


@torch.no_grad()
def agreement_by_kind(model, near, differs: np.ndarray) -> dict:
    """Agreement with gold on all near pairs, on those whose faithfulness `differs`, and on the aesthetic-only rest."""
    scores = torch.cat([model(to_tensor(near.images[s:s + 512]), near.texts[s:s + 512])
                        for s in range(0, len(near.texts), 512)]).numpy()
    a, b = near.pairs.T
    ok = (scores[a] > scores[b]) == (near.gold[a] > near.gold[b])
    return {"all": ok.mean(), "faithfulness differs": ok[differs].mean(), "aesthetics only": ok[~differs].mean()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out")
    a = ap.parse_args()
    p, t0 = config.load("params.yaml"), time.time()
    r = p.rewards
    torch.manual_seed(p.seed)
    world = World.load()
    train = [grammar.read(t) for t in load_prompts("data/prompts/train.txt")]
    tests = test_specs(Path("data/prompts"))
    near = build_pairs(tests, few_step_samples(world, tests, p.seed + 2), np.random.default_rng(p.seed), renders=False)
    faith = np.array([faithfulness(grammar.read(t), parse(im)) for t, im in zip(near.texts, near.images)])
    differs = faith[near.pairs[:, 0]] != faith[near.pairs[:, 1]]
    rows = {"clip (untrained)": agreement_by_kind(CosineReward(world.clip), near, differs),
            f"hps of the rewards stage ({r.steps} steps)": agreement_by_kind(load_reward("hps"), near, differs)}
    own = [samples(world, train[: a.prompts], *s, p.seed + 100 + i) for i, s in enumerate(SAMPLERS)]
    pairs = build_pairs(train[: a.prompts], np.stack(own, 1), np.random.default_rng(p.seed))
    model = train_reward("hps", world.clip, pairs, a.steps, r.batch, r.lr, r.hps_label_noise, p.seed + 10)
    rows[f"hps on near data ({len(pairs.pairs)} pairs, {a.steps} steps)"] = agreement_by_kind(model, near, differs)
    lines = [f"hps analogue's agreement with gold near the model's own samples ({len(near.pairs)} pairs of one test "
             f"prompt's teacher-4 samples: {differs.sum()} differ in faithfulness, {(~differs).sum()} only in "
             f"aesthetics); gate: all >= {NEAR_GATE}",
             f"{'reward':58s} {'all':>6s} {'faithfulness differs':>21s} {'aesthetics only':>16s}"]
    lines += [f"{k:58s} {v['all']:6.3f} {v['faithfulness differs']:21.3f} {v['aesthetics only']:16.3f}"
              for k, v in rows.items()]
    lines.append(f"{(time.time() - t0) / 60:.1f} min")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
