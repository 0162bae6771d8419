"""A reward that is a weighted sum of reward models, and its terms: what RT-DM and the RL objectives take
(dmdr.distill, dmdr.rl), whatever the rewards are (the world's analogues, dmdr.rewards; the paper's,
dmdr.real_rewards)."""
from __future__ import annotations

import torch
from torch import nn


class Combined(nn.Module):
    """A weighted sum of rewards, e.g. `clip+hps` (equal weights, as the released code's CLIP + HPS)."""

    def __init__(self, rewards: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.rewards = nn.ModuleDict(rewards)
        self.weights = weights

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return sum(w * r(images, texts) for w, r in weighted_terms(self))


def weighted_terms(reward: nn.Module) -> list[tuple[float, nn.Module]]:
    """(w_k, reward_k) of a reward: a weighted sum's terms, in the order of its spec, or the reward itself, weight 1."""
    if isinstance(reward, Combined):
        return [(w, reward.rewards[k]) for k, w in reward.weights.items()]
    return [(1.0, reward)]
