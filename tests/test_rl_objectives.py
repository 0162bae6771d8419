"""GRPO and DPO (dmdr.rl.grpo, dmdr.rl.dpo): their equations, then a loop-level run each on an analytic reward, which
must move the generator's samples the reward's way (and the other way for the opposite reward)."""
import math

import pytest
import torch
from torch import nn

from dmdr import flow
from dmdr.config import DistillParams, ParamsError, build
from dmdr.distill import train
from dmdr.rl.dpo import dpo_loss, ranked_pairs
from dmdr.rl.grpo import clipped_surrogate, group_advantages, log_density, noisy_step
from test_directions import PROMPTS, mean_sample
from tiny import tiny_models


def test_grpo_step_density_is_the_gaussian_density():
    torch.manual_seed(0)
    x, mean = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    direct = torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(log_density(x, mean, 0.3), direct, atol=1e-5)


def test_grpo_step_without_noise_is_the_generator_ode():
    """eta -> 0: the mean is the ODE's Euler step (flow.sample_generator), and the std vanishes."""
    torch.manual_seed(0)
    model = lambda x, t, *cond: 0.5 * x + 0.1  # a velocity field
    noise, times = torch.randn(2, 4, 3, 3), torch.tensor([1.0, 0.6, 0.2])
    ode = flow.sample_generator(model, noise, (), times, upto=1)
    mean, std = noisy_step(noise, flow.generator_step(model, noise, 1.0, ()), 1.0, 0.6, 1e-6)
    assert torch.allclose(mean, ode, atol=1e-5) and std == pytest.approx(0.6e-6)


def test_grpo_step_keeps_the_flow_points_noise_variance():
    """x0 fixed, eps_hat ~ N(0, I): the noised step's spread around (1 - t') x0 is t', as the flow point's is."""
    torch.manual_seed(0)
    x0, t, t_next = torch.full((20000, 1), 0.3), 0.8, 0.4
    x_t = (1 - t) * x0 + t * torch.randn_like(x0)
    mean, std = noisy_step(x_t, x0, t, t_next, 0.7)
    x_next = mean + std * torch.randn_like(x0)
    assert float((x_next - (1 - t_next) * x0).std()) == pytest.approx(t_next, rel=0.02)


def test_group_advantages_are_standardised_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 30.0])
    a = group_advantages(r, 4).view(2, 4)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(a.std(1, unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(a.argsort(1), r.view(2, 4).argsort(1))
    assert torch.allclose(group_advantages(r + torch.tensor([5.0] * 4 + [0.0] * 4), 4), a.view(-1), atol=1e-5)


@pytest.mark.parametrize("advantage, ratio, moves", [(1.0, 1.1, True), (1.0, 1.5, False), (-1.0, 0.9, True),
                                                     (-1.0, 0.5, False), (-1.0, 1.5, True)])
def test_the_clip_stops_the_gain_past_it(advantage, ratio, moves):
    rho = torch.tensor(ratio, requires_grad=True)
    clipped_surrogate(rho, torch.tensor(advantage), 0.2).backward()
    assert (float(rho.grad) != 0) == moves


def test_dpo_loss_prefers_the_winner_relative_to_the_reference():
    errors = torch.tensor([0.7, 0.2, 1.3])
    assert float(dpo_loss(errors, errors + 0.5, errors, errors + 0.5, 100.0)) == pytest.approx(math.log(2))
    lower = float(dpo_loss(errors - 0.01, errors, errors, errors, 100.0))  # the winner denoised better than by ref
    higher = float(dpo_loss(errors, errors - 0.01, errors, errors, 100.0))  # the loser denoised better
    assert lower < math.log(2) < higher
    # only the difference to the reference counts: the same change of both errors of a sample changes nothing
    shift = torch.tensor([0.3, -0.1, 2.0])
    assert float(dpo_loss(errors - 0.01 + shift, errors, errors + shift, errors, 100.0)) == pytest.approx(lower)


def test_dpo_pairs_each_groups_best_with_its_worst():
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 5.0, 4.0])
    pairs = ranked_pairs(r, 2)
    assert pairs.tolist() == [1, 0, 2, 3, 4, 5]
    pairs = ranked_pairs(torch.tensor([0.1, 0.9, 0.5, 0.3]), 4)
    assert pairs.tolist() == [1, 0, 2, 3]  # best with worst, second with third


@pytest.mark.parametrize("changes, keys", [
    ({"rl": {"weight": 1.0, "loss": "grpo"}}, "rl.loss, samples_per_prompt"),
    ({"rl": {"weight": 1.0, "loss": "dpo"}, "samples_per_prompt": 3, "batch": 6}, "rl.loss, samples_per_prompt"),
    ({"rl": {"weight": 1.0, "loss": "grpo"}, "samples_per_prompt": 2, "generator_steps": 1},
     "rl.loss, generator_steps"),
    ({"samples_per_prompt": 3, "batch": 8}, "samples_per_prompt, batch")])
def test_groups_that_cannot_work_are_refused(changes, keys):
    with pytest.raises(ParamsError, match=keys):
        build(DistillParams, changes)


class Mean(nn.Module):
    """A reward: the image's mean value times `sign`."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, images, texts):
        return self.sign * images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_and_dpo_move_samples_up_the_reward(clip, objective, sign):
    """Groups of 4 samples of a prompt; the decoder a linear map (so the reward is the latents' mean): 10 updates of
    either objective alone move the generator's samples the reward's way, either way."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 10, "generator_lr": 3e-3, "dmd_weight": 0.0, "batch": 16,
                                                "samples_per_prompt": 4, "generator_steps": 4, "micro_batches": 2,
                                                "rl": {"weight": 1.0, "loss": objective}}, reward=Mean(sign))
    models.decode = lambda z: 0.1 * z
    before = mean_sample(models, cfg)[0]
    rows = train(cfg, models, PROMPTS, seed=0)
    assert sign * (mean_sample(models, cfg)[0] - before) > 0.05
    assert rows[-1]["reward_x0"] > rows[1]["reward_x0"]  # the reward of its own samples rose


def tiny_policy(generator, batch: int = 8, group: int = 4, reference=None):
    from dmdr.distill import Policy
    from dmdr.draws import Draws
    return Policy(generator, flow.generator_times(4), lambda texts: (), Draws(0, batch, slice(0, batch),
                  torch.device("cpu")), (2, 3, 3), group, reference)


class Offset(nn.Module):
    """A velocity model v = x - shift (its x0 prediction moves with `shift`)."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, x, t, *cond):
        return x - self.shift


def test_a_prompts_samples_are_a_group_of_the_batch():
    from dmdr.draws import Draws
    texts = Draws(0, 8, slice(0, 8), torch.device("cpu")).prompts([f"p{i}" for i in range(50)], 4)
    assert len(set(texts[:4])) == len(set(texts[4:])) == 1 and texts[0] != texts[4]


def test_dpo_pairs_share_noise_and_level_and_rank_by_reward():
    from dmdr.rl.dpo import DPO
    from dmdr.config import RLParams
    policy = tiny_policy(Offset())
    terms = lambda x0, texts: [(1.0, x0.mean(dim=(1, 2, 3)))]
    s = DPO(RLParams(loss="dpo")).sample(policy, ["a"] * 4 + ["b"] * 4, terms)
    assert torch.equal(s["noise"][0::2], s["noise"][1::2]) and torch.equal(s["t"][0::2], s["t"][1::2])
    assert (s["reward"][0::2] >= s["reward"][1::2]).all() and len(set(s["t"].tolist())) > 1
    assert torch.allclose(s["reward"], s["x0"].mean(dim=(1, 2, 3)))  # each sample keeps its own reward


def test_grpo_kl_holds_the_policy_to_its_reference():
    """At the reference the KL term is 0; a generator moved away pays kl * KL > 0 on top of the surrogate."""
    from dmdr.config import GrpoParams, RLParams
    from dmdr.rl.grpo import GRPO
    terms = lambda x0, texts: [(1.0, x0.mean(dim=(1, 2, 3)))]
    texts = ["a"] * 4 + ["b"] * 4
    losses = {}
    for kl in (0.0, 1.0):
        for shift in (0.0, 0.3):
            policy = tiny_policy(Offset(shift), reference=Offset())
            objective = GRPO(RLParams(loss="grpo", grpo=GrpoParams(kl=kl)))
            with torch.no_grad():
                losses[kl, shift] = float(objective.loss_on(policy, objective.sample(policy, texts, terms), terms)[0])
    assert losses[1.0, 0.0] == pytest.approx(losses[0.0, 0.0], abs=1e-6)
    assert losses[1.0, 0.3] > losses[0.0, 0.3] + 1e-3
