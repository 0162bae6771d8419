"""RL objectives: the L_RL of Eq. 3, L = L_DMD + lambda L_RL, as plug-ins. Each is a module of this package, named as
`rl.loss` in params.yaml names it, whose OBJECTIVE class is built from the run's RLParams: adding an algorithm is
adding a file.

An objective is given the generator's clean output x0 at its rollout point (the DMD turn's one call with gradient,
so both terms of Eq. 3 share it), the prompts of that part of the batch, and the reward as a function
`terms(x0, texts) -> [(w_k, r_k)]`: the decoded images' scores under each weighted reward, with gradient through
the decoder. It returns its loss and the summed reward it saw (logged as reward_x0)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    def loss(self, x0: torch.Tensor, texts: list[str],
             terms: Callable[..., list[tuple[float, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]: ...


def names() -> list[str]:
    """The objectives: this package's modules (found without importing them, so params validate without torch)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def make(params) -> Objective:
    """The objective `params.loss` names, with its own parameters read from `params` (RLParams)."""
    if params.loss not in names():
        raise ValueError(f"unknown RL objective {params.loss!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{params.loss}").OBJECTIVE(params)


def summed(terms) -> torch.Tensor:
    """r = sum_k w_k r_k, per sample."""
    return sum(w * r for w, r in terms)
