"""The `report` stage: the paper's tables and figures regenerated from results/, and the README's generated
sections. Figures are drawn with matplotlib (no CDN)."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import read_csv, write_json  # noqa: E402
from .world.grammar import GENEVAL_TAGS  # noqa: E402

RESULTS = Path("results")
TABLE_DISTILL = ["teacher", "teacher-nocfg", "teacher-4", "dmd2-4", "dmd2-1"]
COLUMNS = ["nfe", "geneval_overall"] + [f"geneval_{t}" for t in GENEVAL_TAGS] + \
          ["dpg_overall", "clip_score", "gold", "sec_per_image"]


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


def sample_grid(npz: str | Path, title: str = "", out: Path | None = None):
    """The first image of 48 test prompts spread evenly over the test set, with their prompts as titles."""
    data = np.load(npz)
    images, texts = data["images"], data["texts"]
    firsts = [i for i in range(len(texts)) if i == 0 or texts[i] != texts[i - 1]]
    pick = firsts[:: max(1, len(firsts) // 48)][:48]
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


def plot_teacher_curve(csv_path: str | Path, out: Path | None = None):
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
    ax.set_title("flow teacher during training")
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


def build(p, results: Path = RESULTS) -> dict:
    """summary.json, tables and figures from whatever has been evaluated."""
    models = list(p.evaluate.models)
    summ = summary(models, results)
    write_json(summ, results / "summary.json")

    tables = [write_table({m: summ[m] for m in TABLE_DISTILL if m in summ}, COLUMNS, results / "tables" / "distill",
                          "Teacher (50 steps, CFG) vs DMD2 4-step and 1-step generators (embedded world, test prompts; teacher-4: the undistilled teacher in the 4-step sampler)")]
    figs = results / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    figures = []
    for m in models:
        if (results / "samples" / f"{m}.npz").exists():
            sample_grid(results / "samples" / f"{m}.npz", m, out=figs / f"samples_{m}.png")
            figures.append(figs / f"samples_{m}.png")
    if (results / "curves" / "teacher.csv").exists():
        plot_teacher_curve(results / "curves" / "teacher.csv", out=figs / "teacher_accuracy.png")
        figures.append(figs / "teacher_accuracy.png")
    recipes = sorted(f.stem for f in (results / "curves").glob("*.csv") if f.stem != "teacher")
    if recipes:
        plot_curves({r: results / "curves" / f"{r}.csv" for r in recipes}, out=figs / "distill_curves.png")
        figures.append(figs / "distill_curves.png")
    plt.close("all")
    return {"tables": [str(t) for t in tables], "figures": [str(f) for f in figures]}


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
    parser = results / "metrics" / "parser.json"
    if parser.exists():
        q = json.loads(parser.read_text())
        parts.append(f"Parser (`results/metrics/parser.json`): {q['clean_scene_exact']:.3f} of {q['scenes']} random clean "
                     f"renders parsed scene-exact; {q['mild_corruption_scene_exact']:.3f} under mild blur, noise and colour "
                     "jitter (`dmdr.world.parse.mild_corruption`).")
    table = results / "tables" / "distill.md"
    if table.exists():
        parts.append(table.read_text().strip())
    timings = stage_timings()
    if timings:
        after_world = sum(v for k, v in timings.items() if k not in ("prompts", "world"))
        parts.append("Stage wall times on this machine (minutes, from the executed notebooks in `runs/`): " + ", ".join(
            f"{k} {v:.1f}" for k, v in timings.items()) + f"; everything after the world: {after_world:.1f}.")
    bench = results / "benchmarks" / "sampling_speed.txt"
    if bench.exists():
        parts.append("Sampling benchmark (`benchmarks/sampling_speed.py`, last run):\n\n```\n" + bench.read_text().strip() + "\n```")
    for fig in ["teacher_accuracy.png", "distill_curves.png"] + [f"samples_{m}.png" for m in TABLE_DISTILL]:
        if (results / "figures" / fig).exists():
            parts.append(f"![{fig[:-4]}](results/figures/{fig})")
    return "\n\n".join(parts) if parts else "_No results yet: run the main command._"


def stage_timings(runs: Path = Path("runs")) -> dict[str, float]:
    """Wall minutes of each executed stage notebook, from papermill's metadata."""
    out = {}
    for nb in sorted(runs.glob("*.ipynb")):
        meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("duration") is not None:
            out[nb.stem] = meta["duration"] / 60
    return out


def update_readme(readme: Path = Path("README.md"), results: Path = RESULTS) -> None:
    """Replace the text between the README's results markers with `readme_results`."""
    text = readme.read_text()
    new = re.sub(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)",
                 lambda m: m[1] + readme_results(results) + "\n" + m[2], text, flags=re.S)
    if new != text:
        readme.write_text(new)


if __name__ == "__main__" and sys.argv[1:] == ["readme"]:
    update_readme()
