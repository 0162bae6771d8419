"""Teacher-recipe calibration (not part of the pipeline): trains the world's CLIP and VAE once, then several teacher
variants side by side (one process each), logging GenEval-analogue accuracy against training steps. On a GPU it
maps accuracy against steps fast; multiply steps by the CPU's measured seconds per step to plan the CPU budget.

    python benchmarks/calibrate_world.py OUT_DIR [--variants a,b,...]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dmdr import standins  # noqa: E402
from dmdr.config import TeacherParams  # noqa: E402
from dmdr.config import ClipConfig  # noqa: E402
from dmdr.tiny_clip import TinyClip  # noqa: E402
from dmdr.world import grammar  # noqa: E402

VARIANTS = {
    "unet32-ln-1e3": dict(),
    "unet32-uni-1e3": dict(timesteps="uniform"),
    "unet32-ln-2e3-b128": dict(lr=2e-3, batch=128),
    "unet64-ln-1e3": dict(channels=[64, 64]),
    "sd3-4L-ln-1e3": dict(backbone="sd3", layers=4, head_dim=16),
    "sd3-6L-ln-1e3": dict(backbone="sd3", layers=6, head_dim=32),
}


def run_variant(name, out, steps):
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    clip = TinyClip.load(out / "clip").to(dev)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(out / "vae").to(dev).eval()
    rng = np.random.default_rng(123)
    specs = [grammar.sample_spec(rng, t) for t in grammar.GENEVAL_TAGS for _ in range(16)]
    cfg = TeacherParams(**(dict(steps=steps, eval_every=min(1000, steps // 2), eval_steps=25,
                                pool_size=min(60000, steps * 64), mixed_precision="bf16")
                           | VARIANTS[name]))
    t = time.time()
    _, info = standins.train_teacher(cfg, clip, vae, 0, specs, desc=name)
    rows = [h for h in info["history"] if "geneval_overall" in h]
    (out / f"{name}.json").write_text(json.dumps({"variant": name, "cfg": vars(cfg), "rows": rows,
                                                  "seconds": time.time() - t}, indent=1))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 8000
    world_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 600
    t = time.time()
    clip, cm = standins.train_clip(ClipConfig(), 0, world_steps, 128, 2e-3)
    clip.save(out / "clip")
    vae, vm = standins.train_vae(0, world_steps, 64, 1e-3)
    vae.save_pretrained(out / "vae")
    print("clip", {k: v for k, v in cm.items() if k != "history"}, "vae", vm["reconstruction_parse_exact"],
          time.time() - t, flush=True)
    procs = [mp.get_context("spawn").Process(target=run_variant, args=(n, out, steps)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for n in names:
        f = out / f"{n}.json"
        if f.exists():
            r = json.loads(f.read_text())
            print(n, round(r["seconds"]), [(x["step"], round(x["geneval_overall"], 3)) for x in r["rows"]], flush=True)
