"""The loop pushes the way the equations say: a DMD step moves the generator's samples toward the real score's
clean prediction and away from the fake score's (Eq. 1), and an RL step raises the reward (Eq. 3). Swapping the two
scores where the method calls dmd_gradient, or flipping the RL term's sign, fails these."""
import pytest
import torch
from torch import nn

from dmdr import flow
from dmdr.distill import train
from tiny import tiny_models

PROMPTS = ["a photo of a circle", "a photo of two squares", "a red triangle"]


class PredictsX0(nn.Module):
    """A score whose clean-sample prediction is `target` wherever it is asked: v = (x_t - target) / t. Its one
    parameter gets no gradient, so training leaves it as it is."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, *cond):
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t).view(-1, 1, 1, 1)
        return (x - self.target) / t + 0 * self.unused


class Brightness(nn.Module):
    """A reward: the mean pixel value of the image."""

    def forward(self, images, texts):
        return images.mean(dim=(1, 2, 3))


def mean_sample(models, cfg) -> float:
    """The mean of the generator's few-step samples of the prompts, from fixed noise."""
    noise = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x0 = flow.sample_generator(models.generator.eval(), noise, models.encode(PROMPTS),
                                   flow.generator_times(cfg.generator_steps, cfg.shift))
    return float(x0.mean()), x0


@pytest.mark.parametrize("real_level, fake_level", [(-1.0, 1.0), (1.0, -1.0)])
def test_dmd_moves_samples_toward_the_real_score_and_away_from_the_fake(clip, real_level, fake_level):
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-3})
    before, x0 = mean_sample(models, cfg)
    models.real = PredictsX0(torch.full_like(x0[0], real_level))
    models.fake = PredictsX0(torch.full_like(x0[0], fake_level))
    train(cfg, models, PROMPTS, seed=0)
    after, _ = mean_sample(models, cfg)
    assert (after - before) * real_level > 0.05, (before, after)


@pytest.mark.parametrize("objective", ["refl", "hinge"])
def test_rl_raises_the_reward(clip, objective):
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-2, "dmd_weight": 0.0,
                                                "rl": {"weight": 1.0, "loss": objective, "margin": 10.0}},
                                 reward=Brightness())
    reward = lambda: float(Brightness()(models.decode(mean_sample(models, cfg)[1]), PROMPTS).mean())
    before = reward()
    train(cfg, models, PROMPTS, seed=0)
    assert reward() > before + 0.005, (before, reward())


def test_the_training_reward_sees_valid_images(clip):
    """Images beyond the valid range are clamped before the reward: a decoder whose every pixel lies past white
    leaves ReFL on brightness no gradient, so the generator does not move (unclamped, it would brighten)."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 3, "generator_lr": 1e-2, "generator_weight_decay": 0.0,
                                                "dmd_weight": 0.0, "rl": {"weight": 1.0, "loss": "refl"}},
                                 reward=Brightness())
    models.decode = lambda z: z + 10.0
    _, before = mean_sample(models, cfg)
    train(cfg, models, PROMPTS, seed=0)
    assert torch.equal(mean_sample(models, cfg)[1], before)
