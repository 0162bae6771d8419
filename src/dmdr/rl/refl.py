"""ReFL (reward feedback learning), as the paper writes it: the reward's gradient through the decoder into the
generator's x0."""
from __future__ import annotations

from . import summed


class ReFL:
    """L_RL = -E[r(x0, c)], r = sum_k w_k r_k."""

    def __init__(self, params=None):
        pass

    def loss(self, x0, texts, terms):
        parts = terms(x0, texts)
        return -summed(parts).mean(), summed(parts).mean().detach()


OBJECTIVE = ReFL
