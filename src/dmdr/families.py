"""Real teachers: diffusers pipelines of the SD3 family (SD3-Medium, SD3.5-Large: rectified flow, two CLIP text
encoders and T5, a 16-channel VAE) presented to the training loop exactly as the embedded world's teacher is: a
velocity model v(x_t, t, text states, pooled text) on normalised VAE latents, a text encoder and a decoder. `export`
writes a distilled generator back into a pipeline directory that DiffusionPipeline.from_pretrained loads, with the
few-step sampler's settings beside it.

SDXL (epsilon prediction on a discrete VP schedule, micro-conditioning) is not supported yet: `load_teacher` says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

from . import flow
from .distill import backbone_of, plain
from .models import VelocityModel, atomic_dir, decode_latents

FAMILIES = {"StableDiffusion3Pipeline": "sd3"}
SAMPLER_FILE = "dmdr_sampler.json"


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

    @torch.no_grad()
    def encode(self, texts: list[str]) -> flow.Cond:
        """(token states, pooled) of the pipeline's own text encoders, as its sampler computes them."""
        states, _, pooled, _ = self.pipeline.encode_prompt(
            texts, texts, texts, device=self.model_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return states, pooled

    @property
    def uncond(self) -> flow.Cond:
        return self.encode([""])  # SD3's negative prompt is the encoded empty string

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1], differentiable (rewards see decoded images)."""
        return decode_latents(self.vae, latents.to(self.vae.dtype))


def family_of(pipeline: DiffusionPipeline, source) -> str:
    name = type(pipeline).__name__
    if name not in FAMILIES:
        raise ValueError(f"{source}: a {name}; supported teachers: {', '.join(FAMILIES)} (SDXL is not supported yet)")
    return FAMILIES[name]


def load_teacher(source: str | Path, resolution: int, max_sequence_length: int = 256,
                 dtype: torch.dtype = torch.float32) -> Teacher:
    """A teacher from a diffusers pipeline directory or hub id (safetensors only, no remote code), sampling
    `resolution` x `resolution` images."""
    if Path(source).exists() and not (Path(source) / "model_index.json").exists():
        raise FileNotFoundError(f"{source}: not a diffusers pipeline directory (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True)
    family = family_of(pipe, source)
    pipe.set_progress_bar_config(disable=True)
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {pipe.vae_scale_factor}")
    size = resolution // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    pipe.vae.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    return Teacher(family, VelocityModel(pipe.transformer), pipe, (channels, size, size), max_sequence_length)


def sampler_settings(steps: int, shift: float) -> dict:
    """The few-step generator's sampler in the pipeline's terms: FlowMatchEulerDiscreteScheduler with `shift` over
    the unshifted noise levels linspace(1, 0.001, steps + 1)[:steps] (flow.generator_times), no guidance."""
    sigmas = torch.linspace(1.0, 0.001, steps + 1)[:steps]
    return {"num_inference_steps": steps, "sigmas": [float(s) for s in sigmas], "guidance_scale": 1.0,
            "shift": shift}


DYNADG_LORA_FILE = "dynadg_lora.safetensors"


def export(generator: torch.nn.Module, teacher: Teacher, out: Path, steps: int, shift: float = 1.0,
           fake: torch.nn.Module | None = None, dynadg_lora: dict | None = None) -> Path:
    """Save a diffusers pipeline directory: the teacher's pipeline with the distilled generator's weights and a
    scheduler with the generator's shift, plus SAMPLER_FILE (steps, sigmas, guidance) for the few-step call:
    `pipe(prompt, sigmas=s["sigmas"], guidance_scale=s["guidance_scale"])`. A `fake` score is saved in `fake/`
    (ignored by diffusers) so that a next stage continues it, and DynaDG's shared LoRA (`dynadg_lora`, released
    form) in DYNADG_LORA_FILE. A LoRA generator is merged into its transformer."""
    settings = sampler_settings(steps, shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.pipeline.scheduler.config, shift=shift,
                                                            use_dynamic_shifting=False)
    pipe = type(teacher.pipeline)(**(teacher.pipeline.components | {"transformer": backbone_of(plain(generator)),
                                                                    "scheduler": scheduler}))

    def write(d: Path):
        pipe.save_pretrained(d, safe_serialization=True)
        (d / SAMPLER_FILE).write_text(json.dumps(settings, indent=1))
        if fake is not None:
            backbone_of(fake).save_pretrained(d / "fake", safe_serialization=True)
        if dynadg_lora is not None:
            save_file(dynadg_lora, d / DYNADG_LORA_FILE)
    return atomic_dir(out, write)


def load_exported(path: Path, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, dict]:
    """An exported few-step pipeline and its sampler settings."""
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return pipe, json.loads((Path(path) / SAMPLER_FILE).read_text())
