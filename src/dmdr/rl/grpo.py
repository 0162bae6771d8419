"""GRPO (group relative policy optimisation) for the few-step generator. The released DMDR code has none; this is
its design, after Flow-GRPO and its coefficients-preserving sampler (Flow-CPS).

A policy needs densities, and the generator's ODE is deterministic. So each step between its levels t > t' keeps
the ODE's clean prediction x0 = G(x_t) and its implied noise eps_hat = (x_t - (1 - t) x0) / t, and replaces a share
eta of that noise with fresh noise z ~ N(0, I):
    x_t' = (1 - t') x0 + t' (sqrt(1 - eta^2) eps_hat + eta z),
so the noise keeps unit variance (the coefficients of the flow point are preserved) and the step is Gaussian:
    pi(x_t' | x_t, c) = N(mu, sigma^2 I),  mu = (1 - t') x0 + t' sqrt(1 - eta^2) eps_hat,  sigma = eta t'.
eta 0 is the ODE; eta 1 is DMD2's multi-step sampler (fresh noise at each level). The last step returns x0, whose
decoded image the reward scores. A 4-step generator thus has 3 stochastic steps.

Each prompt's G samples (`samples_per_prompt`, consecutive in the batch) are a group, and each sample's advantage
is its reward standardised within its group, A_i = (r_i - mean_g r) / (std_g r + 1e-4): no value network. The
loss is PPO's clipped surrogate, averaged over the samples and the stochastic steps k,
    L = -E_i,k [ min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) ] + kl E_i,k [ KL(pi_theta || pi_ref) ],
    rho = pi_theta(x_k+1 | x_k, c) / pi_old(x_k+1 | x_k, c),
with the per-element mean of the log-density (Flow-GRPO's), so that step sizes do not grow with the resolution.
The samples are drawn once per generator update by the generator being trained, so rho is 1 in value and the clip
does not act: the gradient is the policy gradient E[A grad log pi]; the clip acts where the old log-densities come
from other weights. The KL of two Gaussians of one sigma is ||mu_theta - mu_ref||^2 / (2 sigma^2), here per
element; the reference is the generator at the stage's start (Policy.reference)."""
from __future__ import annotations

import math

import torch

from .. import flow
from . import summed


def noisy_step(x_t: torch.Tensor, x0: torch.Tensor, t: float, t_next: float, eta: float):
    """The Gaussian step from level t to t' around the generator's prediction x0 = G(x_t):
    mu = (1 - t') x0 + t' sqrt(1 - eta^2) eps_hat, eps_hat = (x_t - (1 - t) x0) / t; sigma = eta t'."""
    eps_hat = (x_t - (1 - t) * x0) / t
    return (1 - t_next) * x0 + t_next * math.sqrt(1 - eta ** 2) * eps_hat, eta * t_next


def log_density(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, averaged over its elements:
    mean_j [ -(x_j - mean_j)^2 / (2 std^2) ] - log std - log(2 pi) / 2."""
    return (-(x.float() - mean.float()) ** 2 / (2 * std ** 2)).flatten(1).mean(1) - math.log(std) \
        - 0.5 * math.log(2 * math.pi)


def group_advantages(reward: torch.Tensor, group: int) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-4) over each run of `group` consecutive samples (one prompt's)."""
    r = reward.detach().float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's objective per sample, min(rho A, clip(rho, 1 - eps, 1 + eps) A): no gain from moving rho past the
    clip in the advantage's direction."""
    return torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)


class GRPO:
    """L = -E[min(rho A, clip(rho) A)] + kl KL(pi_theta || pi_ref) over the noise-injected few-step ODE's steps."""

    def __init__(self, params):
        self.eta, self.clip, self.kl = params.grpo.noise, params.grpo.clip, params.grpo.kl
        self.needs_reference = self.kl > 0

    def steps(self, policy):
        """The stochastic steps: (k, t_k, t_k+1) for all but the last of the generator's levels."""
        times = [float(t) for t in policy.times]
        return [(k, times[k], times[k + 1]) for k in range(len(times) - 2)]

    def sample(self, policy, texts, terms) -> dict:
        """One trajectory per sample (the generator's noise-injected ODE), its step log-densities, its reward and
        group advantage."""
        cond = policy.encode(texts)
        x, states, log_probs = policy.noise(), [], []
        for k, t, t_next in self.steps(policy):
            mean, std = noisy_step(x, flow.generator_step(policy.generator, x, t, cond), t, t_next, self.eta)
            states.append(x)
            x = mean + std * policy.randn()
            log_probs.append(log_density(x, mean, std))
        states.append(x)
        x0 = flow.generator_step(policy.generator, x, float(policy.times[-2]), cond)
        reward = summed(terms(x0, texts)).detach().float()
        return {"states": torch.stack(states, 1), "log_prob": torch.stack(log_probs, 1), "reward": reward,
                "advantage": group_advantages(reward, policy.group), "texts": texts}

    def loss_on(self, policy, samples, terms):
        cond, states, advantage = policy.encode(samples["texts"]), samples["states"], samples["advantage"]
        steps, loss = self.steps(policy), 0
        for k, t, t_next in steps:
            mean, std = noisy_step(states[:, k], flow.generator_step(policy.generator, states[:, k], t, cond), t,
                                   t_next, self.eta)
            ratio = torch.exp(log_density(states[:, k + 1], mean, std) - samples["log_prob"][:, k])
            loss = loss - clipped_surrogate(ratio, advantage, self.clip).mean()
            if self.kl:
                with torch.no_grad():
                    ref_mean, _ = noisy_step(states[:, k], flow.generator_step(policy.reference, states[:, k], t, cond),
                                             t, t_next, self.eta)
                loss = loss + self.kl * ((mean.float() - ref_mean.float()) ** 2).mean() / (2 * std ** 2)
        return loss / len(steps), samples["reward"].mean()


OBJECTIVE = GRPO
