"""The benchmarks' CPU proxies measure what they say: benchmarks/flop_count.py counts the loop's FLOPs at real widths on
fake tensors, which is only sound if faking the weights changes neither the model calls nor the host-side draws that
decide them (the rollout's level: four generator calls or none)."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flop_count  # noqa: E402
import gpu_step  # noqa: E402

from dmdr.models import VelocityModel  # noqa: E402


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # deepcopy's check, harmless
def test_flops_counted_on_fake_tensors_are_those_of_a_real_run():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**gpu_step.TINY)
    vae = AutoencoderKL(**gpu_step.TINY_VAE).requires_grad_(False)
    reward = gpu_step.ClipReward("ViT-B-32").requires_grad_(False)
    rows = ("stage1", "stage2")  # the rollout draws its level in both; stage 2 adds the decoder and the reward
    real = flop_count.counted(VelocityModel(copy.deepcopy(transformer)).requires_grad_(False), vae, reward, batch=2,
                              resolution=64, steps=2, rows=rows)
    with flop_count.faked(transformer, vae, reward) as (transformer, vae, reward):
        fake = flop_count.counted(VelocityModel(transformer).requires_grad_(False), vae, reward, batch=2,
                                  resolution=64, steps=2, rows=rows)
    assert set(real) == {"bare", *rows}
    assert real == fake
    assert real["stage2"]["VAE decoder"] > 0 and real["stage2"]["reward"] > 0 and not real["stage1"]["reward"]
    assert real["bare"]["total"] == real["bare"]["transformer"] > 0
