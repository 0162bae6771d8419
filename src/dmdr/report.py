"""The `report` stage: the paper's tables and figures regenerated from results/, and the README's generated
sections. Figures are drawn with matplotlib (no CDN)."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from datetime import datetime
from itertools import accumulate
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import read_csv, write_json  # noqa: E402
from .world.grammar import GENEVAL_TAGS  # noqa: E402

RESULTS = Path("results")
# the teacher without CFG (teacher-nocfg) left the default pipeline on 2026-12-05 to keep it within its 90 minutes: no
# claim reads it (its last numbers: the README of commit d337b2b)
TABLE_DISTILL = ["teacher", "teacher-4", "dmd2-4", "dmd2-1"]
COLUMNS = ["nfe", "geneval_overall"] + [f"geneval_{t}" for t in GENEVAL_TAGS] + \
          ["dpg_overall", "clip_score", "gold", "sec_per_image"]
# Table 1 of the paper: rewards and held-out quality of teacher, DMD and DMDR at each NFE
TABLE1 = ["teacher", "teacher-4", "dmd2-4", "dmd2-4-long", "dmdr-stage1-4", "dmdr-4", "dmd2-1", "dmdr-stage1-1", "dmdr-1"]
TABLE1_COLUMNS = ["nfe", "clip_score", "aesthetic", "pick", "hps", "gold", "geneval_overall", "dpg_overall"]
# Table 2: multi-step RL, multi-step RL then distillation, joint
TABLE2 = ["teacher", "teacher-refl", "teacher-refl-then-dmd-4", "dmdr-4"]
TABLE2_COLUMNS = ["nfe", "hps", "dpg_overall", "gold", "geneval_overall", "sec_per_image"]
# Tables 3 and 4: the GenEval analogue per tag and the DPG analogue per category, teacher against DMD2 and DMDR, for
# the flow and the epsilon teacher; Figure 7: their samples of the same prompts from the same noise
TABLE34 = ["teacher", "dmd2-4", "dmdr-4", "teacher-eps", "dmd2-eps-4", "dmdr-eps-4"]
FIGURE7 = TABLE34
# C5: each teacher's 4-step DMDR student at least matches it, non-inferiority with a margin fixed before the epsilon
# runs: the student keeps at least 1 - C5_MARGIN of its teacher's score (student - teacher > -C5_MARGIN x teacher)
C5_PAIRS = [("dmdr-4", "teacher"), ("dmdr-eps-4", "teacher-eps")]
C5_METRICS = ["geneval_overall", "dpg_overall"]
C5_MARGIN = 0.1
# Table 5: stage 2 from the one stage-1 init (dmdr-stage1-4) with one setting of dmdr-4 changed; dmdr-4 itself is
# the hps row of (a), the ReFL row of (b) and the lambda 0.5 row of (c)
REWARD_METRICS = {"pick": "pick", "aesthetic": "aesthetic", "clip": "clip_score", "hps": "hps"}  # reward: its metric
TABLE5 = {"a": ("reward model", "rm", ["pick", "aesthetic", "clip", "hps", "clip+hps"], "hps"),
          "b": ("RL algorithm", "rl", ["refl", "dpo", "grpo"], "refl"),
          "c": ("lambda", "lambda", ["0p1", "0p5", "1p0", "2p0"], "0p5")}  # 0p1: lambda 0.1 (a dot is no DVC name)
# RT-DM's gain against beta: RT-DM alone from the stage-1 init at each beta, minus DMD alone from it
RTDM_BETAS = {"rtdm-only-4-beta-0p05": 0.05, "rtdm-only-4": 0.25, "rtdm-only-4-beta-1p0": 1.0}
RTDM_BASE = "dmd-from-stage1-4"
TABLE5_COLUMNS = ["clip_score", "aesthetic", "pick", "hps", "gold", "dpg_overall"]
ALL_COLUMNS = ["nfe", "hps", "pick", "aesthetic", "clip_score", "gold", "geneval_overall", "dpg_overall", "sec_per_image"]
CURVE_METRICS = ["reward_train", "reward_test", "dpg_overall", "gold"]
EARLY = (10, 50)  # the cold-start window of C4, generator steps (DynaDG and DynaRS anneal away by step 50)
# C3: RT-DM alone against DMD alone from the teacher, curves logged every 2 steps; DMD's rise from the teacher ends
# within its first 10 steps, so the window is the rise itself
RISE = (2, 20)
C3_PAIR = ("rtdm-alone-4", "dmd-alone-4")
# C4 where a cold start exists (the teacher in one step is far from its own samples): 1-step stage 1 against it
# without one tool, three seeds each (until 2026-12-05 the 4-step ablations, which start from the coherent teacher-4)
C4_STAGE1, C4_ABLATIONS = "dmdr-stage1-1", ("dmdr-1-no-dynadg", "dmdr-1-no-dynars")
# Table 6, the class-conditional world: 1-step students at real CFG g, without and with RL, and the teacher at CFG 1
CFGS = {"1": 1.0, "1p5": 1.5, "4": 4.0}
TABLE6 = ["cls-teacher"] + [f"cls-1-cfg{g}-{rl}" for rl in ("norl", "rl") for g in CFGS]
TABLE6_COLUMNS = ["nfe", "fid", "recall", "inception_score", "precision", "diversity", "classifier_accuracy"]
# C7: CFG and RL sharpen the density: the side each metric moves to (precision and IS up, recall down)
C7_SIDES = {"precision": 1, "inception_score": 1, "recall": -1}


def table5_model(part: str, value: str) -> str:
    """The model of Table 5's part (a, b or c) with that setting: dmdr-4 where it is dmdr-4's own."""
    _, key, _, own = TABLE5[part]
    return "dmdr-4" if value == own else f"dmdr-4-{key}-{value}"


def summary(models: list[str], results: Path = RESULTS) -> dict:
    """{model: metrics} from results/metrics/<model>.json, for the models that have been evaluated."""
    out = {}
    for m in models:
        f = results / "metrics" / f"{m}.json"
        if f.exists():
            out[m] = json.loads(f.read_text())
    return out


def fmt(v) -> str:
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1):
        return str(int(v))
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def write_table(rows: dict, columns: list[str], path: Path, title: str) -> Path:
    """A model x metric table as Markdown (path.md) and CSV (path.csv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in columns if any(c in r for r in rows.values())]
    md = [f"**{title}**", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    md += [f"| {m} | " + " | ".join(fmt(r[c]) if c in r else "-" for c in cols) + " |" for m, r in rows.items()]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    path.with_suffix(".csv").write_text(",".join(["model"] + cols) + "\n" + "".join(
        ",".join([m] + [str(r.get(c, "")) for c in cols]) + "\n" for m, r in rows.items()))
    return path.with_suffix(".md")


def first_images(texts, n: int) -> list[int]:
    """The positions of the first image of `n` test prompts spread evenly over the test set (a prompt's images are
    consecutive)."""
    firsts = [i for i in range(len(texts)) if i == 0 or texts[i] != texts[i - 1]]
    return firsts[:: max(1, len(firsts) // n)][:n]


def sample_grid(npz: str | Path, title: str = "", out: Path | None = None):
    """The first image of 48 test prompts spread evenly over the test set, with their prompts as titles."""
    data = np.load(npz)
    images, texts = data["images"], data["texts"]
    pick = first_images(texts, 48)
    cols = 8
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, pick):
        ax.imshow(images[i], interpolation="nearest")
        caption = str(texts[i]).replace("a photo of ", "").replace("a picture of ", "")
        ax.set_title(textwrap.fill(caption, 28), fontsize=5)
    fig.suptitle(title)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=130)
    return fig


def side_by_side(samples: dict[str, Path], prompts: int = 8, out: Path | None = None,
                 title: str = "Figure 7 analogue: the same prompts from the same noise"):
    """Figure 7: a row per model, a column per prompt: the first image of `prompts` test prompts spread evenly over
    the test set. The evaluator samples every model's image at one position from the same noise, so a column is one
    prompt and one starting noise."""
    data = {m: np.load(f) for m, f in samples.items()}
    texts = next(iter(data.values()))["texts"]
    pick = first_images(texts, prompts)
    fig, axes = plt.subplots(len(data), len(pick), figsize=(len(pick) * 1.7, len(data) * 1.8 + 0.6), squeeze=False)
    for r, (model, d) in enumerate(data.items()):
        if not np.array_equal(d["texts"], texts):
            raise ValueError(f"{samples[model]}: sampled on other prompts than {next(iter(samples.values()))}")
        for c, i in enumerate(pick):
            ax = axes[r, c]
            ax.imshow(d["images"][i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(str(texts[i]), 18), fontsize=6)
            if c == 0:
                ax.set_ylabel(model, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=130)
    return fig


def plot_teacher_curve(csv_path: str | Path, out: Path | None = None, title: str = "flow teacher"):
    """The teacher's GenEval-analogue accuracy (25-step CFG samples of held-out prompts) against training time."""
    rows = read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    minutes = [r["seconds"] / 60 for r in rows]
    ax.plot(minutes, [r["geneval_overall"] for r in rows], "o-", label="overall", lw=2)
    for t in GENEVAL_TAGS:
        if f"geneval_{t}" in rows[0]:
            ax.plot(minutes, [r[f"geneval_{t}"] for r in rows], "-", lw=0.8, alpha=0.7, label=t)
    ax.set_xlabel("training time on this machine (minutes)")
    ax.set_ylabel("GenEval-analogue accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"{title} during training")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=130)
    return fig


def plot_curves(curves: dict[str, str | Path], out: Path | None = None):
    """Held-out curves of distillation runs against generator steps: GenEval-analogue, DPG-analogue, gold."""
    metrics = ["geneval_overall", "dpg_overall", "gold"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for name, path in curves.items():
        if not Path(path).exists():
            continue
        rows = read_csv(path)
        for ax, m in zip(axes, metrics):
            if m in rows[0]:
                ax.plot([r["step"] for r in rows], [r[m] for r in rows], "o-", ms=3, label=name)
    for ax, m in zip(axes, metrics):
        ax.set_xlabel("generator step")
        ax.set_title(m)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=130)
    return fig


def plot_training(run: str | Path, out: Path | None = None):
    """A `dmdr.real` run's training curves (`<run>/curves/<stage>.csv`, rewritten at each logged step, so this can
    be drawn during training): one panel per logged quantity against generator steps, one line per stage.
    Written to `<run>/curves.png` unless `out` says otherwise."""
    run = Path(run)
    paths = sorted((run / "curves").glob("*.csv"), key=lambda p: (p.stem != "stage1", p.stem))
    if not paths:
        raise FileNotFoundError(f"{run / 'curves'}: no training curves (*.csv) yet")
    stages = {p.stem: read_csv(p) for p in paths}
    keys = list(dict.fromkeys(k for rows in stages.values() for r in rows for k, v in r.items()
                              if k not in ("step", "seconds") and isinstance(v, float)))
    cols = min(4, len(keys)) or 1
    lines = (len(keys) + cols - 1) // cols or 1
    fig, axes = plt.subplots(lines, cols, figsize=(3.6 * cols, 2.8 * lines), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for i, (stage, rows) in enumerate(stages.items()):  # a stage keeps its colour in every panel
            points = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), float)]
            if points:
                ax.plot(*zip(*points), "o-", ms=2, lw=1, color=f"C{i}", label=stage)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("generator step", fontsize=8)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    legend = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="upper right")
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(out or run / "curves.png", dpi=130)
    return fig


def plot_reward_agreement(metrics_path: str | Path, out: Path | None = None):
    """Held-out pairwise agreement of each reward model with the gold preference (0.5: chance)."""
    m = json.loads(Path(metrics_path).read_text())
    names = [k for k in ("clip", "hps", "pick", "aesthetic") if f"{k}_agreement" in m]
    fig, ax = plt.subplots(figsize=(4.2, 3))
    ax.bar(names, [m[f"{k}_agreement"] for k in names], color=["0.6", "C0", "C1", "C2"][:len(names)])
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_ylim(0.4, 1)
    ax.set_ylabel("agreement with gold")
    ax.set_title(f"rewards on {m['held_out_pairs']} held-out pairs", fontsize=9)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=130)
    return fig


# --- curves across continued recipes ----------------------------------------------------------------------------


def lineage(p, name: str) -> list[str]:
    """The recipes a recipe continues, root first, ending with itself."""
    from .config import parent
    chain = [name]
    while (up := parent(p, chain[0])) is not None:
        chain.insert(0, up)
    return chain


def stitched_curve(p, name: str, results: Path = RESULTS) -> list[dict]:
    """A recipe's curve with its ancestors' in front, steps counted from the teacher ([] if it was not run)."""
    if name not in p.recipes:
        return []
    rows, offset = [], 0
    for r in lineage(p, name):
        path = results / "curves" / f"{r}.csv"
        if not path.exists():
            return []
        part = read_csv(path)
        rows += [row | {"step": row["step"] + offset, "recipe": r} for row in (part[1:] if rows else part)]
        offset += part[-1]["step"]
    return rows


def seeds_of(p, base: str) -> list[str]:
    """`base` and its seed repeats `base-s<k>` among the recipes."""
    return [base] + sorted(r for r in p.recipes if re.fullmatch(re.escape(base) + r"-s\d+", r))


def plot_paradigms(p, groups: dict[str, list[str]], title: str, out: Path | None = None, metrics=CURVE_METRICS,
                   xlim=None, mark: float | None = None):
    """Curves of several training paradigms against generator steps from the teacher; a paradigm run over several
    seeds is drawn as its mean with the min-max band."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.1))
    for color, (label, names) in zip(["C0", "C3", "C2", "C1", "C4", "C5"], groups.items()):
        curves = [c for c in (stitched_curve(p, n) for n in names) if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [r["step"] for r in curves[0][:n]]
        for ax, m in zip(axes, metrics):
            if m not in curves[0][0]:
                continue
            ys = np.array([[r[m] for r in c[:n]] for c in curves], dtype=float)
            ax.plot(steps, ys.mean(0), "o-", ms=2.5, color=color, label=label + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""))
            if len(curves) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.2)
    for ax, m in zip(axes, metrics):
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("generator step")
        if xlim:
            ax.set_xlim(*xlim)
        if mark is not None:
            ax.axvline(mark, color="k", lw=0.6, ls=":")
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=130)
    return fig


# --- claims -----------------------------------------------------------------------------------------------------


class Pairs:
    """Paired checks between evaluated models (dmdr.paired): a model's per-prompt values, over its seed repeats
    (`seeds`), or its own run alone."""

    def __init__(self, p, results: Path, seeds: bool = True):
        from .prompts import load_records
        self.p, self.results, self.seeds = p, results, seeds
        self.tags = [r["tag"] for r in load_records(Path("data/prompts") / "test_geneval.jsonl")]

    def have(self, *models: str) -> bool:
        return all((self.results / "samples" / f"{m}.npz").exists() for m in models)

    def runs(self, model: str) -> list[str]:
        """The evaluated runs of `model` that a check reads: its seed repeats, or itself alone."""
        return [m for m in (seeds_of(self.p, model) if self.seeds else [model]) if self.have(m)]

    def n_seeds(self, *models: str) -> int:
        """The fewest evaluated runs a check of `models` reads of one of them."""
        return min(len(self.runs(m)) for m in models)

    def values(self, model: str, metric: str):
        from .paired import prompt_values
        return [prompt_values(self.results / "samples" / f"{m}.npz", metric, self.p.evaluate.images_per_prompt,
                              self.tags) for m in self.runs(model)]

    def check(self, name: str, metric: str, better: str, other: str) -> dict:
        """`better` minus `other` on `metric` (each over its seeds), with the paired bootstrap's 95% interval."""
        from .paired import difference
        d, ci = difference(self.values(better, metric), self.values(other, metric), seed=self.p.seed)
        return {"name": name, "metric": metric, "models": [better, other], "difference": d, "ci95": ci}

    def noninferior(self, metric: str, student: str, teacher: str, margin: float) -> dict:
        """`student` minus `teacher` on `metric` with its 95% interval, to lie above -`margin` (a non-inferiority
        check: `_claim` judges the interval shifted by the margin)."""
        check = self.check(f"{student} minus {teacher} above -{fmt(margin)}", metric, student, teacher)
        return check | {"margin": margin}

    def gap_closed(self, metric: str, student: str, base: str, teacher: str) -> dict:
        """The fraction of `base`'s gap to `teacher` on `metric` that `student` closes, with its 95% interval."""
        from .paired import gap_closed
        f, ci = gap_closed(self.values(student, metric), self.values(base, metric), self.values(teacher, metric),
                           seed=self.p.seed)
        return {"metric": metric, "models": [student, base, teacher], "fraction": f, "ci95": ci}


def window_values(p, name: str, metric: str, results: Path = RESULTS, window: tuple[int, int] = EARLY):
    """A root recipe's per-image `metric` averaged over its curve steps inside `window` (from
    results/curves/<recipe>.npz), as dmdr.paired's per-prompt values; None when not recorded."""
    from .paired import PromptValues
    path = results / "curves" / f"{name}.npz"
    if name not in p.recipes or len(lineage(p, name)) != 1 or not path.exists():
        return None
    with np.load(path) as f:
        steps = f["steps"]
        inside = (steps >= window[0]) & (steps <= window[1])
        if metric not in f or not inside.any():
            return None
        return tuple(steps[inside].tolist()), PromptValues(f[metric][inside].mean(0), np.zeros(f[metric].shape[1], int),
                                                           {0: 1.0})


def _window_check(p, name: str, metric: str, better: str, other: str, results: Path = RESULTS,
                  window: tuple[int, int] = EARLY) -> dict:
    """`better` minus `other` on `metric` averaged over the `window` of their curves, with the paired bootstrap's
    interval over the curve's prompts (both curves sample the same prompts from the same noise)."""
    from .paired import difference
    a, b = ([window_values(p, s, metric, results, window) for s in seeds_of(p, m)] for m in (better, other))
    check = {"name": name, "metric": f"{metric}, mean over curve steps {window[0]}-{window[1]}",
             "models": [better, other], "difference": None, "ci95": None}
    if any(v is None for v in a + b) or len({v[0] for v in a + b}) > 1:  # not run, or resumed (earlier steps gone)
        return check
    d, ci = difference([v[1] for v in a], [v[1] for v in b], seed=p.seed)
    return check | {"difference": d, "ci95": ci}


def cold_start(p, curves: list[list[dict]]) -> dict:
    """How cold the start is and how far stage 1 moves in C4's window: each metric at the curve's step 0 (the
    teacher as a 1-step generator) and at the window's end, the mean over seeds (beside C4's verdict)."""
    at = lambda step, k: float(np.mean([r[k] for c in curves for r in c if r["step"] == step]))
    return {k: [at(0, k), at(EARLY[1], k)] for k in ("reward_test", "gold", "geneval_overall")}


def _claim(cid: str, text: str, checks: list[dict], n_seeds: int) -> dict:
    """A claim's verdict from its checks' intervals, each shifted by its non-inferiority margin where it has one."""
    from .paired import verdict
    shifted = [None if c["ci95"] is None else [x + c.get("margin", 0.0) for x in c["ci95"]] for c in checks]
    return {"id": cid, "claim": text, "verdict": verdict(shifted), "n_seeds": n_seeds, "checks": checks}


def claims(p, summ: dict, results: Path = RESULTS) -> list[dict]:
    """The paper's claims C1-C4 decided from intervals (DESIGN.md section 4): each check is the claimed-better model
    minus the other, with the 95% interval of a paired bootstrap over the test prompts combined with the training
    seeds where a recipe has several (dmdr.paired); a claim holds when every interval lies above 0, does not hold
    when one lies below. The models, metrics and windows are fixed here, before looking at results."""
    out, pairs = [], Pairs(p, results)
    if pairs.have("dmdr-4", "teacher", "dmd2-4"):
        rivals = [m for m in ("teacher", "dmd2-4", "dmd2-4-long") if pairs.have(m)]
        checks = [pairs.check(f"dmdr-4 above {r} on {k}", k, "dmdr-4", r)
                  for k in ("hps", "gold", "geneval_overall", "dpg_overall") for r in rivals]
        out.append(_claim("C1", "dmdr-4 beats the teacher and DMD (dmd2-4, and dmd2-4-long: DMD for as many steps) on "
                          "hps and on the held-out metrics gold, geneval_overall, dpg_overall", checks,
                          len(seeds_of(p, "dmdr-4"))))
        if pairs.have("dmd2-4-long"):  # beside the verdict, not part of it
            out[-1]["gap_closed"] = [pairs.gap_closed(k, "dmdr-4", "dmd2-4-long", "teacher")
                                     for k in ("gold", "geneval_overall", "dpg_overall")]

    rl, joint = "dmd-then-rl-4", "dmd-then-joint-4"
    if pairs.have(rl, joint, "dmd2-4"):
        others = [m for m in (joint, "dmd2-4-long", "dmdr-4", "rtdm-only-4") if pairs.have(m)]
        checks = [pairs.check(f"RL alone above {m} on the training reward", "hps", rl, m) for m in others]
        checks += [pairs.check("joint above RL alone on gold (RL alone hacks the reward)", "gold", joint, rl),
                   pairs.check("joint above dmd2-4 on dpg_overall", "dpg_overall", joint, "dmd2-4")]
        out.append(_claim("C2", "RL after DMD reaches the highest training reward (hps on the test prompts) while its "
                          "gold falls below DMD then joint DMD+RL (reward hacking); the joint run keeps dpg_overall "
                          "at dmd2-4's level", checks, pairs.n_seeds(rl, joint)))

    if all(stitched_curve(p, m) for m in C3_PAIR):
        checks = [_window_check(p, f"RT-DM alone above DMD alone on {k}", k, *C3_PAIR, results, RISE)
                  for k in ("reward_test", "reward_train")]
        out.append(_claim("C3", f"RT-DM raises the reward earlier than DMD only: RT-DM alone ({C3_PAIR[0]}) above "
                          f"DMD alone ({C3_PAIR[1]}), both from the teacher, in mean reward over curve steps "
                          f"{RISE[0]}-{RISE[1]}", checks, min(len(seeds_of(p, m)) for m in C3_PAIR)))

    ablations = [m for m in C4_ABLATIONS if stitched_curve(p, m)]
    if stitched_curve(p, C4_STAGE1) and ablations:
        checks = [_window_check(p, f"1-step stage 1 above {a} on {k}", k, C4_STAGE1, a, results)
                  for a in ablations for k in ("reward_test", "gold")]
        out.append(_claim("C4", f"DynaDG and DynaRS improve early training where a cold start exists: 1-step stage 1 "
                          f"from the teacher ({C4_STAGE1}) with both beats it without either, mean test reward and "
                          f"gold over curve steps {EARLY[0]}-{EARLY[1]}", checks,
                          min(len(seeds_of(p, m)) for m in (C4_STAGE1, *ablations))))
        out[-1]["cold_start"] = cold_start(p, [stitched_curve(p, s) for s in seeds_of(p, C4_STAGE1)])

    if pairs.have(*(m for pair in C5_PAIRS for m in pair)):
        checks = [pairs.noninferior(k, student, teacher, C5_MARGIN * summ[teacher][k])
                  for student, teacher in C5_PAIRS for k in C5_METRICS]
        out.append(_claim("C5", f"the 4-step DMDR students at least match their teachers, flow and epsilon, on "
                          f"{' and '.join(C5_METRICS)}: each keeps at least {1 - C5_MARGIN:.0%} of its teacher's "
                          f"score (a non-inferiority margin of {C5_MARGIN:.0%} of the teacher's score)", checks,
                          min(len(seeds_of(p, s)) for s, _ in C5_PAIRS)))
    return out + table5_claims(pairs) + table6_claims(results)


def table6_claims(results: Path = RESULTS) -> list[dict]:
    """C7 on Table 6's students (one training seed each): CFG above 1 against CFG 1 at each RL setting, and RL
    against none at each CFG, raises precision and the Inception Score and lowers recall. Each check's interval is
    over the quality stage's class-balanced parts, paired (dmdr.quality.paired_parts)."""
    from .quality import paired_parts, part_metrics
    have = [m for m in TABLE6[1:] if (results / "quality" / f"{m}.npz").exists()]
    if len(have) < len(TABLE6) - 1:
        return []
    parts = {m: part_metrics(results / "quality" / f"{m}.npz") for m in have}
    pairs = [(f"cls-1-cfg{g}-{rl}", f"cls-1-cfg1-{rl}", f"CFG {CFGS[g]:g}") for rl in ("norl", "rl") for g in ("1p5", "4")]
    pairs += [(f"cls-1-cfg{g}-rl", f"cls-1-cfg{g}-norl", "RL") for g in CFGS]
    checks = []
    for strong, weak, what in pairs:
        for metric, side in C7_SIDES.items():
            d, ci = paired_parts(side * parts[strong][metric], side * parts[weak][metric])
            checks.append({"name": f"{what}: {strong} {'above' if side > 0 else 'below'} {weak} on {metric}",
                           "metric": metric, "models": [strong, weak], "difference": d, "ci95": ci})
    return [_claim("C7", "CFG and RL lower recall and raise precision and the Inception Score: each CFG above 1 against "
                   "CFG 1 (with and without RL), and RL against none at each CFG, in the world classifier's features",
                   checks, 1)]


def table5_claims(pairs: Pairs) -> list[dict]:
    """C6 in three parts, on Table 5's models, each over its seeds where `pairs` reads them (every seed continues the
    stage 1 of its own seed): (a) each reward model lifts its own metric most, above every other single reward's run;
    (b) every RL algorithm beats the stage-1 init on the training reward (hps); (c) too high a lambda lowers
    dpg_overall: lambda 2.0 below the default 0.5."""
    out, rm = [], lambda r: table5_model("a", r)
    if pairs.have(*(rm(r) for r in REWARD_METRICS)):
        checks = [pairs.check(f"{rm(r)} above {rm(o)} on {metric}", metric, rm(r), rm(o))
                  for r, metric in REWARD_METRICS.items() for o in REWARD_METRICS if o != r]
        out.append(_claim("C6a", "each reward model lifts its own metric most: stage 2 on one reward scores above "
                          "stage 2 on each other single reward on that reward's metric", checks,
                          pairs.n_seeds(*(rm(r) for r in REWARD_METRICS))))
    algorithms = [table5_model("b", a) for a in TABLE5["b"][2]]
    if pairs.have("dmdr-stage1-4", *algorithms):
        checks = [pairs.check(f"{m} above dmdr-stage1-4 on hps", "hps", m, "dmdr-stage1-4") for m in algorithms]
        out.append(_claim("C6b", "every RL algorithm (ReFL, DPO, GRPO) beats the stage-1 init on the training reward",
                          checks, pairs.n_seeds("dmdr-stage1-4", *algorithms)))
    high = table5_model("c", "2p0")
    if pairs.have("dmdr-4", high):
        out.append(_claim("C6c", "too high a lambda lowers dpg_overall: lambda 0.5 (dmdr-4) above lambda 2.0",
                          [pairs.check(f"dmdr-4 above {high} on dpg_overall", "dpg_overall", "dmdr-4", high)],
                          pairs.n_seeds("dmdr-4", high)))
    return out


def plot_lambda(p, summ: dict, out: Path | None = None):
    """Table 5(c) as a figure: each metric of stage 2 against its lambda, the stage-1 init as a dotted line, each the
    mean over its evaluated seeds."""
    values = [v for v in TABLE5["c"][2] if table5_model("c", v) in summ]
    means = {m: seed_mean(p, summ, m)[0] for m in ["dmdr-stage1-4"] + [table5_model("c", v) for v in values]}
    metrics = ["hps", "gold", "geneval_overall", "dpg_overall"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8))
    for ax, k in zip(axes, metrics):
        ax.plot([float(v.replace("p", ".")) for v in values], [means[table5_model("c", v)].get(k, np.nan) for v in values], "o-")
        if k in means["dmdr-stage1-4"]:
            ax.axhline(means["dmdr-stage1-4"][k], ls=":", c="gray", label="stage-1 init")
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_title(k)
    axes[0].legend(fontsize=8)
    fig.suptitle("Table 5(c) analogue: the RL weight lambda in stage 2 (ReFL on hps, from dmdr-stage1-4; mean over "
                 "seeds)")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def plot_rtdm_beta(pairs: Pairs, results: Path = RESULTS, out: Path | None = None):
    """RT-DM's gain against beta: for RT-DM alone from the stage-1 init at each beta, its hps and gold minus those of
    DMD alone from the same init (paired, with the bootstrap's 95% interval), and how far its weights tilted the batch
    (the effective sample size logged over its curve, as a fraction of the batch)."""
    from .config import recipe
    runs = {m: b for m, b in RTDM_BETAS.items() if pairs.have(m, RTDM_BASE)}
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.9))
    for ax, k in zip(axes, ("hps", "gold")):
        checks = [pairs.check("", k, m, RTDM_BASE) for m in runs]
        d = np.array([c["difference"] for c in checks])
        ci = np.array([c["ci95"] for c in checks]).reshape(-1, 2)
        ax.errorbar(list(runs.values()), d, yerr=[d - ci[:, 0], ci[:, 1] - d], fmt="o-", capsize=3)
        ax.axhline(0, ls=":", c="gray")
        ax.set_title(f"{k}: RT-DM minus DMD")
    for m, beta in runs.items():
        rows = [r for r in read_csv(results / "curves" / f"{m}.csv") if r.get("rtdm_ess") not in (None, "")]
        axes[2].plot(beta, np.mean([float(r["rtdm_ess"]) for r in rows]) / recipe(pairs.p, m).batch, "o", c="C0")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("effective sample size / batch")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("beta")
    fig.suptitle(f"RT-DM alone for 40 steps from dmdr-stage1-4, against DMD alone ({RTDM_BASE}); one seed each",
                 fontsize=9)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def plot_table6(summ: dict, out: Path | None = None):
    """Table 6 as a figure: precision against recall, and the Inception Score against FID, one point per model,
    CFG 1 -> 1.5 -> 4 joined for each RL setting."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (x, y) in zip(axes, (("recall", "precision"), ("fid", "inception_score"))):
        for rl, marker in (("norl", "o-"), ("rl", "s--")):
            names = [f"cls-1-cfg{g}-{rl}" for g in CFGS if f"cls-1-cfg{g}-{rl}" in summ]
            ax.plot([summ[m][x] for m in names], [summ[m][y] for m in names], marker,
                    label="RL" if rl == "rl" else "no RL")
            for m in names:
                ax.annotate(f"CFG {CFGS[m.split('-')[2][3:]]:g}", (summ[m][x], summ[m][y]), fontsize=6)
        if "cls-teacher" in summ:
            ax.plot(summ["cls-teacher"][x], summ["cls-teacher"][y], "k*", label="teacher (50 steps, CFG 1)")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    axes[0].legend(fontsize=7)
    fig.suptitle("Table 6 analogue: quality against diversity (1-step students; world classifier's features)",
                 fontsize=9)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def claims_markdown(items: list[dict]) -> str:
    """Each claim's verdict, then each check's difference (claimed-better minus other) with its 95% interval."""
    parts = []
    for c in items:
        seeds = f"{c['n_seeds']} training seed{'s' if c['n_seeds'] != 1 else ''}"
        lines = [f"**{c['id']}** {c['claim']}: **{c['verdict']}** in the embedded world ({seeds})."]
        lines += ["", "| check | metric | difference | 95% interval |", "|---|---|---|---|"]
        for k in c["checks"]:
            ci = "-" if k["ci95"] is None else f"[{fmt(k['ci95'][0])}, {fmt(k['ci95'][1])}]"
            lines.append(f"| {k['name']} | {k['metric']} | {'-' if k['difference'] is None else fmt(k['difference'])} "
                         f"| {ci} |")
        if c.get("gap_closed"):
            student, base, teacher = c["gap_closed"][0]["models"]
            lines += ["", f"Beside the verdict: the fraction of {base}'s gap to the {teacher} that {student} closes "
                          f"(1: all of it; below 0: wider): " + "; ".join(
                              f"{g['metric']} {fmt(g['fraction'])} [{fmt(g['ci95'][0])}, {fmt(g['ci95'][1])}]"
                              if g["fraction"] == g["fraction"] else f"{g['metric']}: no gap"
                              for g in c["gap_closed"]) + "."]
        if c.get("cold_start"):
            lines += ["", f"Beside the verdict: the 1-step start and where stage 1 is at step {EARLY[1]} (the mean over "
                          f"its seeds; curve prompts): " + "; ".join(
                              f"{k} {fmt(a)} -> {fmt(b)}" for k, (a, b) in c["cold_start"].items()) + "."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "_No claims checked yet: run the main command._"


def seed_mean(p, summ: dict, model: str) -> tuple[dict, int]:
    """The mean of the metrics of `model`'s evaluated seed repeats (`-s1`, `-s2`; itself among them), and how many
    there are (0: none evaluated)."""
    runs = [summ[s] for s in seeds_of(p, model) if s in summ]
    keys = [k for k in (runs[0] if runs else {}) if all(isinstance(r.get(k), (int, float)) for r in runs)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}, len(runs)


def over_seeds(p, summ: dict, names: list[str], label=lambda m: m) -> dict:
    """Table rows of `names` (shown as `label(name)`): a model with evaluated seed repeats as the mean of its seeds'
    metrics, named with their count, as the claims read it."""
    rows = {}
    for m in names:
        mean, n = seed_mean(p, summ, m)
        if n:
            rows[label(m) if n == 1 else f"{label(m)} ({n} seeds)"] = mean
    return rows


def write_tables(p, summ: dict, models: list[str], results: Path = RESULTS) -> list[Path]:
    """The paper's tables (Markdown and CSV under results/tables) from the summary of the evaluated models; a model
    with seed repeats is their mean (over_seeds)."""
    seeded = lambda names: over_seeds(p, summ, names)  # noqa: E731
    return [write_table(seeded(TABLE_DISTILL), COLUMNS, results / "tables" / "distill",
                          "Teacher (50 steps, CFG) vs DMD2 4-step and 1-step generators (embedded world, test prompts; teacher-4: the undistilled teacher in the 4-step sampler)"),
              write_table(seeded(TABLE1), TABLE1_COLUMNS, results / "tables" / "table1",
                          "Table 1 analogue: rewards (hps is the training reward) and held-out quality"),
              write_table(seeded(TABLE34), ["geneval_overall"] + [f"geneval_{t}" for t in GENEVAL_TAGS],
                          results / "tables" / "table3", "Table 3 analogue: the GenEval analogue per tag (flow and epsilon teachers)"),
              write_table(seeded(TABLE34), ["dpg_overall"] + sorted(
                  {k for m in TABLE34 for k in summ.get(m, {}) if k.startswith("dpg_") and k != "dpg_overall"}),
                          results / "tables" / "table4", "Table 4 analogue: the DPG analogue per category (flow and epsilon teachers)"),
              write_table(seeded(TABLE2), TABLE2_COLUMNS, results / "tables" / "table2",
                          "Table 2 analogue: multi-step RL on the teacher (teacher-refl), then distilled, vs joint DMDR"),
              *[write_table(over_seeds(p, summ, ["dmdr-stage1-4"] + [table5_model(part, v) for v in values],
                                       lambda m: "dmdr-stage1-4 (init)" if m == "dmdr-stage1-4" else m),
                            TABLE5_COLUMNS, results / "tables" / f"table5{part}",
                            f"Table 5({part}) analogue: the {what} of stage 2, each seed from the stage-1 init of its "
                            f"seed (dmdr-4: {what} {own.replace('p', '.') if part == 'c' else own})")
                for part, (what, key, values, own) in TABLE5.items()],
              write_table({m: summ[m] for m in TABLE6 if m in summ}, TABLE6_COLUMNS, results / "tables" / "table6",
                          "Table 6 analogue: quality against diversity in the class-conditional world (1 step; FID, "
                          "precision, recall, IS and within-class diversity in the world classifier's features; cls-teacher: its "
                          "Euler sampler, CFG 1, nfe its steps)"),
              write_table({m: summ[m] for m in models if m in summ}, ALL_COLUMNS, results / "tables" / "all_models",
                          "Every evaluated model")]


def build(p, results: Path = RESULTS) -> dict:
    """summary.json, tables, figures and claims from whatever has been evaluated."""
    models = list(p.evaluate.models)
    summ = summary(models + list(p.quality.models), results)
    write_json(summ, results / "summary.json")

    tables = write_tables(p, summ, models, results)
    items = claims(p, summ, results)
    write_json(items, results / "claims.json")
    (results / "claims.md").write_text(claims_markdown(items) + "\n")
    figs = results / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    figures = []
    for m in models:
        if (results / "samples" / f"{m}.npz").exists():
            plt.close(sample_grid(results / "samples" / f"{m}.npz", m, out=figs / f"samples_{m}.png"))
            figures.append(figs / f"samples_{m}.png")
    for curve, fname, title in (("teacher", "teacher_accuracy.png", "flow teacher"),
                                ("teacher-eps", "teacher_eps_accuracy.png", "epsilon teacher")):
        if (results / "curves" / f"{curve}.csv").exists():
            plt.close(plot_teacher_curve(results / "curves" / f"{curve}.csv", out=figs / fname, title=title))
            figures.append(figs / fname)
    recipes = sorted(f.stem for f in (results / "curves").glob("*.csv") if f.stem not in ("teacher", "teacher-eps"))
    roots = [r for r in recipes if r in p.recipes and len(lineage(p, r)) == 1 and r.startswith("dmd2")
             and not re.search(r"-s\d+$", r)]  # one seed each: the seed repeats are drawn with their claims
    if roots:
        plot_curves({r: results / "curves" / f"{r}.csv" for r in roots}, out=figs / "distill_curves.png")
        figures.append(figs / "distill_curves.png")
    panels = {
        "figure3_paradigms.png": ({"DMD only": seeds_of(p, "dmd2-4-long"), "DMD then RL": seeds_of(p, "dmd-then-rl-4"),
                                   "DMD then DMD+RL": seeds_of(p, "dmd-then-joint-4")},
                                  "Figure 3 analogue: RL after DMD vs joint DMD+RL (hps reward)", {}),
        "figure4_rtdm.png": ({"DMD only": seeds_of(p, "dmd2-4-long"), "RT-DM only": ["rtdm-only-4"],
                              "RT-DM then DMD+RL (DMDR)": seeds_of(p, "dmdr-4")}, "Figure 4 analogue: RT-DM and joint training", {}),
        "c3_rise.png": ({"DMD alone": seeds_of(p, C3_PAIR[1]), "RT-DM alone": seeds_of(p, C3_PAIR[0])},
                        f"C3: RT-DM alone against DMD alone from the teacher (the window: steps {RISE[0]}-{RISE[1]})",
                        {"metrics": ["reward_test", "reward_train", "gold", "geneval_overall"], "mark": RISE[1]}),
        "cold_start_1step.png": ({"DMD (neither)": ["dmd2-1"],
                                  **{f"stage 1 without {t}": seeds_of(p, f"dmdr-1-no-{t.lower()}")
                                     for t in ("DynaDG", "DynaRS")},
                                  "stage 1 (RT-DM + DynaDG + DynaRS)": seeds_of(p, C4_STAGE1)},
                                 "C4: the 1-step cold start (DynaDG and DynaRS annealed away by the dotted line)",
                                 {"metrics": ["reward_test", "geneval_overall", "dpg_overall", "gold"],
                                  "xlim": (0, 100), "mark": 50}),
        "cold_start.png": ({"DMD (neither)": ["dmd2-4"], "stage 1 without DynaDG": ["dmdr-4-no-dynadg"],
                            "stage 1 without DynaRS": ["dmdr-4-no-dynars"], "stage 1 (RT-DM + DynaDG + DynaRS)": ["dmdr-stage1-4"]},
                           "The 4-step start, no cold start: DynaDG and DynaRS (annealed away by the dotted line)",
                           {"metrics": ["reward_test", "geneval_overall", "dpg_overall", "gold"], "xlim": (0, 100),
                            "mark": 50}),
    }
    for fname, (groups, title, kw) in panels.items():
        if any(n in p.recipes and stitched_curve(p, n) for names in groups.values() for n in names):
            plot_paradigms(p, groups, title, out=figs / fname, **kw)
            figures.append(figs / fname)
    shown = {m: results / "samples" / f"{m}.npz" for m in FIGURE7 if (results / "samples" / f"{m}.npz").exists()}
    if len(shown) > 1:
        plt.close(side_by_side(shown, out=figs / "figure7_side_by_side.png"))
        figures.append(figs / "figure7_side_by_side.png")
    shown = {m: results / "quality" / f"{m}.npz" for m in TABLE6 if (results / "quality" / f"{m}.npz").exists()}
    if len(shown) > 1:
        plt.close(side_by_side(shown, prompts=9, out=figs / "table6_samples.png",
                               title="Table 6 analogue: each class from the same noise"))
        plt.close(plot_table6(summ, out=figs / "table6_tradeoff.png"))
        figures += [figs / "table6_samples.png", figs / "table6_tradeoff.png"]
    pairs = Pairs(p, results, seeds=False)  # every beta continues the one stage-1 run
    if sum(pairs.have(m, RTDM_BASE) for m in RTDM_BETAS) > 1:
        plt.close(plot_rtdm_beta(pairs, results, out=figs / "rtdm_beta.png"))
        figures.append(figs / "rtdm_beta.png")
    if sum(table5_model("c", v) in summ for v in TABLE5["c"][2]) > 1:
        plt.close(plot_lambda(p, summ, out=figs / "table5_lambda.png"))
        figures.append(figs / "table5_lambda.png")
    if (results / "metrics" / "rewards.json").exists():
        plot_reward_agreement(results / "metrics" / "rewards.json", out=figs / "reward_agreement.png")
        figures.append(figs / "reward_agreement.png")
    plt.close("all")
    return {"tables": [str(t) for t in tables], "figures": [str(f) for f in figures]}


def standin_lines(results: Path = RESULTS) -> list[str]:
    """The README's lines on the stand-ins trained beside the world: the epsilon teacher and the world classifier."""
    parts = []
    eps = results / "metrics" / "teacher_eps.json"
    if eps.exists():
        e = json.loads(eps.read_text())
        parts.append(f"Epsilon teacher (`results/metrics/teacher_eps.json`, stage teacher_eps): {e['teacher_class']} "
                     f"({e['teacher_params_millions']:.2f} M parameters) on a VP schedule ending at flow time "
                     f"{e['max_t']:.3f}; GenEval analogue {e['teacher_geneval_overall_during_training']:.3f} at the "
                     f"end of training (25 steps, CFG 3, as the flow teacher's curve); trained in "
                     f"{e['teacher_minutes']:.1f} min, a stand-in like the world's (committed with it).")
    classifier = results / "metrics" / "classifier.json"
    if classifier.exists():
        c = json.loads(classifier.read_text())
        parts.append(f"World classifier (`results/metrics/classifier.json`, stage classifier, for Table 6): top-1 "
                     f"accuracy {c['accuracy']:.3f} over its {c['classes']} classes on fresh renders; trained in "
                     f"{c['minutes']:.1f} min.")
    return parts


def readme_results(results: Path = RESULTS) -> str:
    """The README's results section, generated from results/."""
    parts = []
    world = results / "metrics" / "world.json"
    if world.exists():
        w = json.loads(world.read_text())
        parts.append(
            "World stage (`results/metrics/world.json`): CLIP retrieval top-1 image->text "
            f"{w['clip_image_to_text_top1']:.3f} among {w['retrieval_candidates']} dense captions (independent CLIP "
            f"{w['clip_eval_image_to_text_top1']:.3f}); VAE reconstructions parsed scene-exact "
            f"{w['vae_reconstruction_parse_exact']:.3f}; teacher {w['teacher_class']} "
            f"({w['teacher_params_millions']:.2f} M parameters). Training time on this 2-core machine: CLIPs "
            f"{w['clip_minutes']:.1f} min, VAE {w['vae_minutes']:.1f} min, teacher {w['teacher_minutes']:.1f} min.")
    parts += standin_lines(results)
    parser = results / "metrics" / "parser.json"
    if parser.exists():
        q = json.loads(parser.read_text())
        parts.append(f"Parser (`results/metrics/parser.json`): {q['clean_scene_exact']:.3f} of {q['scenes']} random clean "
                     f"renders parsed scene-exact; {q['mild_corruption_scene_exact']:.3f} under mild blur, noise and colour "
                     "jitter (`dmdr.world.parse.mild_corruption`).")
    rewards = results / "metrics" / "rewards.json"
    if rewards.exists():
        r = json.loads(rewards.read_text())
        parts.append(f"Rewards stage (`results/metrics/rewards.json`): pairwise agreement with gold on {r['held_out_pairs']} "
                     f"held-out pairs (test prompts): clip {r['clip_agreement']:.3f}, hps {r['hps_agreement']:.3f}, pick "
                     f"{r['pick_agreement']:.3f}, aesthetic {r['aesthetic_agreement']:.3f} (with gold's aesthetic half: "
                     f"{r['aesthetic_agreement_with_gold_aesthetics']:.3f}); trained on {r['train_pairs']} noisy pairs in "
                     f"{r['minutes']:.1f} min." + (
                         f" Near the model's own samples (every pair of one test prompt's 4 samples of the teacher in "
                         f"the 4-step sampler whose gold differs, {r['near_pairs']} pairs, no render among them): hps "
                         f"{r['hps_agreement_near']:.3f}, pick {r['pick_agreement_near']:.3f}, aesthetic "
                         f"{r['aesthetic_agreement_near']:.3f}, clip {r['clip_agreement_near']:.3f}; issue 21's gate, hps "
                         f"at least {r['hps_near_gate']:.2f} there: "
                         f"{'passed' if r['hps_near_gate_passed'] else 'not passed'}." if "near_pairs" in r else ""))
    for name in ("table1", "table2", "table3", "table4", "table5a", "table5b", "table5c", "table6", "distill",
                 "all_models"):
        table = results / "tables" / f"{name}.md"
        if table.exists():
            parts.append(table.read_text().strip())
    if timings := stage_times():
        parts.append(timings)
    for name, what, command in (
            ("sampling_speed", "Sampling benchmark", "benchmarks/sampling_speed.py"),
            ("step_cost", "Training-step benchmark", "benchmarks/step_cost.py"),
            ("step_cost_cores", "How a DMD step uses the cores (what `make repro`'s stages side by side rest on)",
             "benchmarks/step_cost.py --cores"),
            ("launch_count", "Launches per real-scale step, counted on CPU", "benchmarks/launch_count.py"),
            ("launch_count_bf16_weights", "The same in mixed_precision bf16-weights",
             "benchmarks/launch_count.py --precision bf16-weights"),
            ("flop_count", "FLOPs per real-scale step, counted on CPU", "benchmarks/flop_count.py"),
            ("dynadg_pull", "DynaDG's pull by learning rate", "benchmarks/dynadg_pull.py"),
            ("near_rewards", "The hps analogue near the model's own samples", "benchmarks/near_rewards.py"),
            ("reward_room", "The training reward's room above the teacher, and C1's hps intervals against it",
             "benchmarks/reward_room.py")):
        bench = results / "benchmarks" / f"{name}.txt"
        if bench.exists():
            parts.append(f"{what} (`{command}`, last run):\n\n```\n" + bench.read_text().strip() + "\n```")
    flop_count = results / "benchmarks" / "flop_count.txt"
    flops = flop_count.read_text() if flop_count.exists() else ""
    for bench in sorted((results / "benchmarks").glob("gpu_step_*.txt")):
        if bench.stem.count("_") != 2:  # gpu_step_<device>_<part>.txt: another part of that device's call, below
            continue
        text = bench.read_text().strip()
        capped = bench.with_name(bench.stem + "_capped.txt")
        goals = gpu_goals(text, capped.read_text() if capped.exists() else "")
        history = bench.with_name(bench.stem + "_history.md").as_posix()
        parts.append(f"GPU benchmark (`benchmarks/gpu_step.py` on a lent {bench.stem.split('_')[-1].upper()}, "
                     f"`{bench.as_posix()}`; earlier runs, and changes not yet measured, in `{history}`):\n\n"
                     f"```\n{text}\n```\n\n" + " ".join(filter(None, (goals, gpu_throughput(text, flops)))))
        for other in sorted(bench.parent.glob(bench.stem + "_*.txt")):
            parts.append(f"The same call's part `{other.stem.split('_')[-1]}` (`{other.as_posix()}`, "
                         f"`benchmarks/device_check.sh`):\n\n```\n{other.read_text().strip()}\n```")
    for fig in ["figure3_paradigms.png", "figure4_rtdm.png", "figure7_side_by_side.png", "table6_tradeoff.png",
                "table6_samples.png", "c3_rise.png", "cold_start_1step.png", "cold_start.png",
                "table5_lambda.png", "rtdm_beta.png", "reward_agreement.png",
                "teacher_accuracy.png", "distill_curves.png"] + [f"samples_{m}.png" for m in ("teacher", "dmd2-4", "dmdr-4",
                                                                                             "dmd-then-rl-4", "dmdr-1")]:
        if (results / "figures" / fig).exists():
            parts.append(f"![{fig[:-4]}](results/figures/{fig})")
    return "\n\n".join(parts) if parts else "_No results yet: run the main command._"


def gpu_goals(text: str, capped: str = "") -> str:
    """The issue's goals for the real-scale step, read off a gpu_step.py output: the full-fine-tune stage-2 step at
    most 1.25x the bare model passes and within 48 GB, 4-step sampling at least 22x faster than 50-step CFG.
    `capped`: the same call's stage 2 held to 48 GB (device_check.sh's part `capped`), which settles the fit."""
    stage2 = re.search(r"^stage 2 \(.*?: ([\d.]+) s per step = ([\d.]+)x the bare passes( of the reference setting)?"
                       r".*?, peak ([\d.]+) GiB(?: \(([\d.]+) GiB reserved)?", text, re.M)
    speedup = re.search(r"50-step CFG / 4-step = ([\d.]+)x", text)
    goals = []
    if stage2:
        ratio, gb = float(stage2[2]), float(stage2[4]) * 2**30 / 1e9
        # runs before the reference setting was measured compared with bare passes in the loop's own precision
        against = "the bare passes" + (" of the reference setting" if stage2[3] else " (in the loop's precision)")
        # the caching allocator keeps freed blocks when the card has room: only a run under a cap shows the fit
        reserved = f" ({float(stage2[5]) * 2**30 / 1e9:.1f} GB reserved, not run under a 48 GB cap)" \
            if stage2[5] and not capped and "under a memory cap" not in text else ""
        goals += [f"stage-2 step at most 1.25x {against}: {ratio:.2f}x, {'met' if ratio <= 1.25 else 'not met'}",
                  f"stage-2 peak within 48 GB: {gb:.1f} GB allocated{reserved}, {'met' if gb <= 48 else 'not met'}"]
    if capped:
        ran = re.search(r"^stage 2 \(.*, (\d+) allocator retries", capped, re.M)
        goals.append(f"stage 2 held to 48 GB: ran with {ran[1]} allocator retries, met" if ran else
                     "stage 2 held to 48 GB: did not finish (its part's log says why), not met")
    if speedup:
        goals.append(f"4-step sampling at least 22x faster than 50-step CFG: {float(speedup[1]):.1f}x, "
                     f"{'met' if float(speedup[1]) >= 22 else 'not met'}")
    return "Goals of the issue on this device: " + "; ".join(goals) + "." if goals else ""


def gpu_throughput(gpu: str, flops: str) -> str:
    """The bare passes' throughput on a GPU: their FLOPs as benchmarks/flop_count.py counts them (`flops`, its
    output) over their seconds in a gpu_step.py output (`gpu`), when both are at the same resolution and local batch.
    Only the bare passes: their calls are fixed, where the loop's FLOPs follow the code of its day."""
    setting = lambda text: (m := re.search(r"(\d+) px, local batch (\d+)", text)) and m.groups()
    counted = re.search(r"^bare passes of one DMD step: ([\d.]+) TFLOP", flops, re.M)
    if not counted or not setting(gpu) or setting(gpu) != setting(flops):
        return ""
    tflop = float(counted[1])
    timed = [(float(sec), how.split(";")[0] if ";" in how else "")
             for how, sec in re.findall(r"^bare passes of one DMD step \((.*?)\): ([\d.]+) s", gpu, re.M)]
    if not timed:
        return ""
    return (f"Throughput of the bare passes on this device ({tflop:.1f} TFLOP a step, counted on CPU: "
            "`results/benchmarks/flop_count.txt`): " + "; ".join(
                f"{tflop / sec:.0f} TFLOP/s" + (f" in {how}" if how else "") for sec, how in timed) + ".")


def stage_times(runs: Path = Path("runs")) -> str:
    """Each executed stage's wall minutes, their sum after the stand-ins, and the span of the last run of stages."""
    meta = papermill_metadata(runs)
    timings = stage_timings(meta)
    if not timings:
        return ""
    after_world = sum(v for k, v in timings.items() if k not in BEFORE)
    stages, span, at_once = stage_span(meta)
    return ("Stage wall times on this machine (minutes, from the executed notebooks in `runs/`): " + ", ".join(
        f"{k} {v:.1f}" for k, v in timings.items()) + f"; everything after the world and the epsilon teacher and "
        f"classifier (stand-ins, committed): {after_world:.1f} in all. The last run of stages ({stages} of them) took "
        f"{span:.1f} from its first start to its last end, up to {at_once} at once (`make repro`: pipeline/repro.py; "
        f"`python pipeline/repro.py --dry-run --all` replays these times through its schedule for a full run).")


BEFORE = ("prompts", "world", "teacher_eps", "classifier")  # the stages before and of the committed stand-ins


def papermill_metadata(runs: Path = Path("runs")) -> dict[str, dict]:
    """papermill's metadata of each executed stage notebook in `runs`, by the notebook's name."""
    return {nb.stem: json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
            for nb in sorted(runs.glob("*.ipynb"))}


def stage_timings(meta: dict[str, dict]) -> dict[str, float]:
    """Wall minutes of each executed stage notebook, from its papermill metadata (`papermill_metadata`)."""
    return {stem: m["duration"] / 60 for stem, m in meta.items() if m.get("duration") is not None}


def notebook_spans(meta: dict[str, dict], skip: tuple = ()) -> list[tuple[datetime, datetime]]:
    """(start, end) of each executed stage notebook but `skip` that has both, from its papermill metadata."""
    return [(datetime.fromisoformat(m["start_time"]), datetime.fromisoformat(m["end_time"]))
            for stem, m in meta.items() if stem not in skip and m.get("start_time") and m.get("end_time")]


def stage_span(meta: dict[str, dict], skip: tuple = BEFORE, pause: float = 10.0) -> tuple[int, float, int]:
    """The last run of the executed stage notebooks but `skip` (those after the last pause of more than `pause`
    minutes with none running): how many, the wall minutes from its first start to its last end, and the most of
    them that ran at once, from their papermill metadata."""
    spans = sorted(notebook_spans(meta, skip))
    run, end = [], None
    for start, stop in spans:
        if run and (start - end).total_seconds() > 60 * pause:
            run = []  # a pause with nothing running: what came before was an earlier run
        end = max(end, stop) if run else stop
        run.append((start, stop))
    if not run:
        return 0, 0.0, 0
    events = sorted([(a, 1) for a, _ in run] + [(b, -1) for _, b in run])  # at one instant an end before a start
    return len(run), (events[-1][0] - events[0][0]).total_seconds() / 60, max(accumulate(d for _, d in events))


def update_readme(readme: Path = Path("README.md"), results: Path = RESULTS) -> None:
    """Replace the text between the README's results markers with `readme_results`, and between its claims
    markers with results/claims.md."""
    text = readme.read_text()
    claims_md = (results / "claims.md").read_text().strip() if (results / "claims.md").exists() else \
        "_No claims checked yet: run the main command._"
    new = re.sub(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)",
                 lambda m: m[1] + readme_results(results) + "\n" + m[2], text, flags=re.S)
    new = re.sub(r"(<!-- claims:begin -->\n).*?(<!-- claims:end -->)", lambda m: m[1] + claims_md + "\n" + m[2],
                 new, flags=re.S)
    if new != text:
        readme.write_text(new)


if __name__ == "__main__":
    if sys.argv[1:] == ["readme"]:
        update_readme()
    elif len(sys.argv) == 3 and sys.argv[1] == "training":
        plot_training(sys.argv[2])
        print(f"wrote {Path(sys.argv[2]) / 'curves.png'}")
    else:
        sys.exit("usage: python -m dmdr.report readme | training RUN_DIR (e.g. models/real/sd3-medium)")
