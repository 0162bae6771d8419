"""RL objectives: the L_RL of Eq. 3, L = L_DMD + lambda L_RL, as plug-ins. Each is a module of this package, named as
`rl.loss` in params.yaml names it, whose OBJECTIVE class is built from the run's RLParams: adding an algorithm is
adding a file.

An objective owns how it samples and its loss, in one of two forms:
- `Objective` (ReFL, the released hinge) takes the generator's clean output x0 at its rollout point: the DMD turn's
  one call with gradient, so both terms of Eq. 3 share it.
- `Sampling` (for a group of samples per prompt, or pairs ranked by reward) draws its own: once per generator update,
  without gradient, `sample` makes what its loss needs through the `policy` (dmdr.distill.Policy: the generator, its
  few-step times, the text encoder and the run's seeded noise), as per-sample entries of this process's part of the
  batch; `loss_on` is then given one micro-batch's slice of them, with gradient through the generator.
Both are given the reward as a function `terms(x0, texts) -> [(w_k, r_k)]`: the decoded images' scores under each
weighted reward, with gradient through the decoder. The loss returns its value and the summed reward it saw (logged
as reward_x0)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

Terms = Callable[..., "list[tuple[float, torch.Tensor]]"]


class Objective(Protocol):
    def loss(self, x0: torch.Tensor, texts: list[str], terms: Terms) -> tuple[torch.Tensor, torch.Tensor]: ...


class Sampling(Protocol):
    def sample(self, policy, texts: list[str], terms: Terms) -> dict: ...

    def loss_on(self, policy, samples: dict, terms: Terms) -> tuple[torch.Tensor, torch.Tensor]: ...


def samples_itself(objective) -> bool:
    """Whether an objective draws its own samples (Sampling) rather than taking the DMD turn's x0."""
    return hasattr(objective, "sample")


def names() -> list[str]:
    """The objectives: this package's modules (found without importing them, so params validate without torch)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def make(params) -> Objective | Sampling:
    """The objective `params.loss` names, with its own parameters read from `params` (RLParams)."""
    if params.loss not in names():
        raise ValueError(f"unknown RL objective {params.loss!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{params.loss}").OBJECTIVE(params)


def summed(terms) -> torch.Tensor:
    """r = sum_k w_k r_k, per sample."""
    return sum(w * r for w, r in terms)
