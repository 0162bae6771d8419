"""LoRA adapters through peft and diffusers: DynaDG's on the real score, and the generator's option (the released
code's `--use-lora-gen`). No method here: adapters (dmdr.families) and the method (dmdr.distill) both use them."""
from __future__ import annotations

import copy

import torch

from . import flow


def backbone_of(model):
    """The diffusers backbone inside a velocity model (or its CFG wrapper)."""
    return (model.model if isinstance(model, flow.Guided) else model).backbone


LORA = "dynadg"
GENERATOR_LORA = "generator"
# the released SD3 scripts put both of their LoRAs on the attention projections of the joint blocks
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def attention_targets(backbone) -> list[str]:
    """The ATTENTION projections a backbone has (a UNet has no context stream)."""
    return sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
                   for n, _ in backbone.named_modules()} & set(ATTENTION))


def add_lora(model, rank: int, form: str = "paper"):
    """DynaDG's peft LoRA adapter (once); only it is trainable. Paper form: on the attention and feed-forward
    projections. Released form, as train_sd3_refl_deepspeed.py's shared LoRA: on the attention projections only,
    SD3's context stream included, Gaussian init."""
    from peft import LoraConfig
    backbone = model.backbone
    backbone.requires_grad_(False)
    if LORA not in (getattr(backbone, "peft_config", None) or {}):
        config = (LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                             target_modules=attention_targets(backbone)) if form == "released" else
                  LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
        backbone.add_adapter(config, adapter_name=LORA)
    params = [p for n, p in backbone.named_parameters() if "lora_" in n]
    for q in params:
        q.requires_grad_(True)
    return params


def add_generator_lora(model, rank: int, alpha: float) -> None:
    """The generator as a LoRA on a frozen copy of its start (the released code's `--use-lora-gen`: rank 64, alpha
    128, Gaussian init, attention projections); the adapter starts at zero, so the generator starts as its start."""
    from peft import LoraConfig
    backbone = backbone_of(model)
    backbone.requires_grad_(False)
    backbone.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=attention_targets(backbone)), adapter_name=GENERATOR_LORA)


def set_lora_scale(model, scale: float) -> None:
    """DynaDG's adapter at `scale` (its alpha is its rank: the scale is the multiplier itself). Its layers share one
    0-dim tensor, set in place: compiled blocks take it as an input, so the annealed scale does not recompile them,
    and a call costs no walk over the modules. A CPU scalar, so that CUDA kernels read it at full precision."""
    backbone = model.backbone
    if not hasattr(backbone, "_dynadg_layers"):  # plain attributes: not in the state dict
        from peft.tuners.lora import LoraLayer
        backbone._dynadg_layers = [m for m in backbone.modules() if isinstance(m, LoraLayer) and LORA in m.scaling]
        backbone._dynadg_scale = torch.zeros(())
    backbone._dynadg_scale.fill_(scale)
    for m in backbone._dynadg_layers:  # each call: peft's own set_scale would leave a float there
        m.scaling[LORA] = backbone._dynadg_scale


def fused_copy(model, scale: float = 1.0):
    """A plain fp32 copy of a LoRA'd model with its adapter merged in at `scale` (what a checkpoint stores)."""
    out = copy.deepcopy(model)
    backbone = backbone_of(out)
    (name,) = backbone.peft_config
    backbone.set_adapters([name], weights=[1.0])
    backbone.fuse_lora(lora_scale=scale)
    backbone.unload_lora()
    return out.float()


def plain(model):
    """The model as a checkpoint stores it: a LoRA generator merged into its base, anything else as it is."""
    return fused_copy(model) if getattr(backbone_of(model), "peft_config", None) else model


def lora_state(model) -> dict[str, torch.Tensor]:
    """DynaDG's adapter weights (to continue the released form's shared LoRA in the next stage)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model.backbone, adapter_name=LORA).items()}


def load_lora_state(model, rank: int, state: dict[str, torch.Tensor]) -> None:
    """Give `model` DynaDG's adapter (rank `rank`; the form whose layers the saved state has) with the weights of
    `lora_state`."""
    from peft import set_peft_model_state_dict
    saved = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    if saved != rank:
        raise ValueError(f"the saved DynaDG LoRA has rank {saved}, the recipe asks for dynadg.rank {rank}")
    add_lora(model, rank, "paper" if any(".ff.net." in k for k in state) else "released")
    result = set_peft_model_state_dict(model.backbone, state, adapter_name=LORA)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"the saved DynaDG LoRA does not fit this model: {result.unexpected_keys[:3]} ...")
