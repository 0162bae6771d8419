"""Training under DeepSpeed ZeRO stage 1 or 2 (`accelerate launch --config_file configs/accelerate/deepspeed.yaml`):
what the loop needs beyond DDP.

A DeepSpeed engine trains one model, so each trained model (generator, fake score, DynaDG's LoRA'd teacher) gets
its own engine, prepared by its own Accelerator (accelerate's way for several models). ZeRO partitions each
model's fp32 weights and AdamW states over the processes (stage 2: its gradients too); the weights the models compute
with stay whole on every process, so export and evaluation read the models as they are. The engine clips the
gradient norm and skips a step whose norm is not finite. Checkpoints are written by dmdr: the weights once, and each
process's partition of the fp32 weights and AdamW states, as safetensors (DeepSpeed's own are pickled). Stage 3
(the weights partitioned too) is refused: FSDP (configs/accelerate/fsdp.yaml) shards weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file


NAME = "DeepSpeed"


def active(acc) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def configure(acc, cfg, micro_batch: int) -> None:
    """The DeepSpeed config of this run's engines, from the loop's settings: `micro_batch` samples a pass, the
    loop's micro-batches as DeepSpeed's accumulation steps (the loop marks the last one), the gradient norm clipped
    to 1 as the loop does, and bf16-weights as DeepSpeed's bf16 (every weight in bf16, fp32 masters in the ZeRO
    partitions); otherwise fp32 weights (under autocast for bf16)."""
    plugin = acc.state.deepspeed_plugin
    if plugin.zero_stage not in (1, 2):
        raise ValueError(f"DeepSpeed zero_stage {plugin.zero_stage} is not supported: use 1 or 2 "
                         f"(configs/accelerate/deepspeed.yaml); to shard the weights too, use FSDP "
                         f"(configs/accelerate/fsdp.yaml)")
    if cfg.optimizer == "adamw8bit":
        raise ValueError("optimizer adamw8bit under DeepSpeed: ZeRO is untested with bitsandbytes' 8-bit AdamW "
                         "(DeepSpeed refuses it without zero_allow_untested_optimizer). Set optimizer: adamw in the "
                         "preset's stages (with dmdr.real: --set presets.NAME.stage1.optimizer=adamw --set "
                         "presets.NAME.stage2.optimizer=adamw): ZeRO partitions AdamW's fp32 states over the processes")
    plugin.deepspeed_config.update({
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": cfg.micro_batches,
        "train_batch_size": cfg.batch, "gradient_clipping": 1.0, "fp16": {"enabled": False},
        "bf16": {"enabled": cfg.mixed_precision == "bf16-weights"}})


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """Gradients of `loss` (already weighted by its micro-batch's share) into `engine`; `last`: the step's last
    micro-batch, after which its gradients are complete."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


@torch.no_grad()
def release(engines) -> None:
    """After training: each model back as a plain module holding fp32 trained weights (under bf16-weights, the
    masters gathered from the partitions), the engines' hooks removed."""
    if not engines:  # not under DeepSpeed, which need not be installed
        return
    from deepspeed.utils import safe_get_full_fp32_param
    for engine in engines:
        if engine.bfloat16_enabled():
            for p in engine.module.parameters():
                if p.requires_grad:
                    p.data = safe_get_full_fp32_param(p).detach().clone()
        engine.destroy()


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A tensor's own copy (ZeRO's weights and partitions are views of flat buffers, which safetensors refuses)."""
    return t.detach().to("cpu", copy=True).contiguous()


def save_state(acc, engines, path: Path) -> None:
    """Each engine's weights (`model_i.safetensors`, by the main process) and this process's partition of its fp32
    weights and AdamW states (`optimizer_i.rank_r.safetensors`, the hyperparameters in `optimizer_i.json`)."""
    path, rank = Path(path), acc.process_index
    for i, engine in enumerate(engines):
        zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around the AdamW it steps its partitions with
        if acc.is_main_process:
            save_file({k: _host_copy(v) for k, v in engine.module.state_dict().items()},
                      path / f"model_{i}.safetensors")
        state = zero.optimizer.state_dict()
        tensors = {f"{p}.{k}": v for p, s in state["state"].items() for k, v in s.items()}
        tensors |= {f"fp32.{g}": t for g, t in enumerate(zero.single_partition_of_fp32_groups)}
        save_file({k: _host_copy(v) for k, v in tensors.items()}, path / f"optimizer_{i}.rank_{rank}.safetensors")
        if acc.is_main_process:
            (path / f"optimizer_{i}.json").write_text(json.dumps({"param_groups": state["param_groups"]}))


@torch.no_grad()
def load_state(acc, engines, path: Path) -> None:
    """Restore what save_state wrote into the engines, in place."""
    path, rank = Path(path), acc.process_index
    for i, engine in enumerate(engines):
        zero = engine.optimizer
        weights = load_file(path / f"model_{i}.safetensors")
        for k, v in engine.module.state_dict().items():
            v.copy_(weights[k])
        saved = load_file(path / f"optimizer_{i}.rank_{rank}.safetensors")
        for g, t in enumerate(zero.single_partition_of_fp32_groups):
            t.copy_(saved.pop(f"fp32.{g}"))
        state: dict[int, dict] = {}
        for key, v in saved.items():
            p, name = key.split(".", 1)
            state.setdefault(int(p), {})[name] = v
        meta = json.loads((path / f"optimizer_{i}.json").read_text())
        zero.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
