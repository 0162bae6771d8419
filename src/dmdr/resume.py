"""Resumable training: a checkpoint every N steps, written atomically, so a run killed at any moment (SIGKILL
included) continues from its last checkpoint and ends exactly where an uninterrupted run ends (on CPU).

A checkpoint directory holds accelerate's `save_state` (the prepared models as safetensors; optimizer states and
accelerate's global RNG states, which it loads with torch.load(weights_only=True)) plus `loop.json` (step, logged
rows, the loop's own numpy generator, the fingerprint of the run's settings) and `generators.safetensors` (the loop's
torch generator and any other tensors of its state, such as an EMA's shadow weights). Nothing is unpickled. A
checkpoint whose fingerprint differs (other params, other prompts) is ignored rather than resumed; one with
non-finite weights is never written. Under FSDP every process writes its own shards (dmdr.sharded), under DeepSpeed
its partitions (dmdr.zero), with its RNG states and the number of processes, which such a checkpoint needs to resume.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from safetensors.torch import load_file, save_file

from . import sharded, zero
from .models import atomic_dir, move_into_place


@dataclass
class Checkpoint:
    """Where and how often a loop checkpoints, what identifies its run, and the random generators it draws from
    besides the global ones (which accelerate saves)."""
    path: Path
    every: int
    fingerprint: str
    rng: torch.Generator | None = None
    prng: np.random.Generator | None = None


def fingerprint(*parts) -> str:
    """A short hash of the JSON of everything that defines a run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def texts_digest(texts: list[str]) -> str:
    """The sha256 of a list of texts (a run's whole prompt set: its count and every prompt, in order)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def files_fingerprint(*paths: Path) -> str:
    """A short hash of the names and bytes of every file under `paths` (a missing path counts as empty): the models
    a run reads, in its checkpoints' identity, so that a checkpoint trained against others (a retrained teacher or
    reward) is not resumed."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.is_file())
        else:
            files = [root] if root.is_file() else []
        for f in files:
            h.update(f"{f}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def all_finite(acc, modules) -> bool:
    """Every weight finite, each process checking its own slices; under FSDP the processes agree on the answer."""
    ok = all(torch.isfinite(sharded.local(p)).all() for m in modules for p in m.parameters())
    if sharded.active(acc):
        ok = acc.reduce(torch.tensor(float(ok), device=acc.device), "sum") == acc.num_processes
    return bool(ok)


def save(acc, ckpt: Checkpoint, loop: dict, modules, tensors: dict[str, torch.Tensor] | None = None) -> bool:
    """Write a checkpoint of `loop` (with the run's fingerprint and generators) atomically: a temporary directory
    renamed over the old one. Returns False, writing nothing, when any weight is non-finite: a good checkpoint is
    never replaced by a poisoned one. `tensors` are saved by name and copied back in place by `load`."""
    if not all_finite(acc, modules):
        return False
    rng, prng = ckpt.rng, ckpt.prng

    def extras(d: Path):
        state = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
        save_file(state | ({"rng": rng.get_state()} if rng is not None else {}), d / "generators.safetensors")
        loop_state = loop | {"fingerprint": ckpt.fingerprint} | ({"prng": prng.bit_generator.state} if prng else {})
        (d / "loop.json").write_text(json.dumps(loop_state))

    if acc.num_processes == 1:
        atomic_dir(ckpt.path, lambda d: (save_state(acc, d, modules), extras(d)))
        return True
    # several processes: all write accelerate's state (each its RNG) into one staging directory, the main process
    # adds the loop's files and moves it into place (the loop's generators are the same in every process)
    path = Path(ckpt.path)
    staging = path.with_name(f".{path.name}.staging")
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    save_state(acc, staging, modules)
    acc.wait_for_everyone()
    if acc.is_main_process:
        extras(staging)
        move_into_place(staging, path)
    acc.wait_for_everyone()
    return True


def safetensors_problem(f: Path) -> str | None:
    """Why a safetensors file is not whole (its header unreadable, or fewer bytes than the header promises)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"its header says {n} bytes, the file has {size - 8} after the length"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if size == 8 + n + end else f"{size} bytes where its header promises {8 + n + end}"


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed (a file cut short by a full disk or a copy, a header that does
    not read), or None: loop.json is JSON with a step, every safetensors file is whole, every torch file
    (accelerate's optimizer and RNG states) is a complete zip archive."""
    try:
        loop = json.loads((path / "loop.json").read_text())
        if not isinstance(loop, dict) or "step" not in loop:
            return "loop.json has no step"
    except (OSError, ValueError) as e:
        return f"loop.json does not read ({e})"
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors" and (problem := safetensors_problem(f)):
            return f"{f.relative_to(path)}: {problem}"
        if f.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(f):
            return f"{f.relative_to(path)}: not a complete torch archive"
    return None


def set_aside(path: Path, problem: str) -> None:
    """Move a broken checkpoint to `<path>.broken` (replacing an older one), with a message naming it and its
    `problem`, so that the run starts over instead of failing inside the loaders."""
    broken = path.with_name(path.name + ".broken")
    shutil.rmtree(broken, ignore_errors=True)
    path.rename(broken)
    print(f"checkpoint {path} is broken ({problem}): set aside as {broken}; the run starts over")


def load(acc, ckpt: Checkpoint | None, tensors: dict[str, torch.Tensor] | None = None, modules=()) -> dict | None:
    """Restore the run's checkpoint into the prepared objects (`modules`: the trained models, in the order
    prepared), its generators and `tensors` (in place); returns the loop state, or None when there is no checkpoint
    of this run (a broken one, `checkpoint_problem`, is set aside first)."""
    if ckpt is None or not Path(ckpt.path).is_dir():
        return None
    path = Path(ckpt.path)
    problem = checkpoint_problem(path) if acc.is_main_process else None  # the files read once, by one process
    broken = problem is not None
    if acc.num_processes > 1:  # and every process decides as it does
        broken = bool(acc.reduce(torch.tensor(float(broken), device=acc.device), "sum"))
    if broken:
        if acc.is_main_process:
            set_aside(path, problem)
        acc.wait_for_everyone()
        return None
    loop = json.loads((path / "loop.json").read_text())
    if loop.pop("fingerprint", None) != ckpt.fingerprint:
        print(f"ignoring checkpoint {path}: it belongs to other settings")
        return None
    load_state(acc, path, modules)
    saved = load_file(path / "generators.safetensors")
    if ckpt.rng is not None:
        ckpt.rng.set_state(saved["rng"])
    for name, t in (tensors or {}).items():
        with torch.no_grad():
            t.copy_(saved[name])
    if ckpt.prng is not None:
        ckpt.prng.bit_generator.state = loop["prng"]
    loop.pop("prng", None)
    print(f"resumed from {path} at step {loop['step']}")
    return loop


def _partitioned(acc):
    """The module that writes each process's own part of the state (dmdr.sharded under FSDP, dmdr.zero under
    DeepSpeed), or None where accelerate's save_state does (one process, DDP)."""
    return sharded if sharded.active(acc) else zero if zero.active(acc) else None


def save_state(acc, path: Path, modules=()) -> None:
    """accelerate's state, or under FSDP or DeepSpeed each process's own part with its RNG states (accelerate's
    random_states_r.pkl, read back with torch.load(weights_only=True)) and the number of processes it was cut for."""
    backend = _partitioned(acc)
    if backend is None:
        acc.save_state(str(path), safe_serialization=True)
        return
    backend.save_state(acc, modules, path)
    save_accelerator_state(str(path), [], [], [], [], acc.process_index, acc.step)
    (path / f"processes.rank_{acc.process_index}.json").write_text(json.dumps({"processes": acc.num_processes}))


def load_state(acc, path: Path, modules=()) -> None:
    """What save_state wrote, into the prepared objects (`modules`: the trained models, in the order prepared); a
    partitioned state fits only the number of processes that wrote it."""
    backend = _partitioned(acc)
    if backend is None:
        acc.load_state(str(path))
        return
    wrote = json.loads((path / "processes.rank_0.json").read_text())["processes"]
    if wrote != acc.num_processes:
        raise ValueError(f"{path}: a checkpoint of {wrote} {backend.NAME} processes cannot be resumed by "
                         f"{acc.num_processes}; run with {wrote} processes or remove the checkpoint")
    backend.load_state(acc, modules, path)
    load_accelerator_state(str(path), [], [], [], [], acc.process_index)
