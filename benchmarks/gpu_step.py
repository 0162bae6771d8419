"""GPU benchmark of the real-scale loop (issue "Real models and scale", run it on a lent GPU): an SD3-Medium
transformer with random weights (2.03 B parameters; text conditioning as random tensors of SD3's shapes), frozen
weights in bf16, gradient checkpointing, 512 px, local batch 8.

Measured in one run, on one device:
- bare passes: the model calls of one DMD step written out by hand (3 rollout forwards, generator forward +
  backward, real-score CFG forward, fake-score forward, fake-score LoRA forward + backward, both AdamW steps), with a
  full-fine-tune generator and a rank-32 LoRA fake score on the teacher; in the issue's reference setting (bf16
  weights and AdamW states, no fp32 master copy) and in the loop's precision;
- the library's loop (dmdr.distill.train) doing the same step (TTUR 1) in `--precision` (bf16: autocast over fp32
  trained weights; bf16-weights: bf16 weights without autocast, fp32 masters in the optimizer): stage 1 (DynaDG's
  released shared LoRA, DynaRS) and stage 2 (+ hinge rewards through an SD3 VAE decoder and a random ViT-H-14 CLIP),
  each as seconds per step, its ratio to the bare passes, and peak GPU memory; stage 2 also with the released LoRA
  generator;
- sampling latency at 1024 px: the 4-step generator against 28- and 50-step CFG sampling.

    python benchmarks/gpu_step.py [--steps 4] [--batch 8] [--resolution 512] [--precision bf16-weights] [--out FILE]
    python benchmarks/gpu_step.py --compile --rows stage2 --no-sampling   # the loop with compiled blocks
    python benchmarks/gpu_step.py --memory-cap 48 --rows stage2 --no-sampling  # does it fit a 48 GB card?
    python benchmarks/gpu_step.py --tiny     # the same code on a tiny transformer, on CPU: a check that it runs
    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
        benchmarks/gpu_step.py --rows stage2 --no-sampling             # the loop under FSDP2 (or deepspeed.yaml:
                                                                       # ZeRO-2, with deepspeed installed)
"""
import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402

from dmdr import config, flow  # noqa: E402
from dmdr.distill import init_models, train  # noqa: E402
from dmdr.lora import add_lora, set_lora_scale  # noqa: E402
from dmdr.precision import MasterWeights, master_weights  # noqa: E402
from dmdr.models import LatentDecoder, VelocityModel  # noqa: E402

import host_samples  # noqa: E402
from output import write  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY = dict(SD3_MEDIUM, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=16)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, shift_factor=0.0609, scaling_factor=1.5035)
TINY_VAE = dict(SD3_VAE, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=16)
TEXT_TOKENS = 128 + 77  # T5 tokens (the presets' max_sequence_length) + CLIP tokens
REWARD_CHUNK = 2  # stage 2's decoder, samples at a time (unchunked, 512 px, batch 8: 55 GiB on an H100, run 2)
LOOP_ROWS = {"stage1": "stage 1 (DMD + DynaDG released + DynaRS)",
             "stage2": "stage 2 (DMD + hinge CLIP reward through the VAE)",
             "stage2-lora": "stage 2, LoRA-64 generator (released)"}


def random_text(transformer, tokens: int = TEXT_TOKENS):
    """Text conditioning of SD3's shapes for `transformer` as random tensors on its device and in its dtype: texts ->
    (`tokens` token embeddings, pooled embedding)."""
    c, at = transformer.config, dict(device=transformer.device, dtype=transformer.dtype)
    return lambda texts: (torch.randn(len(texts), tokens, c.joint_attention_dim, **at),
                          torch.randn(len(texts), c.pooled_projection_dim, **at))


class ClipReward(torch.nn.Module):
    """A random open_clip ViT-H-14 (HPSv2.1's architecture) on resized decoded images: the reward's real cost."""

    def __init__(self, arch: str):
        super().__init__()
        import open_clip
        self.model = open_clip.create_model(arch, pretrained=None)
        self.size = self.model.visual.preprocess_cfg["size"][0]
        self.register_buffer("text", torch.nn.functional.normalize(torch.randn(self.model.visual.output_dim), dim=0))

    def forward(self, images, texts):
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bicubic")
        x = x.to(next(self.model.parameters()).dtype)  # in the model's dtype (bf16-weights: no autocast)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1) @ self.text.float()


def memory_note() -> str:
    if not torch.cuda.is_available():
        return ""
    stats = torch.cuda.memory_stats()
    return (f" ({stats['reserved_bytes.all.peak'] / 2**30:.1f} GiB reserved, "
            f"{stats['num_alloc_retries']} allocator retries)")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int) -> float:
    """Seconds per call of `fn` over `steps` calls after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def profiled(fn, path: Path, skip: int = 0, active: int = 0) -> None:
    """A torch profile of `fn()` (kernels and host time per op) written to `path`, and its timeline beside it
    (`.json.gz`, a Chrome trace: where the GPU waits, and which ops the host runs meanwhile); with `skip` and
    `active`, of profiler steps skip .. skip + active - 1 only, `fn(step)` calling `step()` at each step's start."""
    from torch.profiler import ProfilerActivity, profile, schedule
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps = schedule(wait=skip, warmup=0, active=active) if active else None
    with profile(activities=activities, schedule=steps) as prof:
        def step():
            sync()
            prof.step()
        fn(step) if active else fn()
        sync()
    prof.export_chrome_trace(str(path.with_suffix(".json.gz")))
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages()
    path.write_text(table.table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n"
                    + table.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70))


def host_readings(fn, path: Path, what: str) -> None:
    """Where the host's time goes (host_samples.Sampler) and where it waits for the GPU (host_samples.SyncSites) in
    `fn(start)`, which calls start() where the reading begins (it ends with fn): one run of `fn` for each, written to
    `path`."""
    lines = []
    for reader, unit in ((host_samples.Sampler(), "samples, one a millisecond"),
                         (host_samples.SyncSites(), "waits for the GPU")):
        try:
            fn(reader.start)
        finally:
            counts = reader.stop()
        lines += host_samples.report(counts, what, unit=unit)
    path.write_text("\n".join(lines) + "\n")


BARE = {"reference": "the issue's setting: bf16 weights and AdamW states, no master copy, no autocast",
        "bf16": "bf16 autocast over fp32 trained weights",
        "bf16-weights": "bf16 weights without autocast, AdamW on fp32 masters", "no": "fp32"}


def bare_passes(teacher, encode, uncond, latent, batch: int, steps: int, dev: str, precision: str = "reference",
                profile: Path | None = None) -> float:
    """Seconds of the model calls of one DMD step, written out by hand: the floor the loop is compared with, its
    weights held as `precision` says (BARE)."""
    held = "bf16-weights" if precision == "reference" else precision
    generator = copy.deepcopy(teacher).requires_grad_(True)
    master_weights(generator, held)
    guide = copy.deepcopy(teacher)
    lora = add_lora(guide, 32)
    master_weights(guide, held)
    for m in (generator, guide):
        m.backbone.enable_gradient_checkpointing()
    masters = [MasterWeights(ps) for ps in (generator.parameters(), lora)] if precision == "bf16-weights" else []
    stepped = [m.masters for m in masters] or [list(generator.parameters()), lora]
    fused = dev == "cuda"
    opts = [torch.optim.AdamW(ps, lr=1e-6, fused=fused) for ps in stepped]
    cond, unc = encode(["a photo"] * batch), flow.expand(uncond, batch)
    t = torch.full((batch,), 0.5, device=dev)
    x = torch.randn(batch, *latent, device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=held == "bf16"):
            with torch.no_grad():
                for _ in range(3):
                    generator(x, t, *cond)
            generator(x, t, *cond).float().square().mean().backward()
            with torch.no_grad():
                set_lora_scale(guide, 0.0)
                guide(torch.cat([x, x]), torch.cat([t, t]), *(torch.cat([c, u]) for c, u in zip(cond, unc)))
                set_lora_scale(guide, 2.0)
                guide(x, t, *cond)
            guide(x, t, *cond).float().square().mean().backward()
        if masters:  # in groups, as the loop (without its clipping)
            for m, opt in zip(masters, opts):
                m.step(opt)
        else:
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
    sec = timed(step, steps)
    if profile:
        profiled(lambda: [step() for _ in range(2)], profile)
        host_readings(lambda start: [start(), step(), step()], profile.with_name("host_bare.txt"),
                      f"two steps of the bare passes in {precision}")
    del generator, guide, opts, masters
    return sec


def loop_step(cfg, teacher, encode, uncond, latent, vae, reward, steps: int, profile: Path | None = None,
              host: Path | None = None) -> float:
    """Seconds per step of dmdr.distill.train under `cfg`: the time between two logged rows `steps` steps apart (rows
    every `steps` steps, the first `steps` after a warm-up run not timed; the host reads the GPU's values once a row,
    as in a run that logs every log_every steps). With `profile`, a torch profile of two steps of one
    more run (its set-up and first step excluded, as in the timing) is written there; with `host`, host_readings of
    two such steps."""
    models = init_models(teacher, encode, uncond, cfg=cfg, decode=LatentDecoder(vae),
                         reward=reward, latent_shape=latent)
    prompts = ["a photo"] * 64
    cfg.steps, cfg.log_every = 2, 10**9
    train(cfg, models, prompts, seed=0)
    if profile:  # curve_fn, called at each step's start, marks the profiler's steps: set-up, step 0, then 1-2
        cfg.steps, cfg.log_every = 3, 1
        profiled(lambda step: train(cfg, models, prompts, seed=2, curve_fn=lambda g, i: step() or {}), profile,
                 skip=2, active=2)
    if host:
        cfg.steps, cfg.log_every = 3, 1
        host_readings(lambda start: train(cfg, models, prompts, seed=3,
                                          curve_fn=lambda g, i: (i == 1 and start()) or {}),
                      host, "two steps of the loop (its set-up and first step excluded)")
    cfg.steps, cfg.log_every = 2 * steps, steps
    rows = train(cfg, models, prompts, seed=1)
    return (rows[2]["seconds"] - rows[1]["seconds"]) / steps


def loop_configs(batch: int, mixed_precision: str, compile: str = "off",
                 reward_chunk: int = REWARD_CHUNK) -> dict[str, config.DistillParams]:
    """The loop's rows (LOOP_ROWS): the sd3-medium preset's stages at local `batch`, TTUR 1, gradient checkpointing,
    fp32 AdamW states (the issue's memory goal is set for them) and a full-fine-tune generator (its reference), and
    stage 2 again with the released LoRA generator; stage 2 decodes `reward_chunk` samples at a time, recomputed in
    backward (0: all at once)."""
    _, stage1, stage2 = config.preset(config.load(Path(__file__).resolve().parents[1] / "params.yaml"), "sd3-medium")
    for cfg in (stage1, stage2):
        cfg.batch, cfg.checkpoint_every, cfg.ttur, cfg.gradient_checkpointing = batch, 0, 1, True
        cfg.optimizer, cfg.generator_lora.enabled = "adamw", False
        cfg.mixed_precision, cfg.compile = mixed_precision, compile
    stage2.reward_chunk = reward_chunk
    lora_stage2 = copy.deepcopy(stage2)
    lora_stage2.generator_lora.enabled = True
    return dict(zip(LOOP_ROWS, (stage1, stage2, lora_stage2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--sample-resolution", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="a tiny transformer and VAE (CPU check)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="torch profiles of the bare passes and stage 1 beside --out, and host "
                         "readings (benchmarks/host_samples.py) of those and of the other loop rows")
    ap.add_argument("--no-sampling", action="store_true", help="skip the 1024 px sampling latencies")
    ap.add_argument("--compile", action="store_true",
                    help="the loop's rows with compiled blocks (compile: inductor; the bare passes stay eager)")
    ap.add_argument("--rows", nargs="+", choices=LOOP_ROWS, default=list(LOOP_ROWS), help="which loop rows to time")
    ap.add_argument("--reward-chunk", type=int, default=REWARD_CHUNK, metavar="N",
                    help="stage 2 decodes N samples at a time, recomputed in backward (0: all at once, no recompute)")
    ap.add_argument("--precision", choices=("bf16", "bf16-weights"), default="bf16",
                    help="the loop's mixed_precision (bf16: autocast over fp32 trained weights; bf16-weights: bf16 "
                         "weights without autocast, fp32 masters in the optimizer)")
    ap.add_argument("--memory-cap", type=float, metavar="GB",
                    help="hold the process to GB (1e9 bytes) of GPU memory, the caching allocator included "
                         "(torch.cuda.set_per_process_memory_fraction): whether the steps fit a card of that size")
    a = ap.parse_args()
    if a.tiny:
        a.resolution, a.sample_resolution = min(a.resolution, 64), min(a.sample_resolution, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lines = []

    def report(line: str):
        print(line, flush=True)
        lines.append(line)
        if a.out:
            write(lines, a.out)

    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the released code
        if a.memory_cap:  # the allocator then frees its cached blocks and retries before it runs out
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap * 1e9 / total))
    configs = loop_configs(a.batch, a.precision, "inductor" if a.compile else "off", a.reward_chunk)
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the device: minutes faster than on the host for 2 B parameters
        transformer = SD3Transformer2DModel(**(TINY if a.tiny else SD3_MEDIUM))
        vae = AutoencoderKL(**(TINY_VAE if a.tiny else SD3_VAE)).requires_grad_(False)
    reward = ClipReward("ViT-B-32" if a.tiny else "ViT-H-14").to(dev).requires_grad_(False)
    if dev == "cuda":  # the frozen parts in bf16, as dmdr.real holds them
        transformer, vae, reward = transformer.to(torch.bfloat16), vae.to(torch.bfloat16), reward.to(torch.bfloat16)
    teacher = VelocityModel(transformer).requires_grad_(False)
    c = transformer.config
    encode = random_text(transformer)
    uncond = encode([""])
    latent = (c.in_channels, a.resolution // 8, a.resolution // 8)
    report(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}; "
           f"transformer {sum(x.numel() for x in transformer.parameters()) / 1e9:.2f} B parameters; "
           f"{a.resolution} px, local batch {a.batch}; the loop in mixed_precision {a.precision} with fp32 AdamW "
           f"states, frozen weights in bf16, gradient checkpointing; {a.steps} timed steps each (TTUR 1: one "
           f"fake-score and one generator update)"
           + (f"; under a memory cap of {a.memory_cap:g} GB" if a.memory_cap and dev == "cuda" else ""))

    def reset():
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    bare = {}  # the reference setting, and the loop's precision
    for kind in dict.fromkeys(("reference", a.precision)):
        reset()
        bare[kind] = bare_passes(teacher, encode, uncond, latent, a.batch, a.steps, dev, kind,
                                 a.out.parent / "profile_bare.txt" if a.profile and a.out and kind == a.precision
                                 else None)
        report(f"bare passes of one DMD step ({BARE[kind]}; full-fine-tune generator, LoRA-32 fake score): "
               f"{bare[kind]:.3f} s, peak {peak_gib():.1f} GiB{memory_note()}")
    for row, cfg in configs.items():
        if row not in a.rows:
            continue
        launched = [k for k in ("FSDP", "DeepSpeed") if os.environ.get(f"ACCELERATE_USE_{k.upper()}") == "true"]
        name = LOOP_ROWS[row] + (", compiled blocks" if a.compile else "") + (
            f", reward_chunk {a.reward_chunk}" if a.reward_chunk != REWARD_CHUNK and row != "stage1" else "") + "".join(
            f", under accelerate's {k} config" for k in launched)
        reset()
        profile = a.out.parent / "profile_stage1.txt" if a.profile and a.out and row == "stage1" else None
        host = a.out.parent / f"host_{row}.txt" if a.profile and a.out else None
        sec = loop_step(cfg, teacher, encode, uncond, latent, vae, reward, a.steps, profile, host)
        report(f"{name}: {sec:.3f} s per step = {sec / bare['reference']:.2f}x the bare passes of the reference "
               f"setting ({sec / bare[a.precision]:.2f}x those in {a.precision}), peak {peak_gib():.1f} GiB"
               f"{memory_note()}")

    if a.no_sampling:
        return
    reset()
    model = teacher.eval()
    n = 1 if a.tiny else 4
    noise = torch.randn(n, c.in_channels, a.sample_resolution // 8, a.sample_resolution // 8, device=dev)
    cond = encode(["a photo"] * n)
    times = {}
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        for label, run in [("4-step generator", lambda: flow.sample_generator(model, noise, cond,
                                                                               flow.generator_times(4, 3.0))),
                           ("28-step CFG", lambda: flow.sample_teacher(model, noise, cond, uncond, 28, 7.0, 3.0)),
                           ("50-step CFG", lambda: flow.sample_teacher(model, noise, cond, uncond, 50, 7.0, 3.0))]:
            times[label] = timed(run, 1) / n
    report(f"sampling at {a.sample_resolution} px, batch {n}, per image: "
           + ", ".join(f"{k} {v:.3f} s" for k, v in times.items())
           + f"; 50-step CFG / 4-step = {times['50-step CFG'] / times['4-step generator']:.1f}x (NFE bound 25x)")


if __name__ == "__main__":
    main()
