"""The benchmarks measure what they say: benchmarks/flop_count.py counts the loop's FLOPs at real widths on fake
tensors, which is only sound if faking the weights changes neither the model calls nor the host-side draws that decide
them (the rollout's level: four generator calls or none); benchmarks/trace_gaps.py splits a timeline's GPU idle time
by what each host thread was in; benchmarks/host_samples.py counts the host's time and its waits for the GPU by
the frames that spend them; benchmarks/near_rewards.py's other forms of reward learn a preference they can see, so
that where they fall short near the model's samples it is not their fit."""
import copy
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flop_count  # noqa: E402
import gpu_step  # noqa: E402
import host_samples  # noqa: E402
import near_rewards  # noqa: E402
import trace_gaps  # noqa: E402

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


def test_gpu_idle_time_is_split_by_what_each_host_thread_was_in(tmp_path):
    """Kernels busy 0-10 and 20-30 (one inside another's time) in a 40 us span: idle 10-20 and 30-40. The main
    thread is in op a (0-15, holding an inner op) and op b (25-35) inside a profiler step (0-40), the backward thread
    in one op (12-18); the rest of the idle time is outside any op."""
    import gzip
    import json
    x = lambda name, cat, tid, ts, dur: {"ph": "X", "name": name, "cat": cat, "tid": tid, "ts": ts, "dur": dur}
    events = [x("k1", "kernel", 7, 0, 10), x("k2", "kernel", 7, 5, 3), x("k3", "gpu_memcpy", 7, 20, 10),
              x("ProfilerStep#1", "user_annotation", 1, 0, 40), x("aten::a", "cpu_op", 1, 0, 15),
              x("aten::inner", "cpu_op", 1, 2, 3), x("aten::b", "cpu_op", 1, 25, 10), x("bw", "cpu_op", 2, 12, 6),
              {"ph": "i", "name": "marker", "ts": 3}]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    totals, by_thread = trace_gaps.idle_by_host_activity(trace_gaps.load(path))
    assert totals == {"span": 40, "busy": 20, "idle": 20, "windows": 2, "longest": 10}
    assert dict(by_thread[1]) == {"aten::a": 5, "aten::b": 5, trace_gaps.NO_OP: 10}
    assert dict(by_thread[2]) == {"bw": 6, trace_gaps.NO_OP: 14}
    lines = trace_gaps.report(totals, by_thread)
    assert lines[0] == "profiled span 0.0 ms: GPU busy 0.0 ms (50%), idle 0.0 ms in 2 windows (longest 0.0 ms)"
    with pytest.raises(ValueError, match="no host ops"):
        trace_gaps.idle_by_host_activity([x("k1", "kernel", 7, 0, 10)])


def test_host_samples_and_waits_are_counted_by_the_frames_that_make_them():
    sampler, waits = host_samples.Sampler(), host_samples.SyncSites()

    def idle_in_here():
        time.sleep(0.2)
    sampler.start()
    idle_in_here()
    counts = sampler.stop()
    (ours, inner), n = counts.most_common(1)[0]
    assert inner.startswith("test_benchmarks.py:") and inner.endswith(" idle_in_here") and n >= 50
    assert ours == "(not in our code)"
    assert sampler.stop() is counts  # stopping twice is harmless

    waits.start()
    warnings.warn("called a synchronizing CUDA operation")  # the words of torch's sync debug mode
    counts = waits.stop()
    assert list(counts.values()) == [1] and next(iter(counts))[1].endswith(
        " test_host_samples_and_waits_are_counted_by_the_frames_that_make_them")
    lines = host_samples.report(counts, "two steps", unit="waits for the GPU")
    assert lines[0] == "two steps: 1 waits for the GPU" and "100.0%" in lines[2]


def test_near_rewards_other_forms_learn_a_preference_they_can_see(clip):
    """Renders preferred to blank images: each form, fitted by the benchmark's fit on some prompts, orders the pairs
    of other prompts as gold does."""
    import numpy as np
    from dmdr.rewards import agreement, build_pairs
    from dmdr.world import grammar
    rng = np.random.default_rng(0)
    blank = np.full((16, 1, 32, 32, 3), 245, np.uint8)
    train, held = ([grammar.sample_spec(rng, "single_object") for _ in range(16)] for _ in range(2))
    train, held = build_pairs(train, blank, rng), build_pairs(held, blank, rng)
    for form in (near_rewards.TokenHeadReward, near_rewards.PixelReward):
        model = form(copy.deepcopy(clip))
        before = agreement(model, held)
        model = near_rewards.fit(model, train, steps=40, batch=16, lr=3e-3, label_noise=0.0, seed=0)
        assert agreement(model, held) > max(before, 0.8), form.__name__
        assert not any(p.requires_grad for p in model.parameters())
