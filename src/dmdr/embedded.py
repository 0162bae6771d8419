"""The embedded world's teacher as the method and its stage runner see every teacher (dmdr.teacher.Teacher): the
world's flow teacher on the VAE's latents, the world's CLIP as its text encoder."""
from __future__ import annotations

from pathlib import Path

import torch

from . import flow, sampler
from .lora import backbone_of, plain
from .models import LatentDecoder, VelocityModel, atomic_dir
from .standins import World


class WorldTeacher:
    max_t = 1.0

    def __init__(self, world: World):
        self.world = world
        world.vae.requires_grad_(False)  # rewards differentiate through the decoder into the generator, not into it
        self.model, self.latent_shape, self.encode = world.teacher, world.latent_shape, world.encode

    @property
    def uncond(self):
        return self.encode([""])

    @property
    def decode(self) -> LatentDecoder:
        return LatentDecoder(self.world.vae)

    def generator_times(self, steps: int, shift: float = 1.0) -> torch.Tensor:
        return flow.generator_times(steps, shift)

    def wrap(self, backbone) -> VelocityModel:
        return VelocityModel(backbone)

    def export(self, generator, fake, directory: Path, cfg, dynadg_lora=None, recipe: str = "",
               record: dict | None = None) -> Path:
        """The generator (and fake score, in `fake/`) as diffusers model directories, with its sampler's settings
        (dmdr.sampler) and the `record` of how it was trained. (The released DynaDG form's shared LoRA is in its
        fused fake score.)"""
        def write(d: Path):
            backbone_of(plain(generator)).save_pretrained(d, safe_serialization=True)
            if fake is not None:
                backbone_of(fake).save_pretrained(d / "fake", safe_serialization=True)
            sampler.write(d, sampler.settings(cfg.generator_steps, cfg.shift, self.generator_times(
                cfg.generator_steps, cfg.shift), cfg.generator_cfg, recipe=recipe))
            if record is not None:
                sampler.write_record(d, record)
        return atomic_dir(directory, write)
