"""Real teachers: diffusers pipelines presented to the training loop exactly as the embedded world's teacher is: a
velocity model v(x_t, t, text states, pooled text) on normalised VAE latents, a text encoder and a decoder.

- SD3 family (SD3-Medium, SD3.5-Large): rectified flow, two CLIP text encoders and T5, a 16-channel VAE.
- SDXL: epsilon prediction on a discrete VP schedule (x = a x0 + s eps), two CLIP text encoders, micro-conditioning
  (size and crop time ids). `EpsilonAsFlow` views its UNet as a velocity model: the VP point is the flow point
  scaled by a + s, at flow time t = s / (a + s), so the same loop, losses and ODE apply. The schedule ends short of
  pure noise (t <= 0.936 for SDXL's betas), so its generator starts there, from noise scaled as the pipeline's is.

`export` writes a distilled generator back into a pipeline directory that DiffusionPipeline.from_pretrained loads,
with the few-step sampler's settings beside it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import flow, sampler
from .lora import backbone_of, plain
from .files import sha256
from .models import EpsilonAsFlow, LatentDecoder, VelocityModel, atomic_dir
from .sampler import SAMPLER_FILE

FAMILIES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl"}


@dataclass
class Teacher:
    """A real text-to-image teacher as the training loop sees it."""
    family: str
    model: torch.nn.Module  # velocity model v(x_t, t, states, pooled)
    pipeline: DiffusionPipeline
    latent_shape: tuple[int, int, int]
    max_sequence_length: int = 256

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def component(self) -> str:
        """The pipeline component the generator replaces."""
        return "unet" if self.family == "sdxl" else "transformer"

    @property
    def max_t(self) -> float:
        return self.model.max_t if self.family == "sdxl" else 1.0

    def wrap(self, backbone) -> torch.nn.Module:
        """A backbone of this family (a trained generator's) as the loop's velocity model."""
        if self.family == "sdxl":
            return EpsilonAsFlow(backbone, self.pipeline.scheduler.alphas_cumprod, self.model.time_ids)
        return VelocityModel(backbone)

    @property
    def resolution(self) -> int:
        return self.latent_shape[-1] * self.pipeline.vae_scale_factor

    def generator_times(self, steps: int, shift: float = 1.0) -> torch.Tensor:
        """The few-step generator's flow times. SD3: flow.generator_times. SDXL: the timesteps of the exported
        scheduler (`scheduler_for`: 399 for one step, as the released model and DMD2; 999, 749, 499, 249 for four,
        as DMD2's), as flow times, then 0; no shift."""
        if self.family != "sdxl":
            return flow.generator_times(steps, shift)
        if shift != 1.0:
            raise ValueError(f"shift {shift}: SDXL's generator uses the teacher's own timesteps (shift 1)")
        scheduler = scheduler_for(self, shift, steps)
        scheduler.set_timesteps(steps)
        k = (self.model.log_sigmas.exp()[scheduler.timesteps.round().long()]).double()
        return torch.cat([(k / (1 + k)).float(), torch.zeros(1)])  # ending at the clean sample

    @torch.no_grad()
    def encode(self, texts: list[str]) -> flow.Cond:
        """(token states, pooled) of the pipeline's own text encoders, as its sampler computes them."""
        if self.family == "sdxl":
            states, _, pooled, _ = self.pipeline.encode_prompt(texts, device=self.model_device,
                                                               do_classifier_free_guidance=False)
            return states, pooled
        states, _, pooled, _ = self.pipeline.encode_prompt(
            texts, texts, texts, device=self.model_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return states, pooled

    @property
    @torch.no_grad()
    def uncond(self) -> flow.Cond:
        """The negative conditioning of the pipeline's CFG: SD3's encoded empty string; SDXL's zeros
        (force_zeros_for_empty_prompt) or its encoded empty string."""
        if self.family == "sdxl":
            _, states, _, pooled = self.pipeline.encode_prompt([""], device=self.model_device,
                                                               do_classifier_free_guidance=True)
            return states, pooled
        return self.encode([""])

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def call_kwargs(self) -> dict:
        """Keyword arguments every pipeline call of this family takes."""
        return {"max_sequence_length": self.max_sequence_length} if self.family == "sd3" else {}

    @property
    def decode(self) -> LatentDecoder:
        """Normalised latents -> images in [-1, 1], differentiable (rewards see decoded images)."""
        return LatentDecoder(self.vae)

    def export(self, generator, fake, directory: Path, cfg, dynadg_lora: dict | None = None,
               record: dict | None = None) -> Path:
        """The generator as a pipeline directory of this family (`export`)."""
        return export(generator, self, directory, cfg.generator_steps, cfg.shift, fake, dynadg_lora, record)


def family_of(pipeline: DiffusionPipeline, source) -> str:
    name = type(pipeline).__name__
    if name not in FAMILIES:
        raise ValueError(f"{source}: a {name}; supported teachers: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def pipeline_directory(source: str | Path) -> Path:
    """A diffusers pipeline's local directory: `source` itself, or a hub id's files in the hub cache (fetched if
    missing: those from_pretrained loads, safetensors only)."""
    if Path(source).exists():
        if not (Path(source) / "model_index.json").exists():
            raise FileNotFoundError(f"{source}: not a diffusers pipeline directory (no model_index.json)")
        return Path(source)
    return Path(DiffusionPipeline.download(str(source), use_safetensors=True))


def pipeline_sha256(directory: Path) -> str:
    """What a pipeline directory holds, by content: one sha256 over model_index.json and every file in its
    components' folders (relative path and sha256 of each; a hub-cached weight's is its blob's name, others are
    read: seconds per GB)."""
    directory = Path(directory)
    index = json.loads((directory / "model_index.json").read_text())
    components = sorted(k for k, v in index.items() if isinstance(v, list) and (directory / k).is_dir())
    paths = [directory / "model_index.json"] + [f for c in components for f in sorted((directory / c).rglob("*"))
                                                if f.is_file()]
    lines = [f"{f.relative_to(directory).as_posix()} {sha256(f)}" for f in tqdm(paths, desc="teacher sha256",
                                                                               unit="file")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_teacher(source: str | Path, resolution: int, max_sequence_length: int = 256,
                 dtype: torch.dtype = torch.float32) -> Teacher:
    """A teacher from a diffusers pipeline directory or hub id (safetensors only, no remote code), sampling
    `resolution` x `resolution` images."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_directory(source), dtype=dtype, use_safetensors=True)
    family = family_of(pipe, source)
    pipe.set_progress_bar_config(disable=True)
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {pipe.vae_scale_factor}")
    size = resolution // pipe.vae_scale_factor
    pipe.vae.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    if family == "sdxl":
        if pipe.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"{source}: SDXL teachers predicting {pipe.scheduler.config.prediction_type!r} are not "
                             "supported (epsilon only)")
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]])  # size, crop, target
        model = EpsilonAsFlow(pipe.unet, pipe.scheduler.alphas_cumprod, time_ids)
        return Teacher(family, model, pipe, (pipe.unet.config.in_channels, size, size), max_sequence_length)
    channels = pipe.transformer.config.in_channels
    return Teacher(family, VelocityModel(pipe.transformer), pipe, (channels, size, size), max_sequence_length)


DYNADG_LORA_FILE = "dynadg_lora.safetensors"


def sampler_settings(teacher: Teacher, steps: int, shift: float, recipe: str = "") -> dict:
    """The few-step generator's sampler (dmdr.sampler's settings), no guidance; `call`: the keyword arguments of
    `pipe(prompt, **call)` that sample as the generator was trained (size and, for SD3, text length too).
    SDXL: the exported EulerDiscreteScheduler's own schedule for `steps` is the generator's (`scheduler_for`), so
    `num_inference_steps` is enough; its sigmas k = t / (1 - t), then 0: an Euler step in k is the generator's
    step (predict x0, keep its implied noise), and the pipeline's start, noise x sqrt(k0^2 + 1), is the
    generator's. SD3: FlowMatchEulerDiscreteScheduler's own schedule for N steps is not the generator's (it spaces
    the levels between its training sigmas and shifts twice; no setting of its config gives linspace(1, 0.001,
    N + 1)[:N] shifted once), so the call names the unshifted levels as `sigmas` (the scheduler shifts them)."""
    size = {"height": teacher.resolution, "width": teacher.resolution}
    if teacher.family == "sdxl":
        call = {"num_inference_steps": steps, "guidance_scale": 1.0} | size
    else:
        sigmas = [float(s) for s in torch.linspace(1.0, 0.001, steps + 1)[:steps]]
        call = {"sigmas": sigmas, "guidance_scale": 1.0, "max_sequence_length": teacher.max_sequence_length} | size
    return sampler.settings(steps, shift, teacher.generator_times(steps, shift), 1.0,
                            "epsilon" if teacher.family == "sdxl" else "velocity", recipe, call)


def scheduler_for(teacher: Teacher, shift: float, steps: int):
    """The exported pipeline's scheduler. SDXL: EulerDiscreteScheduler with "leading" spacing and the offset that
    puts its `steps` timesteps where the generator was trained (one step: 399; N: 999 down by 1000 // N), and
    VP noise at the start, as the generator's. SD3: FlowMatchEulerDiscreteScheduler with the generator's shift."""
    if teacher.family == "sdxl":
        offset = flow.vp_generator_timesteps(steps)[-1]
        return EulerDiscreteScheduler.from_config(teacher.pipeline.scheduler.config, timestep_spacing="leading",
                                                  steps_offset=offset, final_sigmas_type="zero")
    return FlowMatchEulerDiscreteScheduler.from_config(teacher.pipeline.scheduler.config, shift=shift,
                                                       use_dynamic_shifting=False)


MODEL_CARD = """# A few-step generator distilled with DMDR

Distilled from `{teacher}` by dmdr (Distribution Matching Distillation meets Reinforcement Learning): {steps}
step{s}, no classifier-free guidance, {size} px. Sample it as it was trained:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{path}", dtype=torch.bfloat16)
image = pipe("a photo of a cat", {call}).images[0]
```

The same arguments are `call` in `{sampler}`. {note}
"""


def model_card(teacher: Teacher, source: str, path: Path, settings: dict) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in settings["call"].items())
    note = ("`sigmas` are needed: diffusers' FlowMatchEulerDiscreteScheduler spaces its own levels otherwise."
            if "sigmas" in settings["call"] else "The scheduler's own schedule for this step count is the trained one.")
    steps = settings["steps"]
    return MODEL_CARD.format(teacher=source, steps=steps, s="s" if steps > 1 else "", size=teacher.resolution,
                             path=path, call=call, sampler=SAMPLER_FILE, note=note)


def export(generator: torch.nn.Module, teacher: Teacher, out: Path, steps: int, shift: float = 1.0,
           fake: torch.nn.Module | None = None, dynadg_lora: dict | None = None, record: dict | None = None) -> Path:
    """Save a diffusers pipeline directory: the teacher's pipeline with the distilled generator's weights and its
    few-step scheduler, plus SAMPLER_FILE (dmdr.sampler, with `call`: the keyword arguments of the few-step call
    `pipe(prompt, **call)`) and a model card (README.md) with that call written out. A `fake` score
    is saved in `fake/` (ignored by diffusers) so that a next stage continues it, and DynaDG's shared LoRA
    (`dynadg_lora`, released form) in DYNADG_LORA_FILE, the settings it was trained with (`record`) in
    TRAINING_FILE. A LoRA generator is merged into its backbone."""
    settings = sampler_settings(teacher, steps, shift, recipe=Path(out).name)
    pipe = type(teacher.pipeline)(**(teacher.pipeline.components | {teacher.component: backbone_of(plain(generator)),
                                                                    "scheduler": scheduler_for(teacher, shift, steps)}))
    source = (record or {}).get("settings", {}).get("teacher", "the teacher")

    def write(d: Path):
        pipe.save_pretrained(d, safe_serialization=True)
        sampler.write(d, settings)
        (d / "README.md").write_text(model_card(teacher, source, Path(out), settings))
        if fake is not None:
            backbone_of(fake).save_pretrained(d / "fake", safe_serialization=True)
        if dynadg_lora is not None:
            save_file(dynadg_lora, d / DYNADG_LORA_FILE)
        if record is not None:
            sampler.write_record(d, record)
    return atomic_dir(out, write)


def load_exported(path: Path, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, dict]:
    """An exported few-step pipeline and its sampler settings."""
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return pipe, sampler.read(path)
