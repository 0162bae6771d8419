"""Reward models: images and prompts in, differentiable scores out.

One interface for every reward, embedded or real: `reward(images, texts) -> (B,)` with images (B, 3, H, W) in
[-1, 1], differentiable in the images so ReFL can push its gradient through the VAE decoder into the generator.

Embedded analogues of the paper's rewards (trained by the `rewards` stage, the world's second half):
- clip: cosine of the world's CLIP (the teachers' text encoder), as DFN-CLIP is used in the paper.
- hps / pick: a copy of that CLIP fine-tuned on preference pairs with the Bradley-Terry loss, as HPSv2 and PickScore
  fine-tune CLIP on human choices. Score = cosine(image, text), the unit HPSv2 reports.
- aesthetic: an MLP on the frozen CLIP image embedding, as the LAION aesthetic predictor; prompt-blind.
Pairs are labelled by the gold preference (world.score.gold), with label noise, from a finite pool of teacher
samples and (degraded) renders: proxies of gold that can be gamed, so reward hacking is visible.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .config import parse_spec
from .reward_terms import Combined
from .models import atomic_dir, require_dir
from .tiny_clip import TinyClip
from .world import grammar, render
from .world.scene import COLORS

class CosineReward(nn.Module):
    """Image-text cosine of a CLIP: the clip reward on the world's CLIP; the HPS / Pick analogues on a CLIP
    fine-tuned to rank preferred images higher."""

    def __init__(self, clip: TinyClip):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.clip.encode_image(images) * self.clip.encode_text(texts)).sum(-1)


class AestheticModel(nn.Module):
    """Aesthetic analogue: an MLP on the frozen CLIP image embedding (prompt-blind), as LAION's predictor."""

    def __init__(self, clip: TinyClip, hidden: int = 64):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(clip.cfg.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        return self.head(self.clip.encode_image(images)).squeeze(-1)


def load_reward(spec: str, world: Path = Path("models/world"), root: Path = Path("models/rewards"),
                classifier: Path = Path("models/classifier")) -> nn.Module:
    """The reward a spec names, frozen, from the world's CLIP (clip), the world classifier on the independent CLIP
    (classifier: Table 6's) and the rewards stage's checkpoints (the rest)."""
    weights = parse_spec(spec)
    models = {}
    for name in weights:
        if name == "clip":
            models[name] = CosineReward(TinyClip.load(world / "clip"))
        elif name == "classifier":
            from .classifier import ClassReward, WorldClassifier
            models[name] = ClassReward(WorldClassifier.load(TinyClip.load(world / "clip_eval"), classifier))
        elif name == "aesthetic":
            models[name] = load_aesthetic(root / name)
        else:
            models[name] = CosineReward(TinyClip.load(root / name))
    model = models[spec] if spec in models else Combined(models, weights)
    return model.requires_grad_(False).eval()


def save_aesthetic(model: AestheticModel, path: Path) -> Path:
    from safetensors.torch import save_file

    def write(d: Path):
        model.clip.save(d / "clip")
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, d / "head.safetensors")
        (d / "config.json").write_text(json.dumps({"hidden": model.head[0].out_features}))
    return atomic_dir(path, write)


def load_aesthetic(path: Path) -> AestheticModel:
    from safetensors.torch import load_file
    path = require_dir(path, "aesthetic reward")
    m = AestheticModel(TinyClip.load(path / "clip"), json.loads((path / "config.json").read_text())["hidden"])
    m.head.load_state_dict(load_file(path / "head.safetensors"))
    return m.eval()


# --- preference data ------------------------------------------------------------------------------------------


def degrade(spec: grammar.Spec, objs: list, rng: np.random.Generator) -> np.ndarray:
    """A render of the prompt's scene with one flaw people dislike: an object missing or recoloured, an extra
    object, blur, or noise."""
    from .world.scene import place
    kind = rng.integers(5)
    objs = list(objs)
    if kind == 0 and len(objs) > 1:
        objs.pop(int(rng.integers(len(objs))))
    elif kind == 1:
        i = int(rng.integers(len(objs)))
        others = [c for c in COLORS if c != objs[i].color]
        objs[i] = dataclasses.replace(objs[i], color=str(rng.choice(others)))
    elif kind == 2:
        extra = place(rng, str(rng.choice(["circle", "square", "triangle"])), str(rng.choice(list(COLORS))),
                      "small", objs)
        objs += [extra] if extra is not None else []
    image = render(objs).astype(np.float64)
    if kind == 3:
        image = ndimage.gaussian_filter(image, sigma=(rng.uniform(0.8, 1.5),) * 2 + (0,))
    if kind == 4:
        image = image + rng.normal(0, rng.uniform(10, 25), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass
class Pairs:
    """Preference pairs: images[a] preferred to images[b] for texts[i], with gold scores of every image."""
    images: np.ndarray  # (N, H, W, 3) uint8
    texts: list[str]    # per image
    gold: np.ndarray    # per image
    aesthetic: np.ndarray  # per image: the gold's prompt-blind half
    pairs: np.ndarray   # (P, 2) indices into images, same prompt

    def labels(self, key: str, noise: float, rng: np.random.Generator) -> np.ndarray:
        """(P, 2) index pairs ordered (winner, loser) by `key` (gold | aesthetic), each flipped with prob `noise`."""
        score = getattr(self, key)
        win_first = score[self.pairs[:, 0]] > score[self.pairs[:, 1]]
        win_first ^= rng.random(len(self.pairs)) < noise
        return np.where(win_first[:, None], self.pairs, self.pairs[:, ::-1])


def build_pairs(specs: list, samples: np.ndarray, rng: np.random.Generator, min_gap: float = 0.02,
                renders: bool = True) -> Pairs:
    """Candidates per prompt: its model samples (`samples`, (n_prompts, k, H, W, 3)) and, with `renders`, an exact
    render and a degraded render; every pair of candidates whose gold differs by more than `min_gap`."""
    from .world import parse
    from .world.score import aesthetics, gold

    images, texts, golds, aes, pairs = [], [], [], [], []
    for spec, own in zip(specs, samples):
        objs = grammar.scene_for(spec, rng)
        cands = list(own) + ([render(objs), degrade(spec, objs, rng)] if renders else [])
        base = len(images)
        text = grammar.text(spec)
        for im in cands:
            images.append(im)
            texts.append(text)
            dets = parse(im)
            golds.append(gold(im, spec, dets))
            aes.append(aesthetics(im, dets))
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                if abs(golds[base + i] - golds[base + j]) > min_gap:
                    pairs.append((base + i, base + j))
    return Pairs(np.stack(images), texts, np.array(golds), np.array(aes), np.array(pairs, dtype=np.int64))


def bradley_terry_loss(score_win: torch.Tensor, score_lose: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(scale (r_w - r_l)): the pairwise loss of HPSv2 / PickScore (a softmax over the two images)."""
    return nn.functional.softplus(-scale * (score_win - score_lose)).mean()


@torch.no_grad()
def agreement(model: nn.Module, pairs: Pairs, key: str = "gold", batch: int = 512) -> float:
    """Held-out pairwise agreement with the gold preference: how often the reward ranks a pair as gold does."""
    from .evaluator import to_tensor
    scores = torch.cat([model(to_tensor(pairs.images[s:s + batch]), pairs.texts[s:s + batch])
                        for s in range(0, len(pairs.texts), batch)]).numpy()
    truth = getattr(pairs, key)
    a, b = pairs.pairs[:, 0], pairs.pairs[:, 1]
    return float(np.mean((scores[a] > scores[b]) == (truth[a] > truth[b])))


def train_reward(kind: str, clip: TinyClip, pairs: Pairs, steps: int, batch: int, lr: float, label_noise: float,
                 seed: int) -> nn.Module:
    """Fit one reward model to noisy gold-labelled pairs (the Bradley-Terry loss)."""
    from .evaluator import to_tensor
    from .standins import train_loop
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = AestheticModel(copy.deepcopy(clip)) if kind == "aesthetic" else CosineReward(copy.deepcopy(clip))
    model.clip.requires_grad_(kind != "aesthetic")  # HPS / Pick fine-tune the whole CLIP; the aesthetic MLP only its head
    ordered = pairs.labels("aesthetic" if kind == "aesthetic" else "gold", label_noise, rng)
    scale = nn.Parameter(torch.tensor(4.0 if kind == "aesthetic" else 20.0).log())
    model.register_parameter("log_scale", scale)  # learned temperature, like CLIP's logit scale

    def loss_fn(step):
        idx = ordered[rng.integers(len(ordered), size=batch)]
        images = to_tensor(pairs.images[idx.reshape(-1)])
        texts = [pairs.texts[i] for i in idx.reshape(-1)]
        s = model(images, texts).view(batch, 2)
        return bradley_terry_loss(s[:, 0], s[:, 1], scale.exp())

    train_loop(model, loss_fn, steps, lr, desc=f"{kind} reward", warmup=20)
    del model.log_scale
    return model.requires_grad_(False).eval()


# --- the rewards stage ----------------------------------------------------------------------------------------

NEAR_GATE = 0.70  # issue 21's gate: hps ranks pairs of one prompt's few-step samples as gold does, at least this often


@torch.no_grad()
def sample_images(world, texts: list[str], g: torch.Generator, sampler: str = "generator", steps: int = 4,
                  cfg: float = 1.0, batch: int = 256) -> np.ndarray:
    """The world teacher's images of `texts` (N x H x W x 3 uint8), the noise of each batch drawn from `g` in turn: its
    weights in the `steps`-step generator sampler (where a few-step student starts), or its own Euler sampler with
    CFG `cfg`."""
    from . import flow
    from .evaluator import to_uint8
    from .models import decode_latents
    images = []
    for s in range(0, len(texts), batch):
        noise = torch.randn((len(texts[s:s + batch]), *world.latent_shape), generator=g)
        c = world.encode(texts[s:s + batch])
        z = (flow.sample_generator(world.teacher, noise, c, flow.generator_times(steps)) if sampler == "generator"
             else flow.sample_teacher(world.teacher, noise, c, world.encode([""]), steps, cfg))
        images.append(to_uint8(decode_latents(world.vae, z)))
    return np.concatenate(images)


def few_step_samples(world, specs: list, seed: int, steps: int = 4, per_prompt: int = 4,
                     batch: int = 256) -> np.ndarray:
    """`per_prompt` samples of each prompt from the teacher's weights in the `steps`-step generator sampler
    (teacher-4: where DMD starts, and what a 4-step student's samples are near). Returns (n, k, H, W, 3) uint8."""
    texts = [grammar.text(x) for x in specs for _ in range(per_prompt)]
    images = sample_images(world, texts, torch.Generator().manual_seed(seed), "generator", steps, batch=batch)
    return images.reshape(len(specs), per_prompt, *images.shape[1:])


def near_agreement(models: dict, world, test_specs: list, seed: int, rng: np.random.Generator) -> dict:
    """Each reward's agreement with gold near the model's own samples: on every pair of one test prompt's 4 teacher-4
    samples whose gold differs (no render among them), where the stage's held-out pairs (renders and degraded renders
    beside the teacher's samples) measure it far from them; and whether hps passes NEAR_GATE."""
    near = build_pairs(test_specs, few_step_samples(world, test_specs, seed), rng, renders=False)
    out = {f"{k}_agreement_near": agreement(m, near) for k, m in models.items()} | {"near_pairs": int(len(near.pairs))}
    return out | {"hps_near_gate": NEAR_GATE, "hps_near_gate_passed": out["hps_agreement_near"] >= NEAR_GATE}



def teacher_samples(world, specs: list, seed: int, batch: int = 256) -> np.ndarray:
    """Two samples per prompt from the world's teacher, of unequal quality: 6 Euler steps with CFG 3 and 3 steps
    without guidance. Returns (n, 2, H, W, 3) uint8."""
    g, texts = torch.Generator().manual_seed(seed), [grammar.text(x) for x in specs]
    return np.stack([sample_images(world, texts, g, "teacher", steps, cfg, batch)
                     for steps, cfg in ((6, 3.0), (3, 1.0))], axis=1)


def build_rewards(p, world, train_specs: list, test_specs: list, out: Path, metrics_path: Path) -> dict:
    """Train the hps, pick and aesthetic analogues on disjoint halves of the train prompts (as HPSv2 and PickScore
    come from different collections, with different label noise) and report every reward's pairwise agreement with
    gold on held-out pairs built from the test prompts, far from the model's samples (with renders) and near them
    (near_agreement). `world`: the world stage's stand-ins (standins.World)."""
    from .files import write_json
    r, t0 = p.rewards, time.time()
    rng = np.random.default_rng(p.seed)
    specs = train_specs[: r.prompts]
    data = build_pairs(specs, teacher_samples(world, specs, p.seed), rng)
    held = build_pairs(test_specs, teacher_samples(world, test_specs, p.seed + 1), rng)
    half = len(specs) * 4 // 2  # 4 candidates per prompt: first half of the prompts for hps, second for pick
    split = {"hps": data.pairs[:, 0] < half, "pick": data.pairs[:, 0] >= half, "aesthetic": slice(None)}
    metrics = {"train_pairs": int(len(data.pairs)), "held_out_pairs": int(len(held.pairs))}
    for i, kind in enumerate(("hps", "pick", "aesthetic")):
        subset = dataclasses.replace(data, pairs=data.pairs[split[kind]])
        model = train_reward(kind, world.clip, subset, r.steps, r.batch, r.lr, getattr(r, f"{kind}_label_noise"),
                             p.seed + 10 + i)
        save_aesthetic(model, out / kind) if kind == "aesthetic" else model.clip.save(out / kind)
        metrics[f"{kind}_agreement"] = agreement(model, held)
    metrics["clip_agreement"] = agreement(CosineReward(world.clip), held)
    metrics["aesthetic_agreement_with_gold_aesthetics"] = agreement(load_aesthetic(out / "aesthetic"), held, "aesthetic")
    trained = {k: load_aesthetic(out / k) if k == "aesthetic" else CosineReward(TinyClip.load(out / k))
               for k in ("hps", "pick", "aesthetic")}
    metrics |= near_agreement(trained | {"clip": CosineReward(world.clip)}, world, test_specs, p.seed + 2, rng)
    metrics["minutes"] = round((time.time() - t0) / 60, 2)
    write_json(metrics, metrics_path)
    return metrics
