"""What the method and its stage runner see of a teacher, whatever its family: the embedded world's
(dmdr.standins.World), SD3's and SDXL's (dmdr.families.Teacher). A new family is an adapter with these members."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Teacher(Protocol):
    model: torch.nn.Module  # the real score: a velocity model v(x_t, t, token states, pooled) on the latents
    latent_shape: tuple[int, int, int]
    max_t: float  # the noisiest flow time the scores are defined at (< 1 for a VP schedule such as SDXL's)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """The conditioning of `texts` (token states, pooled), as the teacher's sampler computes it."""

    @property
    def uncond(self) -> tuple[torch.Tensor, ...]:
        """The negative conditioning of the teacher's classifier-free guidance."""

    @property
    def decode(self) -> torch.nn.Module:
        """Latents -> images in [-1, 1], differentiable (rewards see decoded images)."""

    def generator_times(self, steps: int, shift: float = 1.0) -> torch.Tensor:
        """The few-step generator's flow times, from the noisiest to 0."""

    def wrap(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """A saved generator's backbone as a velocity model of this family."""

    def export(self, generator: torch.nn.Module, fake: torch.nn.Module | None, directory: Path, cfg,
               dynadg_lora: dict | None = None, **extra) -> None:
        """The trained generator (and fake score) saved to `directory` in the family's own format, with the
        settings of its few-step sampler."""
