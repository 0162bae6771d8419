"""DPO for the few-step generator: Diffusion-DPO on pairs of its own samples. The released DMDR code has none; this
is its design.

Diffusion-DPO replaces DPO's log-likelihood ratios by the denoising-loss bound: for a preferred sample x_w and a
rejected x_l of one prompt c, noised at one level t with one noise eps (shared by the pair),
    L = -log sigmoid( -beta/2 [ (e_theta(x_w) - e_ref(x_w)) - (e_theta(x_l) - e_ref(x_l)) ] ),
    e(x) = || v(x_t, t, c) - (eps - x) ||^2  (per element: the flow-matching loss, the velocity form of its eps loss),
with the reference at the stage's start (Policy.reference, the stage-1 generator in stage 2). The loss falls as the
model's denoising error on the winner drops below the reference's, and on the loser rises above it: the model's
implied likelihood moves from losers to winners, held near the reference by beta.

The pairs come online, from the generator itself: each prompt's G samples (`samples_per_prompt`, consecutive in the
batch), from fresh noise through its few-step ODE, are ranked by the reward; the best is paired with the worst, the
second best with the second worst, and so on. The level t is one of the generator's own input levels (where it is
ever called), drawn per pair."""
from __future__ import annotations

import torch

from .. import flow
from . import summed


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """-log sigmoid(-beta/2 [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]), averaged over the pairs. With the
    model equal to the reference it is log 2, whatever the errors."""
    return -torch.nn.functional.logsigmoid(-0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))).mean()


def ranked_pairs(reward: torch.Tensor, group: int) -> torch.Tensor:
    """Indices that put each group's samples in pairs (winner, loser): the i-th best with the i-th worst, each pair
    consecutive, winner first."""
    order = torch.argsort(reward.detach().float().view(-1, group), dim=1, descending=True)
    pairs = torch.stack([order[:, : group // 2], order.flip(1)[:, : group // 2]], dim=2)  # (groups, G/2, 2)
    return (pairs + group * torch.arange(len(order), device=order.device).view(-1, 1, 1)).reshape(-1)


def denoising_error(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """e = mean || v(x_t, t, c) - (eps - x0) ||^2 per sample, x_t = (1 - t) x0 + t eps."""
    v = model(flow.renoise(x0, noise, t), t, *cond)
    return ((v.float() - (noise - x0).float()) ** 2).flatten(1).mean(1)


class DPO:
    """L = Diffusion-DPO over reward-ranked pairs of the generator's own samples of a prompt."""
    needs_reference = True

    def __init__(self, params):
        self.beta = params.dpo.beta

    def sample(self, policy, texts, terms) -> dict:
        cond = policy.encode(texts)
        x0 = policy.sample(policy.noise(), cond)
        reward = summed(terms(x0, texts)).detach().float()
        order = ranked_pairs(reward, policy.group)
        levels = policy.times[:-1].to(x0.device)
        k = (policy.draws.rand() * len(levels)).long().clamp_max(len(levels) - 1)
        noise = policy.randn()
        noise[1::2], k[1::2] = noise[0::2], k[0::2]  # one noise and one level per pair
        return {"x0": x0[order], "texts": [texts[i] for i in order.tolist()], "reward": reward[order],
                "noise": noise, "t": levels[k].to(x0.dtype)}

    def loss_on(self, policy, samples, terms):
        if len(samples["texts"]) % 2:
            raise ValueError(f"dpo: a micro-batch of {len(samples['texts'])} samples splits a pair; make each "
                             f"process's micro-batch even (batch, micro_batches)")
        args = samples["x0"], samples["noise"], samples["t"], policy.encode(samples["texts"])
        model = denoising_error(policy.generator, *args)
        with torch.no_grad():
            ref = denoising_error(policy.reference, *args)
        return dpo_loss(model[0::2], model[1::2], ref[0::2], ref[1::2], self.beta), samples["reward"].mean()


OBJECTIVE = DPO
