"""How trained weights are held: fp32 masters of bf16 weights, FSDP's mixed precision, the optimizers. What any
trainer owns (dmdr.loop), whatever it trains."""
from __future__ import annotations

import torch


def master_weights(model, mixed_precision: str, fsdp: bool = False) -> None:
    """How a model's weights are held in training. bf16 (autocast): trained weights in fp32 (bf16 AdamW steps at
    the released learning rates round away to nothing), frozen ones in bf16 as the released code stores them
    (autocast computes in bf16 anyway). bf16-weights: every weight in bf16 and no autocast, so no per-op casts; the
    optimizer steps fp32 masters of the trained ones (MasterWeights). Under FSDP, bf16-weights holds them as bf16
    does: the fp32 shards are the masters, and FSDP's own mixed precision (fsdp_mixed_precision) gathers them in
    bf16 to compute."""
    every_weight_bf16 = mixed_precision == "bf16-weights" and not fsdp
    for p in model.parameters():
        if every_weight_bf16 or (mixed_precision != "no" and not p.requires_grad):
            p.data = p.data.to(torch.bfloat16)
        elif p.requires_grad:
            p.data = p.data.float()


def fsdp_mixed_precision(mixed_precision: str):
    """FSDP2's mixed precision policy for `mixed_precision`. bf16-weights: each unit's fp32 shards gathered in bf16
    and computed in bf16 without autocast, gradients reduced in fp32 into the fp32 shards, which AdamW steps (the
    masters, with no copy). Inputs are not cast by FSDP: the model wrappers cast their states (models.computed_in),
    not the time, which in bf16 would move the noise level by up to 1/256 of itself. Otherwise none (autocast, or
    fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mixed_precision != "bf16-weights":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


class MasterWeights:
    """fp32 master copies of a model's bf16 trained weights (mixed_precision bf16-weights): the optimizer steps the
    masters, the model computes with their bf16 roundings."""

    def __init__(self, params):
        self.params = list(params)
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.params]

    @torch.no_grad()
    def take_grads(self, group_bytes: int = 1 << 29):
        """The model's bf16 gradients (averaged over processes by then) as the masters' fp32 ones, a group of up to
        512 MiB of fp32 gradients at a time: one fused copy per group (few kernel launches), each group's bf16
        gradients let go. A generator: it yields each group's masters once their gradients are converted, so that
        the caller can step and free them before the next group is converted."""
        group, size = [], 0
        for p, m in zip(self.params, self.masters):
            if p.grad is not None:
                group.append((p, m))
                size += m.numel() * m.element_size()
            if size >= group_bytes:
                yield self._to_masters(group)
                group, size = [], 0
        if group:
            yield self._to_masters(group)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the model's bf16 gradients, accumulated in fp32: that of their fp32 copies."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))

    @torch.no_grad()
    def step(self, opt, max_norm: float | None = None, group_bytes: int = 1 << 29) -> None:
        """One step of `opt` (over the masters) from the model's bf16 gradients, then the masters' bf16 roundings
        into the model. A group of up to 512 MiB of fp32 gradients at a time is converted, clipped as the norm of
        all gradients asks (torch's clip_grads_with_norm_, as clip_grad_norm_), stepped (AdamW steps only the
        parameters that have gradients) and freed: fp32 gradients of one group are held at a time, not of the whole
        model (3.8 GiB less at the step of a 2 B-parameter generator, where its memory peaks)."""
        norm = None if max_norm is None else self.grad_norm()
        for masters in self.take_grads(group_bytes):
            if norm is not None:
                torch.nn.utils.clip_grads_with_norm_(masters, max_norm, norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.give_weights()

    @staticmethod
    def _to_masters(group) -> list[torch.nn.Parameter]:
        """One fused copy of the group's bf16 gradients into new fp32 ones on the masters (returned); the bf16 ones
        let go."""
        fp32 = [torch.empty_like(m) for _, m in group]
        torch._foreach_copy_(fp32, [p.grad for p, _ in group])
        for (p, m), g in zip(group, fp32):
            m.grad, p.grad = g, None
        return [m for _, m in group]

    @torch.no_grad()
    def give_weights(self) -> None:
        """The masters' bf16 roundings into the model, in one fused copy."""
        if self.params:
            torch._foreach_copy_(self.params, self.masters)

    def release(self) -> None:
        """The model takes the fp32 masters themselves: after training it holds fp32 trained weights, as under
        autocast."""
        for p, m in zip(self.params, self.masters):
            p.data = m.data


def optimizer(params, lr: float, kind: str = "adamw", weight_decay: float = 0.0):
    """AdamW over the trainable `params`, or bitsandbytes' 8-bit AdamW for real-scale memory."""
    params = [p for p in params if p.requires_grad]
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only); "
                              "it is not among dmdr's pinned dependencies") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # on GPUs the fused kernel: faster, and no parameter-sized temporaries (the foreach form's peak memory)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
