"""Can the hps analogue learn preference near the model's own samples? (issue 21, item 1.)

Measures the rewards stage's hps analogue and one trained on near data with the stage's own fit
(`dmdr.rewards.train_reward`, its label noise, batch and learning rate) on the rewards stage's near pairs (every pair
of one test prompt's 4 teacher-4 samples whose gold differs: `rewards.near_agreement`'s pairs), split by what differs
in the pair: faithfulness or only aesthetics:
- stage: `models/rewards/hps`, trained on per train prompt the teacher at 6 steps CFG 3 and 3 steps CFG 1, an exact and
  a degraded render;
- near: as HPS v2 was collected, many samplers' images of one prompt: the teacher's weights in the 4-step generator
  sampler (twice, as a 4-step student starts), and the teacher at 4 steps CFG 2, 6 steps CFG 3, 12 steps CFG 4.5 and
  3 steps CFG 1, with the two renders, on as many train prompts; `--steps` updates.
The world's CLIP untrained (the clip reward) is the reference. The gate it is measured against is issue 21's, stated
there before any run: near agreement at least `rewards.NEAR_GATE`.

Two other forms of reward, fitted to the same near data by the stage's fit, ask whether the cosine form is what falls
short: the CLIP with an MLP head on its image tokens beside the cosine (as ImageReward puts a head on its encoder), and
a small convolutional net on the pixels, conditioned on the CLIP's text embedding (FiLM), with a higher learning rate
(it starts from nothing). A last column measures every reward on pairs from the training distribution: one held-out
train prompt's 4 teacher-4 samples (`--held` prompts the fits never saw), so that a shift from the train prompts to the
test prompts is told apart from a fit that does not generalise.

    python benchmarks/near_rewards.py [--prompts 1000] [--steps 2000] [--held 300] [--out FILE]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config  # noqa: E402
from dmdr.evaluator import to_tensor  # noqa: E402
from dmdr.prompts import load_prompts, test_specs  # noqa: E402
from dmdr.rewards import (NEAR_GATE, CosineReward, bradley_terry_loss, build_pairs, few_step_samples,  # noqa: E402
                          load_reward, sample_images, train_reward)
from dmdr.standins import World, train_loop  # noqa: E402
from dmdr.world import grammar, parse  # noqa: E402
from dmdr.world.score import faithfulness  # noqa: E402

from output import emit  # noqa: E402

SAMPLERS = (("generator", 4, 1.0), ("generator", 4, 1.0), ("teacher", 4, 2.0), ("teacher", 6, 3.0),
            ("teacher", 12, 4.5), ("teacher", 3, 1.0))


def samples(world, specs: list, sampler: str, steps: int, cfg: float, seed: int, batch: int = 256) -> np.ndarray:
    """One image per prompt from the teacher's weights in the generator's `steps`-step sampler or its own with CFG."""
    return sample_images(world, [grammar.text(x) for x in specs], torch.Generator().manual_seed(seed), sampler, steps,
                         cfg, batch)


class TokenHeadReward(nn.Module):
    """The CLIP's cosine plus an MLP on the mean and max of its image tokens, the head starting at zero."""

    def __init__(self, clip, hidden: int = 128):
        super().__init__()
        self.clip = clip
        clip.clip.visual.output_tokens = True
        self.head = nn.Sequential(nn.Linear(2 * clip.cfg.width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, images, texts):
        pooled, tokens = self.clip.clip.visual(images)
        cosine = (nn.functional.normalize(pooled, dim=-1) * self.clip.encode_text(texts)).sum(-1)
        return cosine + self.head(torch.cat([tokens.mean(1), tokens.amax(1)], -1)).squeeze(-1)


class PixelReward(nn.Module):
    """A small convolutional net on the pixels, its features modulated by the frozen CLIP's text embedding (FiLM)."""

    def __init__(self, clip, width: int = 64):
        super().__init__()
        self.text = clip.requires_grad_(False).encode_text
        self.conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, width, 3, 2, 1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.GELU(), nn.Conv2d(width, width, 3, 1, 1))
        self.film = nn.Linear(clip.cfg.embed_dim, 2 * width)
        self.head = nn.Sequential(nn.Linear(2 * width, 128), nn.GELU(), nn.Linear(128, 1))

    def forward(self, images, texts):
        with torch.no_grad():
            t = self.text(texts)
        gain, bias = self.film(t)[:, :, None, None].chunk(2, 1)
        h = nn.functional.gelu(self.conv(images) * (1 + gain) + bias)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], -1)).squeeze(-1)


def fit(model: nn.Module, pairs, steps: int, batch: int, lr: float, label_noise: float, seed: int) -> nn.Module:
    """`rewards.train_reward`'s fit (Bradley-Terry on noisy gold labels, a learned temperature, the stand-ins' loop)
    for a model it does not build."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ordered = pairs.labels("gold", label_noise, rng)
    scale = nn.Parameter(torch.tensor(20.0).log())
    model.register_parameter("log_scale", scale)

    def loss_fn(step):
        idx = ordered[rng.integers(len(ordered), size=batch)].reshape(-1)
        s = model(to_tensor(pairs.images[idx]), [pairs.texts[i] for i in idx]).view(batch, 2)
        return bradley_terry_loss(s[:, 0], s[:, 1], scale.exp())

    train_loop(model, loss_fn, steps, lr, desc=type(model).__name__, warmup=20)
    del model.log_scale
    return model.requires_grad_(False).eval()


def faithfulness_differs(pairs) -> np.ndarray:
    """Per pair: whether its two images differ in faithfulness (else only in aesthetics)."""
    faith = np.array([faithfulness(grammar.read(t), parse(im)) for t, im in zip(pairs.texts, pairs.images)])
    return faith[pairs.pairs[:, 0]] != faith[pairs.pairs[:, 1]]


def model_scores(model):
    """Per-image scores of a reward model, as `agreement_by_kind` reads them."""
    @torch.no_grad()
    def scores(pairs) -> np.ndarray:
        return torch.cat([model(to_tensor(pairs.images[s:s + 512]), pairs.texts[s:s + 512])
                          for s in range(0, len(pairs.texts), 512)]).numpy()
    return scores


def agreement_by_kind(scores_of, near, differs: np.ndarray, held) -> dict:
    """Agreement with gold of the per-image scores `scores_of(pairs)` on all near pairs, on those whose faithfulness
    `differs`, on the aesthetic-only rest, and on the `held` pairs of held-out train prompts."""
    def agrees(pairs) -> np.ndarray:
        scores = scores_of(pairs)
        a, b = pairs.pairs.T
        return (scores[a] > scores[b]) == (pairs.gold[a] > pairs.gold[b])
    ok = agrees(near)
    return {"all": ok.mean(), "faithfulness differs": ok[differs].mean(), "aesthetics only": ok[~differs].mean(),
            "held-out train prompts": agrees(held).mean()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--held", type=int, default=300)
    ap.add_argument("--out")
    a = ap.parse_args()
    p, t0 = config.load("params.yaml"), time.time()
    r = p.rewards
    torch.manual_seed(p.seed)
    world = World.load()
    train = [grammar.read(t) for t in load_prompts("data/prompts/train.txt")]
    tests = test_specs(Path("data/prompts"))
    near = build_pairs(tests, few_step_samples(world, tests, p.seed + 2), np.random.default_rng(p.seed), renders=False)
    differs = faithfulness_differs(near)
    unseen = train[a.prompts: a.prompts + a.held]
    held = build_pairs(unseen, few_step_samples(world, unseen, p.seed + 3), np.random.default_rng(p.seed), renders=False)
    rows = {"clip (untrained)": agreement_by_kind(model_scores(CosineReward(world.clip)), near, differs, held)}
    rows[f"hps of the rewards stage ({r.steps} steps)"] = agreement_by_kind(model_scores(load_reward("hps")), near,
                                                                           differs, held)
    own = [samples(world, train[: a.prompts], *s, p.seed + 100 + i) for i, s in enumerate(SAMPLERS)]
    pairs = build_pairs(train[: a.prompts], np.stack(own, 1), np.random.default_rng(p.seed))
    fits = {"hps on near data": lambda: train_reward("hps", world.clip, pairs, a.steps, r.batch, r.lr,
                                                     r.hps_label_noise, p.seed + 10),
            "clip + head on image tokens, near data": lambda: fit(TokenHeadReward(copy.deepcopy(world.clip)), pairs,
                                                                  a.steps, r.batch, r.lr, r.hps_label_noise, p.seed + 10),
            "pixel CNN + text FiLM (lr 1e-3), near data": lambda: fit(PixelReward(copy.deepcopy(world.clip)), pairs,
                                                                      a.steps, r.batch, 1e-3, r.hps_label_noise,
                                                                      p.seed + 10)}
    for name, make in fits.items():
        rows[f"{name} ({a.steps} steps)"] = agreement_by_kind(model_scores(make()), near, differs, held)
    columns = ("all", "faithfulness differs", "aesthetics only", "held-out train prompts")
    lines = [f"hps analogue's agreement with gold near the model's own samples ({len(near.pairs)} pairs of one test "
             f"prompt's teacher-4 samples: {differs.sum()} differ in faithfulness, {(~differs).sum()} only in "
             f"aesthetics; {len(held.pairs)} pairs of {a.held} held-out train prompts' alike); fits on "
             f"{len(pairs.pairs)} near pairs of {a.prompts} train prompts; gate: all >= {NEAR_GATE}",
             f"{'reward':52s} " + " ".join(f"{c:>{max(6, len(c))}s}" for c in columns)]
    lines += [f"{k:52s} " + " ".join(f"{v[c]:{max(6, len(c))}.3f}" for c in columns) for k, v in rows.items()]
    lines.append(f"{(time.time() - t0) / 60:.1f} min")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
