"""The released code's reward loss: ReFL under a hinge, each reward on its own."""
from __future__ import annotations

import torch

from . import summed


class Hinge:
    """L_RL = sum_k w_k E[relu(margin - r_k)] (released: margin 0.7, weights 0.3): a reward stops pulling once it
    passes the margin."""

    def __init__(self, params=None, margin: float = 0.7):
        self.margin = params.margin if params is not None else margin

    def loss(self, x0, texts, terms):
        parts = terms(x0, texts)
        return sum(w * torch.relu(self.margin - r).mean() for w, r in parts), summed(parts).mean().detach()


OBJECTIVE = Hinge
