"""The `evaluate` stage: sample every test prompt with one model and score the images.

Metrics (DESIGN.md section 4): geneval_overall and geneval_<tag> (GenEval rules on `parse`), dpg_overall and
dpg_<category> (DPG-Bench rules; categories before dependencies), clip_score (100 * cosine in the independently
trained CLIP), the reward models' mean scores aesthetic, pick and hps (hps is the training reward), gold (the
world's gold preference), nfe (network evaluations per image) and sec_per_image (wall time of sampling, latents to
pixels, at the evaluation batch on this machine).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import evaluator, flow, sampler
from .config import TEACHER, TEACHER_EPS, EvalModel, Params, eval_model
from .files import write_json
from .embedded import WorldFamily, WorldTeacher
from .models import decode_latents, load_backbone, require_dir
from .prompts import load_records
from .rewards import load_reward
from .standins import World
from .world import grammar, parse
from .world.score import MissingParent, dpg_question_scores, geneval_correct, geneval_summary, gold


def nfe(m: EvalModel) -> int:
    return m.steps * (2 if m.kind == "teacher" and m.cfg > 1 else 1)


def sampler_times(family: WorldFamily, m: EvalModel, shift: float = 1.0):
    """The flow levels model entry `m` samples at: the multi-step teacher sampler's (None: the flow scheduler's
    own), or the few-step generator's, then 0."""
    return family.sampler_sigmas(m.steps) if m.kind == "teacher" else family.generator_times(m.steps, shift)


@torch.no_grad()
def sample_latents(world: World, model: torch.nn.Module, m: EvalModel, texts: list[str], noise: torch.Tensor,
                   times=None) -> torch.Tensor:
    """Latents of `texts` from standard normal `noise`, scaled to the first of the levels `times` (sampler_times;
    below 1 on a VP schedule): the multi-step teacher sampler, or the few-step ODE."""
    cond = world.encode(texts)
    if times is not None:
        noise = noise * flow.start_noise_scale(float(times[0]))
    if m.kind == "teacher":
        return flow.sample_teacher(model, noise, cond, world.encode([""]), m.steps, m.cfg, sigmas=times)
    return flow.sample_generator(model, noise, cond, times)


def noise_of(world: World, n: int, seed: int) -> torch.Tensor:
    """Starting noise of image positions 0..n-1: it depends only on the seed and the position, so every model sees
    the same noise for the same prompt and image index."""
    return torch.randn((n, *world.latent_shape), generator=torch.Generator().manual_seed(seed))


def world_sampler(world: World, model, m: EvalModel, texts: list[str], seed: int, times=None):
    """`sample(positions) -> images` in [-1, 1] for dmdr.evaluator, at the levels `times` (sampler_times)."""
    noise = noise_of(world, len(texts), seed)

    def sample(positions: list[int]) -> torch.Tensor:
        idx = slice(positions[0], positions[-1] + 1)  # contiguous, as the evaluator's shares are
        return decode_latents(world.vae, sample_latents(world, model, m, texts[idx], noise[idx], times))
    return sample


def generate(world: World, model, m: EvalModel, texts: list[str], seed: int, batch: int,
             times=None) -> tuple[np.ndarray, float]:
    """Images for `texts` (uint8) and seconds per image (dmdr.evaluator.generate)."""
    return evaluator.generate(world_sampler(world, model, m, texts, seed, times), list(range(len(texts))), batch)


def geneval_verdicts(records: list[dict], detections: list, per_prompt: int) -> list[tuple[str, bool]]:
    """(tag, correct) of each image under GenEval's rule for its prompt."""
    return [(r["tag"], geneval_correct(d, r["include"], r.get("exclude", []), r["tag"]))
            for i, r in enumerate(records) for d in detections[i * per_prompt:(i + 1) * per_prompt]]


def dpg_parts(records: list[dict], detections: list, per_prompt: int) -> tuple[np.ndarray, dict]:
    """Each image's DPG score (the mean of its question scores after dependencies; NaN for a dropped item) and each
    category's question scores before dependencies (over every image; ELLA's script takes the last image only, its
    issue #60). An item with a question whose parent is not a question of it is dropped with a warning, as ELLA's
    script drops it."""
    per_image, by_category = np.full(len(records) * per_prompt, np.nan), {}
    for i, r in enumerate(records):
        mine = slice(i * per_prompt, (i + 1) * per_prompt)
        try:
            scores = [dpg_question_scores(r["questions"], dets) for dets in detections[mine]]
        except MissingParent as e:
            warnings.warn(f"DPG item {r.get('item_id', i)} ({r['prompt'][:60]!r}): {e.args[0]}: dropped, as ELLA's "
                          f"compute_dpg_bench.py drops it")
            continue
        per_image[mine] = [np.mean(post) for _, post in scores]
        for raw, _ in scores:
            for q, s in zip(r["questions"], raw):
                by_category.setdefault(q["category_broad"], []).append(s)
    return per_image, by_category


def dpg_scores(records: list[dict], detections: list, per_prompt: int) -> dict:
    """DPG-Bench's scores: each prompt the mean over its images of the mean question score after dependencies,
    dpg_overall 100 times their mean, each category 100 times the mean of its questions' scores before dependencies
    (dpg_parts)."""
    return dpg_summary(*dpg_parts(records, detections, per_prompt), per_prompt)


def dpg_summary(per_image: np.ndarray, by_category: dict, per_prompt: int) -> dict:
    prompt_scores = [p for p in per_image.reshape(-1, per_prompt).mean(1) if not np.isnan(p)]
    return {"dpg_overall": 100 * float(np.mean(prompt_scores))} | {
        f"dpg_{k}": 100 * float(np.mean(v)) for k, v in sorted(by_category.items())}


def world_scorers(world: World) -> dict:
    """The scorers of every image: the independent CLIP's clip_score and the reward analogues."""
    return {"clip_score": world.clip_eval.score} | {k: load_reward(k) for k in ("aesthetic", "pick", "hps")}


def load_model(world: World, m: EvalModel) -> tuple[torch.nn.Module, WorldFamily, float]:
    """The network a model entry names (a teacher, or a distilled generator's checkpoint) as a velocity model, its
    family and its generator's shift."""
    path = Path(m.checkpoint)
    if path in (Path(TEACHER), Path(TEACHER_EPS)):
        teacher = WorldTeacher.load(world, path)
        return teacher.model, teacher, 1.0
    path = require_dir(path, "generator")
    family = WorldFamily.of(path)
    return family.wrap(load_backbone(path, world.latent_shape)).eval(), family, sampler.read(path).get("shift", 1.0)


def evaluate(p: Params, name: str, prompt_dir: Path = Path("data/prompts"), world: World | None = None,
             out: Path = Path("results")) -> dict:
    """Metrics of model `name` (results/metrics/<name>.json), and its images with every per-image score
    (results/samples/<name>.npz: images, texts, and score_<metric>: clip_score, aesthetic, pick, hps, gold per image,
    geneval (1 when the image is correct) for the GenEval prompts' images, dpg (its score after dependencies) for
    the DPG prompts' images), from which report pairs models prompt by prompt."""
    m = eval_model(p, name)
    world = world or World.load()
    model, family, shift = load_model(world, m)
    times = sampler_times(family, m, shift)
    gen_records = load_records(prompt_dir / "test_geneval.jsonl")
    dpg_records = load_records(prompt_dir / "test_dpg.csv")
    k = p.evaluate.images_per_prompt
    texts = [r["prompt"] for r in gen_records + dpg_records for _ in range(k)]
    torch.manual_seed(p.seed)
    scores, images, sec = evaluator.sample_and_score(world_sampler(world, model, m, texts, p.seed, times), texts,
                                                     world_scorers(world), p.evaluate.batch)
    n_gen = len(gen_records) * k
    detections = [parse(im) for im in images]  # parsed once for every scorer
    scores["gold"] = np.array([gold(im, t, d) for im, t, d in zip(images, texts, detections)])
    verdicts = geneval_verdicts(gen_records, detections[:n_gen], k)
    scores["geneval"] = np.array([float(correct) for _, correct in verdicts])
    scores["dpg"], by_category = dpg_parts(dpg_records, detections[n_gen:], k)
    metrics = geneval_summary(verdicts) | dpg_summary(scores["dpg"], by_category, k)
    metrics |= {key: float(scores[key].mean()) for key in ("clip_score", "aesthetic", "pick", "hps", "gold")}
    metrics |= {"nfe": nfe(m), "sec_per_image": sec}
    write_json(metrics, out / "metrics" / f"{name}.json")  # a non-finite metric: an error naming model and metric
    (out / "samples").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples" / f"{name}.npz", images=images, texts=np.array(texts),
                        **{f"score_{key}": v for key, v in scores.items()})
    return metrics


def curve_metrics(world: World, generator, times: torch.Tensor, specs: list, seed: int, dense_specs: list = (),
                  reward=None, train_prompts: list[str] = ()) -> tuple[dict, dict]:
    """Numbers for training curves, one image per prompt of the generator at its flow levels `times`: on a fixed
    subset of the test prompts GenEval-analogue overall, gold, DPG-analogue overall and the training reward
    (reward_test); the reward on fixed train prompts (reward_train). Returns the row and each number's per-image values (geneval over `specs`' images, dpg over
    `dense_specs`', reward_train over the train prompts', the others over all test images), which pair two curves
    prompt by prompt."""
    m = EvalModel(checkpoint="", steps=len(times) - 1)
    texts = [grammar.text(s) for s in specs] + [grammar.text(s) for s in dense_specs]
    images, _ = generate(world, generator, m, texts, seed, 256, times)
    detections = [parse(im) for im in images]  # parsed once for every scorer
    verdicts = [(s.tag, geneval_correct(d, *grammar.geneval_clauses(s), s.tag)) for s, d in zip(specs, detections)]
    per_image = {"geneval_overall": np.array([float(c) for _, c in verdicts]),
                 "gold": np.array([gold(im, s, d) for im, s, d in zip(images, list(specs) + list(dense_specs),
                                                                    detections)])}
    row = {"geneval_overall": geneval_summary(verdicts)["geneval_overall"], "gold": float(np.mean(per_image["gold"]))}
    if dense_specs:
        per_image["dpg_overall"] = 100 * np.array([np.mean(dpg_question_scores(grammar.questions(s), d)[1])
                                                   for s, d in zip(dense_specs, detections[len(specs):])])
        row["dpg_overall"] = float(np.mean(per_image["dpg_overall"]))
    if reward is not None:
        per_image["reward_test"] = evaluator.score({"r": reward}, images, texts)["r"]
        row["reward_test"] = float(per_image["reward_test"].mean())
        if train_prompts:
            train_images, _ = generate(world, generator, m, list(train_prompts), seed + 1, 256, times)
            per_image["reward_train"] = evaluator.score({"r": reward}, train_images, list(train_prompts))["r"]
            row["reward_train"] = float(per_image["reward_train"].mean())
    return row, per_image


def write_curve_scores(per_step: dict[int, dict], path: Path) -> None:
    """A curve's per-image values (curve_metrics) as one array per number, logged steps by images, with `steps`."""
    steps = sorted(per_step)
    arrays = {k: np.stack([per_step[s][k] for s in steps]) for k in per_step[steps[-1]]}
    tmp = path.with_suffix(".tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tmp, steps=np.array(steps), **arrays)
    tmp.replace(path)
