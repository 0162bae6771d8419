"""The embedded world's teachers as the method and its stage runner see every teacher (dmdr.teacher.Teacher): the
world's flow teacher, or its epsilon teacher (SDXL's kind, stage teacher_eps) seen as a flow model, on the VAE's
latents, the world's CLIP as their text encoder.

`WorldFamily` is what a model of either kind needs beyond its weights: its flow levels, the wrapper of a saved
backbone, and what its export records. A distilled generator is of its teacher's family."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler

from . import flow, sampler
from .config import TEACHER, TEACHER_EPS
from .lora import backbone_of, plain
from .models import EpsilonAsFlow, LatentDecoder, VelocityModel, atomic_dir
from .standins import SCHEDULER_DIR, World, load_epsilon_teacher, load_schedule


class WorldFamily:
    """Flow models (`schedule` None) or epsilon models on the VP `schedule`."""

    def __init__(self, schedule: DDPMScheduler | None = None):
        self.schedule = schedule

    @classmethod
    def of(cls, directory: Path) -> "WorldFamily":
        """The family of a saved generator: epsilon where its sampler says so (its schedule beside it), else flow."""
        return cls(load_schedule(directory)) if sampler.read(directory).get("prediction") == "epsilon" else cls()

    @property
    def prediction(self) -> str:
        return "velocity" if self.schedule is None else "epsilon"

    @property
    def max_t(self) -> float:
        """The noisiest flow time the models are defined at (below 1 on a VP schedule)."""
        return 1.0 if self.schedule is None else float(flow.vp_flow_times(self.schedule.alphas_cumprod, [-1])[0])

    def generator_times(self, steps: int, shift: float = 1.0) -> torch.Tensor:
        """The few-step generator's flow times, then 0: flow.generator_times; on a VP schedule DMD2's timesteps
        (flow.vp_generator_timesteps), unshifted, as for SDXL."""
        if self.schedule is None:
            return flow.generator_times(steps, shift)
        if shift != 1.0:
            raise ValueError(f"shift {shift}: an epsilon teacher's generator uses its own timesteps (shift 1)")
        levels = flow.vp_flow_times(self.schedule.alphas_cumprod, flow.vp_generator_timesteps(steps))
        return torch.cat([levels, torch.zeros(1)])

    def sampler_sigmas(self, steps: int) -> list[float] | None:
        """The multi-step sampler's flow times (flow.sample_teacher's `sigmas`): None for the flow scheduler's own;
        on a VP schedule its own Euler sampler's."""
        return None if self.schedule is None else flow.vp_sampler_times(self.schedule, steps)

    def wrap(self, backbone) -> torch.nn.Module:
        """A saved backbone of this family as a velocity model."""
        if self.schedule is None:
            return VelocityModel(backbone)
        return EpsilonAsFlow(backbone, self.schedule.alphas_cumprod)


class WorldTeacher(WorldFamily):
    def __init__(self, world: World, model: torch.nn.Module | None = None, schedule: DDPMScheduler | None = None):
        super().__init__(schedule)
        self.world = world
        world.vae.requires_grad_(False)  # rewards differentiate through the decoder into the generator, not into it
        self.model = world.teacher if model is None else model
        self.latent_shape, self.encode = world.latent_shape, world.encode

    @classmethod
    def load(cls, world: World, root: Path = Path(TEACHER)) -> "WorldTeacher":
        """The flow teacher (TEACHER) or the epsilon teacher (TEACHER_EPS)."""
        if Path(root) == Path(TEACHER):
            return cls(world)
        if Path(root) == Path(TEACHER_EPS):
            return cls(world, *load_epsilon_teacher(Path(root)))
        raise ValueError(f"{root}: not a teacher of the world ({TEACHER} or {TEACHER_EPS})")

    @property
    def uncond(self):
        return self.encode([""])

    @property
    def decode(self) -> LatentDecoder:
        return LatentDecoder(self.world.vae)

    def export(self, generator, fake, directory: Path, cfg, dynadg_lora=None, recipe: str = "",
               record: dict | None = None) -> Path:
        """The generator (and fake score, in `fake/`) as diffusers model directories, with its sampler's settings
        (dmdr.sampler), an epsilon generator's schedule (SCHEDULER_DIR) and the `record` of how it was trained.
        (The released DynaDG form's shared LoRA is in its fused fake score.)"""
        def write(d: Path):
            backbone_of(plain(generator)).save_pretrained(d, safe_serialization=True)
            if fake is not None:
                backbone_of(fake).save_pretrained(d / "fake", safe_serialization=True)
            if self.schedule is not None:
                self.schedule.save_pretrained(d / SCHEDULER_DIR)
            sampler.write(d, sampler.settings(cfg.generator_steps, cfg.shift, self.generator_times(
                cfg.generator_steps, cfg.shift), cfg.generator_cfg, self.prediction, recipe=recipe))
            if record is not None:
                sampler.write_record(d, record)
        return atomic_dir(directory, write)
