"""Benchmark-analogue scorers and the gold preference, applying the benchmarks' own rules to `parse` output.

GenEval (djghosh13/geneval, evaluation/evaluate_images.py): detections above a confidence threshold (0.3; 0.9 for the
counting tag), the top `count` by confidence per include clause, colour checked on those, position by the rule on
box centres, exclude clauses as "fewer than `count`". An image is correct or not.
DPG-Bench (TencentQQGYLab/ELLA, dpg_bench/compute_dpg_bench.py): a question scores 1 when the answer is "yes"; a
child scores 0 when a parent in `dependency` scored 0; prompt score = mean over questions, then over images.
"""
from __future__ import annotations

import re

import numpy as np

from .grammar import Spec, questions, read
from .parse import _BG, _PALETTE, Detection, parse, unmix
from .scene import BACKGROUND, IMAGE_SIZE, relative_position

DETECT_THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9


def by_class(dets: list[Detection], threshold: float) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = {}
    for d in sorted(dets, key=lambda d: -d.confidence):
        if d.confidence > threshold:
            out.setdefault(d.shape, []).append(d)
    return out


def geneval_correct(dets: list[Detection], include: list[dict], exclude: list[dict] = (), tag: str = "") -> bool:
    """GenEval's verdict for one image from its detections and the prompt's include / exclude clauses."""
    found = by_class(dets, COUNTING_THRESHOLD if tag == "counting" else DETECT_THRESHOLD)
    matched: list[list[Detection]] = []
    for clause in include:
        objs = found.get(clause["class"], [])[: clause["count"]]
        if len(objs) < clause["count"]:
            return False
        if "color" in clause and any(o.color != clause["color"] for o in objs):
            return False
        matched.append(objs)
    for clause, objs in zip(include, matched):
        if "position" in clause:
            rel, ref = clause["position"]
            if any(rel not in relative_position(o.box, t.box) for o in objs for t in matched[ref]):
                return False
    return all(len(found.get(c["class"], [])) < c["count"] for c in exclude)


def geneval_summary(verdicts) -> dict:
    """From (tag, correct) pairs: geneval_<tag> accuracies and geneval_overall, their unweighted mean."""
    hits: dict[str, list[bool]] = {}
    for tag, ok in verdicts:
        hits.setdefault(tag, []).append(ok)
    out = {f"geneval_{k}": float(np.mean(v)) for k, v in sorted(hits.items())}
    out["geneval_overall"] = float(np.mean(list(out.values())))
    return out


_TUPLE = re.compile(r"^(\w+) - (\w+) \((.*)\)$")


def answer(tup: str, dets: list[Detection]) -> bool:
    """The VQA analogue: the answer to a question given by its DPG-Bench tuple, from the detections."""
    m = _TUPLE.match(tup.strip())
    if not m:
        raise ValueError(f"cannot read question tuple {tup!r}")
    kind, detail, args = m[1], m[2], [a.strip() for a in m[3].split(",")]
    found = by_class(dets, DETECT_THRESHOLD)
    objs = found.get(args[0], [])
    if kind == "entity":
        return bool(objs)
    if kind == "other" and detail == "count":
        return len(objs) == int(args[1].lstrip("="))
    if kind == "attribute":
        return bool(objs) and all(getattr(o, detail) == args[1] for o in objs)
    if kind == "relation":
        others = found.get(args[1], [])
        return bool(objs and others) and args[2] in relative_position(objs[0].box, others[0].box)
    raise ValueError(f"unknown question kind in tuple {tup!r}")


class MissingParent(KeyError):
    """A DPG question depends on a proposition id that is not a question of its item."""


def dependency_zeroed(qs: list[dict], raw: dict) -> dict:
    """DPG-Bench's dependency rule as ELLA's compute_dpg_bench.py applies it: in file order, a question scores 0
    when a parent (0: none) scores 0, reading the parents' scores as already zeroed, so that a failure cascades down
    its chain. A parent that is not a question raises MissingParent (upstream: a KeyError that drops the image)."""
    post = dict(raw)
    for q in qs:
        for parent in q["dependency"]:
            if parent == 0:
                continue
            if parent not in post:
                raise MissingParent(f"question {q['proposition_id']} depends on {parent}, which is not a question")
            if post[parent] == 0:
                post[q["proposition_id"]] = 0.0
                break
    return post


def dpg_question_scores(qs: list[dict], dets: list[Detection]) -> tuple[list[float], list[float]]:
    """Per question: (score before dependencies, score after `dependency_zeroed`)."""
    raw = {q["proposition_id"]: float(answer(q["tuple"], dets)) for q in qs}
    post = dependency_zeroed(qs, raw)
    return [raw[q["proposition_id"]] for q in qs], [post[q["proposition_id"]] for q in qs]


def faithfulness(spec: Spec, dets: list[Detection]) -> float:
    """Fraction of the prompt's questions answered yes, with DPG's dependency rule, plus one more question the
    benchmarks do not ask: nothing the prompt did not ask for."""
    _, post = dpg_question_scores(questions(spec), dets)
    asked = {g.shape: g.count for g in spec.groups}
    extra = sum(1 for d in dets if d.confidence > DETECT_THRESHOLD) > sum(asked.values())
    return float(np.mean(post + [0.0 if extra else 1.0]))


def aesthetics(image: np.ndarray, dets: list[Detection]) -> float:
    """What the gold viewer likes in any picture, each term in [0, 1], averaged:
    crisp objects (mean detection confidence), a clean background (no stray paint), pure colours (pixels explained
    by the palette), and a balanced composition (the objects' joint box centred, clear of the borders)."""
    x = image.astype(np.float64)
    label, alpha = unmix(image)
    background = alpha < 0.1
    smudge = np.abs(x[background] - np.asarray(BACKGROUND)).mean() if background.any() else 255.0
    clean = float(np.exp(-smudge / 4.0))
    fg = alpha >= 0.5  # residual of each foreground pixel under the unmixing model
    if fg.any():
        a = alpha[fg][:, None]
        resid = np.linalg.norm(x[fg] - (_BG + a * (_PALETTE[label[fg]] - _BG)), axis=-1).mean()
        pure = float(np.exp(-resid / 20.0))
    else:
        pure = 0.0
    seen = [d for d in dets if d.confidence > DETECT_THRESHOLD]
    if seen:
        boxes = np.array([d.box for d in seen])
        x0, y0 = boxes[:, :2].min(0)
        x1, y1 = boxes[:, 2:].max(0)
        off = np.hypot((x0 + x1) / 2 - IMAGE_SIZE / 2, (y0 + y1) / 2 - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)
        inside = min(x0, y0, IMAGE_SIZE - x1, IMAGE_SIZE - y1) >= 1.0
        balance = float(max(0.0, 1.0 - off)) * (1.0 if inside else 0.5)
        crisp = float(np.mean([d.confidence for d in seen]))
    else:
        balance = crisp = 0.0
    return float(np.mean([crisp, clean, pure, balance]))


def gold(image: np.ndarray, prompt: str | Spec, dets: list[Detection] | None = None) -> float:
    """The gold preference, "what people like": 0.5 * faithfulness + 0.5 * aesthetics, in [0, 1].

    Never used in training: it is the truth against which learned rewards are measured. `dets`: the image's
    `parse`, when the caller has it already.
    """
    spec = read(prompt) if isinstance(prompt, str) else prompt
    dets = parse(image) if dets is None else dets
    return 0.5 * faithfulness(spec, dets) + 0.5 * aesthetics(image, dets)
