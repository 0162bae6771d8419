"""Training under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`): what the loop needs
beyond DDP.

accelerate shards each trained model per block in place: its parameters become DTensors, each process holding a
slice. The loop then needs (1) its checkpoints written shard by shard, as safetensors (accelerate's own FSDP
checkpoints go through torch.distributed.checkpoint, whose metadata file is unpickled when read), and (2) the
trained models back as plain modules at the end, so that export and evaluation are the code they are under DDP.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor


NAME = "FSDP"


def active(acc) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (a plain tensor is its own slice)."""
    return t.to_local() if isinstance(t, DTensor) else t


def storage_free_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory): the plain module that
    `gathered` fills once training is done. Taken before sharding, since sharding changes the module in place."""
    memo = {id(t): torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
            for t in model.parameters()}
    memo |= {id(t): torch.empty_like(t, device="meta") for t in model.buffers()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def gathered(model: torch.nn.Module, skeleton: torch.nn.Module, device) -> torch.nn.Module:
    """`skeleton` (from storage_free_copy) holding the full weights of the sharded `model` on `device`, on every
    process. Every process must call it: each parameter is all-gathered in turn, so the peak on the GPU is one full
    parameter. (A next stage's sharding moves a host copy back to the GPUs.)"""
    plain = skeleton.to_empty(device=device)
    source = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in [*plain.named_parameters(), *plain.named_buffers()]:
        s = source[name]
        t.copy_(s.full_tensor() if isinstance(s, DTensor) else s)
    return plain


def params_of(opt) -> list[torch.nn.Parameter]:
    """The parameters an optimizer steps, in its state's order (under FSDP, the sharded ones that replaced those it
    was built with)."""
    return [p for g in opt.param_groups for p in g["params"]]


def inner_optimizer(acc_opt):
    """The torch optimizer inside accelerate's wrapper (or the optimizer itself)."""
    return getattr(acc_opt, "optimizer", acc_opt)


def save_state(acc, models, path: Path) -> None:
    """This process's slices of the sharded `models` and of every prepared optimizer (`model_i.rank_r.safetensors`,
    `optimizer_i.rank_r.safetensors`, the optimizer's hyperparameters in `optimizer_i.json`)."""
    path, rank = Path(path), acc.process_index
    for i, model in enumerate(models):
        save_file({k: local(v).detach().contiguous() for k, v in model.state_dict().items()},
                  path / f"model_{i}.rank_{rank}.safetensors")
    for i, acc_opt in enumerate(acc._optimizers):
        state = inner_optimizer(acc_opt).state_dict()
        tensors = {f"{p}.{k}": v for p, s in state["state"].items() for k, v in s.items()}
        save_file({k: local(v).detach().contiguous() for k, v in tensors.items()},
                  path / f"optimizer_{i}.rank_{rank}.safetensors")
        if acc.is_main_process:
            meta = {"param_groups": state["param_groups"], "sharded": sorted(k for k, v in tensors.items()
                                                                                if isinstance(v, DTensor))}
            (path / f"optimizer_{i}.json").write_text(json.dumps(meta))


@torch.no_grad()
def load_state(acc, models, path: Path) -> None:
    """Restore what save_state wrote, into the sharded `models` and the prepared optimizers, in place."""
    path, rank = Path(path), acc.process_index
    for i, model in enumerate(models):
        saved = load_file(path / f"model_{i}.rank_{rank}.safetensors")
        for k, v in model.state_dict().items():
            local(v).copy_(saved[k])
    for i, acc_opt in enumerate(acc._optimizers):
        opt = inner_optimizer(acc_opt)
        meta = json.loads((path / f"optimizer_{i}.json").read_text())
        saved = load_file(path / f"optimizer_{i}.rank_{rank}.safetensors")
        params = params_of(opt)
        state: dict[int, dict] = {}
        for key, v in saved.items():
            p, name = key.split(".", 1)
            param = params[int(p)]
            if key in meta["sharded"]:  # the slice back into a tensor sharded as its parameter is
                v = DTensor.from_local(v.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride(), run_check=False)
            state.setdefault(int(p), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
