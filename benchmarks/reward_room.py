"""How much room the training reward (hps) leaves above the teacher, and whether C1's hps checks can resolve it
(issue 21: the half-width of C1's hps interval at most a third of the room; the room: the exact renders' hps minus the
teacher's).

Exact renders of every test prompt, as many layouts a prompt as evaluation draws images (`evaluate.images_per_prompt`),
are scored by the evaluation's hps and gold, and paired prompt by prompt with the teacher's evaluated samples
(results/samples/teacher.npz: the same prompts in the same order), with the paired bootstrap of the claims
(dmdr.paired). C1's hps intervals are read from results/claims.json.

    python benchmarks/reward_room.py [--out FILE]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import config  # noqa: E402
from dmdr.evaluator import score  # noqa: E402
from dmdr.paired import difference, mean_values  # noqa: E402
from dmdr.prompts import load_records  # noqa: E402
from dmdr.rewards import load_reward  # noqa: E402
from dmdr.world import grammar, parse, render  # noqa: E402
from dmdr.world.score import gold  # noqa: E402

from output import emit  # noqa: E402


def renders(texts: list[str], seed: int) -> np.ndarray:
    """An exact render of each text's scene, its layout drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([render(grammar.scene_for(grammar.read(t), rng)) for t in texts])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the printed lines to this file")
    a = ap.parse_args()
    p = config.load("params.yaml")
    k = p.evaluate.images_per_prompt
    with np.load("results/samples/teacher.npz") as f:
        texts, teacher = [str(t) for t in f["texts"]], {m: f[f"score_{m}"] for m in ("hps", "gold")}
    records = load_records("data/prompts/test_geneval.jsonl") + load_records("data/prompts/test_dpg.csv")
    if texts != [r["prompt"] for r in records for _ in range(k)]:
        sys.exit("results/samples/teacher.npz was evaluated on other prompts: run `dvc repro evaluate@teacher`")
    images = renders(texts, p.seed)
    exact = {"hps": score({"hps": load_reward("hps")}, images, texts)["hps"],
             "gold": np.array([gold(im, t, parse(im)) for im, t in zip(images, texts)])}
    lines = [f"exact renders of the {len(texts) // k} test prompts ({k} layouts each) against the teacher's samples "
             f"(50 steps, CFG 3), paired by prompt:"]
    room = {}
    for m in ("hps", "gold"):
        room[m], ci = difference([mean_values(exact[m], k)], [mean_values(teacher[m], k)], seed=p.seed)
        lines.append(f"  {m:5s} renders {exact[m].mean():.4f}, teacher {teacher[m].mean():.4f}: room {room[m]:+.4f} "
                     f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")
    c1 = next((c for c in json.loads(Path("results/claims.json").read_text()) if c["id"] == "C1"), None)
    if c1 is not None:
        for c in c1["checks"]:
            if c["metric"] == "hps":
                half = (c["ci95"][1] - c["ci95"][0]) / 2
                seeds = f"{c1['n_seeds']} seed{'s' if c1['n_seeds'] != 1 else ''}"
                lines.append(f"  C1 '{c['name']}' ({seeds}): half-width {half:.4f} = "
                             f"{half / room['hps']:.2f} of the hps room (goal: at most 0.33)")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
