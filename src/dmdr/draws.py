"""Every random draw of a training run, from two generators seeded once: torch's (noise, uniform levels, rollout
points) and numpy's (prompts, Beta levels). Each draw is made for the whole global batch on the host, the same on
every process, which keeps its own slice: N processes draw what one process draws."""
from __future__ import annotations

import numpy as np
import torch


class Draws:
    def __init__(self, seed: int, batch: int, mine: slice, device: torch.device):
        self.rng = torch.Generator().manual_seed(seed)
        self.prng = np.random.default_rng(seed)
        self.batch, self.mine, self.device = batch, mine, device

    def prompts(self, prompts: list[str], per_prompt: int = 1) -> list[str]:
        """This process's part of a batch of prompts drawn with replacement, each drawn prompt `per_prompt` times in
        a row (a group of samples of one prompt, which GRPO's advantages and DPO's pairs compare)."""
        drawn = self.prng.integers(len(prompts), size=self.batch // per_prompt)
        return [prompts[i] for i in drawn for _ in range(per_prompt)][self.mine]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """One standard normal tensor of `shape` per sample."""
        return self._on_device(torch.randn((self.batch, *shape), generator=self.rng)[self.mine].contiguous())

    def rand(self) -> torch.Tensor:
        """One uniform number in [0, 1) per sample."""
        return self._on_device(torch.rand(self.batch, generator=self.rng)[self.mine].contiguous())

    def beta(self, a: float, b: float) -> torch.Tensor:
        """One Beta(a, b) number per sample."""
        return self._on_device(torch.from_numpy(self.prng.beta(a, b, size=self.batch)[self.mine]).float())

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A pinned copy to the GPU does not stall the host."""
        return x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
