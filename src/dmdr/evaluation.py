"""The `evaluate` stage: sample every test prompt with one model and score the images.

Metrics (DESIGN.md section 4): geneval_overall and geneval_<tag> (GenEval rules on `parse`), dpg_overall and
dpg_<category> (DPG-Bench rules; categories before dependencies), clip_score (100 * cosine in the independently
trained CLIP), the reward models' mean scores aesthetic, pick and hps (hps is the training reward), gold (the
world's gold preference), nfe (network evaluations per image) and sec_per_image (wall time of sampling, latents to
pixels, at the evaluation batch on this machine).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import flow, sampler
from .config import EvalModel, Params, eval_model
from .files import write_json
from .models import VelocityModel, decode_latents, load_backbone, require_dir
from .prompts import load_records
from .rewards import load_reward
from .standins import World, to_tensor, to_uint8
from .tiny_clip import TinyClip
from .world import grammar, parse
from .world.score import MissingParent, dpg_question_scores, geneval_correct, geneval_summary, gold


def nfe(m: EvalModel) -> int:
    return m.steps * (2 if m.kind == "teacher" and m.cfg > 1 else 1)


@torch.no_grad()
def sample_latents(world: World, model: torch.nn.Module, m: EvalModel, texts: list[str], noise: torch.Tensor,
                   shift: float = 1.0) -> torch.Tensor:
    cond = world.encode(texts)
    if m.kind == "teacher":
        return flow.sample_teacher(model, noise, cond, world.encode([""]), m.steps, m.cfg)
    return flow.sample_generator(model, noise, cond, flow.generator_times(m.steps, shift))


@torch.no_grad()
def generate(world: World, model, m: EvalModel, texts: list[str], seed: int, batch: int,
             shift: float = 1.0) -> tuple[np.ndarray, float]:
    """Images for `texts` (uint8) and seconds per image. Noise depends only on the seed and the position, so every
    model sees the same noise for the same prompt and image index."""
    noise = torch.randn((len(texts), *world.latent_shape), generator=torch.Generator().manual_seed(seed))
    images, seconds = [], 0.0
    for s in range(0, len(texts), batch):
        t = time.perf_counter()
        x = decode_latents(world.vae, sample_latents(world, model, m, texts[s:s + batch], noise[s:s + batch], shift))
        seconds += time.perf_counter() - t
        images.append(to_uint8(x))
    return np.concatenate(images), seconds / len(texts)


def geneval_scores(records: list[dict], detections: list, per_prompt: int) -> dict:
    return geneval_summary((r["tag"], geneval_correct(d, r["include"], r.get("exclude", []), r["tag"]))
                           for i, r in enumerate(records) for d in detections[i * per_prompt:(i + 1) * per_prompt])


def dpg_scores(records: list[dict], detections: list, per_prompt: int) -> dict:
    """DPG-Bench's scores: each prompt the mean over its images of the mean question score after dependencies,
    dpg_overall 100 times their mean, each category 100 times the mean of its questions' scores before dependencies
    (over every image; ELLA's script takes the last image only, its issue #60). An item with a question whose parent
    is not a question of it is dropped with a warning, as ELLA's script drops it."""
    prompt_scores, by_category = [], {}
    for i, r in enumerate(records):
        per_image, categories = [], []
        try:
            for dets in detections[i * per_prompt:(i + 1) * per_prompt]:
                raw, post = dpg_question_scores(r["questions"], dets)
                per_image.append(np.mean(post))
                categories += [(q["category_broad"], s) for q, s in zip(r["questions"], raw)]
        except MissingParent as e:
            warnings.warn(f"DPG item {r.get('item_id', i)} ({r['prompt'][:60]!r}): {e.args[0]}: dropped, as ELLA's "
                          f"compute_dpg_bench.py drops it")
            continue
        for category, s in categories:
            by_category.setdefault(category, []).append(s)
        prompt_scores.append(np.mean(per_image))
    return {"dpg_overall": 100 * float(np.mean(prompt_scores))} | {
        f"dpg_{k}": 100 * float(np.mean(v)) for k, v in sorted(by_category.items())}


@torch.no_grad()
def clip_score(clip: TinyClip, images: np.ndarray, texts: list[str], batch: int = 512) -> float:
    scores = [clip.score(to_tensor(images[s:s + batch]), texts[s:s + batch]) for s in range(0, len(texts), batch)]
    return float(torch.cat(scores).mean())


@torch.no_grad()
def reward_score(reward, images: np.ndarray, texts: list[str], batch: int = 512) -> float:
    """Mean of a reward model over uint8 images."""
    return float(torch.cat([reward(to_tensor(images[s:s + batch]), texts[s:s + batch])
                            for s in range(0, len(texts), batch)]).mean())


def load_model(world: World, m: EvalModel):
    """The network a model entry names: the teacher, or a distilled generator's checkpoint."""
    if Path(m.checkpoint) == Path("models/world/teacher"):
        return world.teacher, 1.0
    path = require_dir(Path(m.checkpoint), "generator")
    return VelocityModel(load_backbone(path, world.latent_shape)).eval(), sampler.read(path).get("shift", 1.0)


def evaluate(p: Params, name: str, prompt_dir: Path = Path("data/prompts"), world: World | None = None,
             out: Path = Path("results")) -> dict:
    m = eval_model(p, name)
    world = world or World.load()
    model, shift = load_model(world, m)
    gen_records = load_records(prompt_dir / "test_geneval.jsonl")
    dpg_records = load_records(prompt_dir / "test_dpg.csv")
    k = p.evaluate.images_per_prompt
    texts = [r["prompt"] for r in gen_records + dpg_records for _ in range(k)]
    torch.manual_seed(p.seed)
    images, sec = generate(world, model, m, texts, p.seed, p.evaluate.batch, shift)
    n_gen = len(gen_records) * k
    detections = [parse(im) for im in images]  # parsed once for every scorer
    metrics = geneval_scores(gen_records, detections[:n_gen], k) | dpg_scores(dpg_records, detections[n_gen:], k)
    metrics |= {"clip_score": clip_score(world.clip_eval, images, texts)}
    metrics |= {k: reward_score(load_reward(k), images, texts) for k in ("aesthetic", "pick", "hps")}
    metrics |= {
                "gold": float(np.mean([gold(im, t, d) for im, t, d in zip(images, texts, detections)])),
                "nfe": nfe(m), "sec_per_image": sec}
    write_json(metrics, out / "metrics" / f"{name}.json")  # a non-finite metric: an error naming model and metric
    (out / "samples").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples" / f"{name}.npz", images=images, texts=np.array(texts))
    return metrics


def curve_metrics(world: World, generator, steps: int, shift: float, specs: list, seed: int,
                  dense_specs: list = (), reward=None, train_prompts: list[str] = ()) -> dict:
    """Numbers for training curves, one image per prompt: on a fixed subset of the test prompts GenEval-analogue
    overall, gold, DPG-analogue overall and the training reward (reward_test); the reward on fixed train prompts
    (reward_train)."""
    m = EvalModel(checkpoint="", steps=steps)
    texts = [grammar.text(s) for s in specs] + [grammar.text(s) for s in dense_specs]
    images, _ = generate(world, generator, m, texts, seed, 256, shift)
    detections = [parse(im) for im in images]  # parsed once for every scorer
    verdicts = [(s.tag, geneval_correct(d, *grammar.geneval_clauses(s), s.tag)) for s, d in zip(specs, detections)]
    row = {"geneval_overall": geneval_summary(verdicts)["geneval_overall"],
           "gold": float(np.mean([gold(im, s, d) for im, s, d in zip(images, list(specs) + list(dense_specs),
                                                                      detections)]))}
    if dense_specs:
        row["dpg_overall"] = 100 * float(np.mean([np.mean(dpg_question_scores(grammar.questions(s), d)[1])
                                                  for s, d in zip(dense_specs, detections[len(specs):])]))
    if reward is not None:
        row["reward_test"] = reward_score(reward, images, texts)
        if train_prompts:
            train_images, _ = generate(world, generator, m, list(train_prompts), seed + 1, 256, shift)
            row["reward_train"] = reward_score(reward, train_images, list(train_prompts))
    return row
