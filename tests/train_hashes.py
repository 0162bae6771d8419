"""Hashes of what the training loop computes, over the configurations it has: the generator's, fake score's and real
score's weights and the logged rows after a few steps on the tiny models (tests/tiny.py). A refactor of the loop that
claims to change nothing proves it: `python tests/train_hashes.py > old.json` on the old code, then on the new, and
`diff` them (same machine: floating-point order differs across CPUs)."""
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_clip, tiny_models  # noqa: E402

from dmdr.distill import train  # noqa: E402
from dmdr.reward_terms import Combined  # noqa: E402
from dmdr.rewards import CosineReward  # noqa: E402

CONFIGS = {
    "dmd": {},
    "dmd-ttur3": {"ttur": 3},
    "reuse": {"ttur": 2, "rollout_reuse": True},
    "reuse-rtdm": {"ttur": 2, "rollout_reuse": True, "rtdm": {"enabled": True}},
    "rtdm-exp-tilt": {"rtdm": {"enabled": True, "beta": 0.1, "tilt_fake": True}},
    "rtdm-reward": {"rtdm": {"enabled": True, "form": "reward"}},
    "dynadg-paper": {"dynadg": {"form": "paper", "steps": 3}, "cfg_jitter": 0.5},
    "dynadg-released": {"dynadg": {"form": "released", "scale": 0.5, "steps": 3}, "ttur": 2},
    "dynars": {"dynars": {"enabled": True, "steps": 3}},
    "dynars-fake": {"dynars": {"enabled": True, "steps": 3, "fake_score": True}},
    "refl": {"rl": {"weight": 0.5}},
    "hinge": {"rl": {"weight": 0.5, "loss": "hinge", "margin": 0.9}},
    "rl-alone": {"dmd_weight": 0.0, "rl": {"weight": 1.0}},
    "rl-alone-trajectory-cfg": {"dmd_weight": 0.0, "rl": {"weight": 1.0}, "rollout": "trajectory",
                                "generator_cfg": 2.0, "generator_steps": 4},
    "micro": {"micro_batches": 2, "rl": {"weight": 0.5}, "rtdm": {"enabled": True}},
    "chunk": {"reward_chunk": 2, "rl": {"weight": 0.5}},
    "bf16": {"mixed_precision": "bf16", "rl": {"weight": 0.5}},
    "bf16-weights": {"mixed_precision": "bf16-weights", "dynadg": {"form": "paper"}},
    "generator-lora": {"generator_lora": {"enabled": True, "rank": 4, "alpha": 8.0}, "rl": {"weight": 0.5}},
    "grpo": {"dmd_weight": 0.0, "generator_steps": 4, "samples_per_prompt": 2, "micro_batches": 2,
             "rl": {"weight": 1.0, "loss": "grpo", "grpo": {"kl": 0.1}}},
    "dpo-with-dmd": {"samples_per_prompt": 2, "rl": {"weight": 0.5, "loss": "dpo"}},
    "all": {"ttur": 2, "rollout_reuse": True, "rtdm": {"enabled": True}, "dynadg": {"form": "released"},
            "dynars": {"enabled": True, "fake_score": True}, "rl": {"weight": 0.3, "loss": "hinge"},
            "cfg_jitter": 0.5, "generator_weight_decay": 0.01},
}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(name: str, kind: str, overrides: dict, clip, tmp: Path | None = None) -> dict:
    reward = None
    if name in ("hinge", "all"):
        reward = Combined({"a": CosineReward(clip), "b": CosineReward(tiny_clip())}, {"a": 0.3, "b": 0.7}).requires_grad_(False)
    cfg, _, models = tiny_models(clip, kind, {"steps": 3, **overrides}, reward=reward)
    rows = train(cfg, models, ["a photo of a circle", "a photo of two squares", "a red triangle"], seed=1,
                 curve_fn=lambda g, step: {"probe": float(step)}, checkpoint_dir=tmp)
    for r in rows:
        r.pop("seconds", None)
    out = {"rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]}
    for k in ("generator", "fake", "real"):
        m = getattr(models, k)
        if m is not None:
            out[k] = digest(m.state_dict().values())
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    clip = tiny_clip()
    result = {}
    for kind in ("unet", "sd3"):
        for name, overrides in CONFIGS.items():
            if kind == "sd3" and name not in ("dmd", "dynadg-released", "all", "refl"):
                continue
            result[f"{kind}/{name}"] = run(name, kind, overrides, clip)
            print(kind, name, result[f"{kind}/{name}"], file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1, sort_keys=True))
