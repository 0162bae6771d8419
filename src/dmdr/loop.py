"""The generic training loop and its engine: what any trainer owns, and no method.

The engine owns accelerate (processes: DDP, FSDP2, DeepSpeed ZeRO), micro-batches, precision and fp32 master
weights, gradient clipping, non-finite handling, checkpoints and trackers. A method (dmdr.distill.DMDR) names the
models it trains (`trainees`), and in each of its steps hands the engine loss functions to fit (`Engine.fit`); the
loop (`run`) calls the method's step, logs, draws curves and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import resume, sharded, zero
from .files import write_csv
from .precision import MasterWeights, fsdp_mixed_precision, master_weights, optimizer
from .sharded import inner_optimizer, params_of


@dataclass
class Trainee:
    """A model a method trains: the name of its optimizer (in checkpoints and `Engine.fit`), which of the method's
    models it is (`role`), the parameters it steps, their learning rate and weight decay, and what messages about its
    updates call it. Optionally a learning-rate `schedule` (the factor at each update, as LambdaLR takes it) and an
    `ema` of the weights (diffusers' EMAModel) stepped after each update."""
    name: str
    role: str
    model: torch.nn.Module
    params: list
    lr: float
    weight_decay: float = 0.0
    label: str = ""
    schedule: Callable[[int], float] | None = None
    ema: object | None = None


@dataclass
class Prepared:
    """A trainee as the engine holds it: its prepared model, optimizer and schedule."""
    model: torch.nn.Module
    optimizer: object
    schedule: object | None
    trainee: Trainee

    @property
    def label(self) -> str:
        return self.trainee.label or self.trainee.name


@dataclass
class Settings:
    """An engine's settings, for trainers that have no DistillParams (the world's stand-ins)."""
    batch: int = 1
    micro_batches: int = 1
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    compile: str = "off"
    max_nonfinite: int = 1


class Method(Protocol):
    """What the loop and its engine know of a method (dmdr.distill.DMDR is one)."""
    name: str  # the progress bar's
    networks: list  # the models held in training precision
    backpropagated: list  # the models backward runs through (gradient checkpointing)
    called: list  # every model it calls (compiled blocks)

    def trainees(self) -> list[Trainee]: ...

    def bind(self, prepared: dict) -> None:
        """The trainees' models as the engine prepared them, by trainee name."""

    def step(self, step: int) -> dict:
        """One training step, its updates through Engine.fit; returns the values to log."""

    def evaluated(self) -> torch.nn.Module:
        """The model the curves evaluate."""


@dataclass
class Tracking:
    """Experiment trackers that the loop's logged rows also go to: accelerate's (`log_with`: 'tensorboard', 'wandb',
    'dvclive', ... or GeneralTracker instances), a run `name` with its settings (`config`: flat, scalar values),
    local logs under `directory`."""
    log_with: list
    directory: Path
    name: str
    config: dict = dataclasses.field(default_factory=dict)


def log_images(trackers, images: dict[str, np.ndarray], step: int) -> None:
    """Images (N, H, W, C uint8 arrays) to the trackers that take them (accelerate's TensorBoard, W&B, ClearML, ...;
    TensorBoard is told the layout, the others take the images one by one)."""
    for t in trackers:
        if hasattr(t, "log_images"):
            t.log_images(images, step=step, **({"dataformats": "NHWC"} if t.name == "tensorboard" else {}))


class Engine:
    """Accelerate and what it trains, for a run of settings `cfg` (batch, micro_batches, mixed_precision, optimizer,
    gradient_checkpointing, compile, max_nonfinite). Under several processes `cfg.batch` is the global batch: each
    process takes its slice (`mine`) of every draw, and passes it in `micro_batches` parts."""

    def __init__(self, cfg, tracking: Tracking | None = None, checkpoint_dir: Path | None = None):
        self.cfg, self.tracking, self.checkpoint_dir = cfg, tracking, checkpoint_dir
        acc = self.acc = Accelerator(cpu=not torch.cuda.is_available(),
                                     log_with=tracking.log_with if tracking else None,
                                     project_dir=tracking.directory if tracking else None)
        if tracking:
            acc.init_trackers(tracking.name, config=tracking.config)
        self.fsdp, self.deepspeed = sharded.active(acc), zero.active(acc)
        self._refuse_unsupported()
        if self.fsdp:  # set for each call: the plugin is accelerate's process-wide state, shared by the stages
            acc.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision(cfg.mixed_precision)
        self.autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        if cfg.batch % acc.num_processes:
            raise ValueError(f"batch {cfg.batch} does not divide over {acc.num_processes} processes")
        local = cfg.batch // acc.num_processes
        self.mine = slice(acc.process_index * local, (acc.process_index + 1) * local)  # this process's part of a draw
        if local % cfg.micro_batches:
            raise ValueError(f"micro_batches {cfg.micro_batches} does not divide the local batch {local} (batch "
                             f"{cfg.batch} over {acc.num_processes} processes)")
        size = local // cfg.micro_batches
        self.micro = [slice(i * size, (i + 1) * size) for i in range(cfg.micro_batches)]  # of this process's part
        if self.deepspeed:
            zero.configure(acc, cfg, size)
        self.device = acc.device
        self.masters: dict[str, MasterWeights] = {}  # bf16-weights: the fp32 weights each optimizer steps, by name
        self.engines, self.plain_copies = [], {}
        self.trainees: dict[str, Prepared] = {}  # by name, in the order prepared
        self.pending = []  # (what, step, loss) of the updates whose loss the host has not read yet
        self.skipped = self.in_a_row = 0

    def _refuse_unsupported(self) -> None:
        if self.fsdp and not self.acc.is_fsdp2:
            raise ValueError("FSDP version 1 is not supported: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        if self.fsdp and self.cfg.optimizer == "adamw8bit":
            raise ValueError(
                "optimizer adamw8bit under FSDP: bitsandbytes' 8-bit AdamW does not handle sharded (DTensor) "
                "parameters (bitsandbytes issue #1633). Set optimizer: adamw in the preset's stages (with dmdr.real: "
                "--set presets.NAME.stage1.optimizer=adamw --set presets.NAME.stage2.optimizer=adamw): FSDP shards "
                "AdamW's fp32 states (8 bytes per parameter) over the processes, which beyond 4 processes holds less "
                "per GPU than whole 8-bit states (2 bytes per parameter)")

    # --- setting up ---------------------------------------------------------------------------------------------

    def prepare(self, method: Method) -> None:
        """The method's models held in training precision (`method.networks`), with gradient checkpointing
        (`method.backpropagated`) and compiled blocks (`method.called`) as `cfg` asks, its trainees each prepared
        with an optimizer; the method gets back the prepared models (`method.bind`)."""
        cfg = self.cfg
        for m in method.networks:
            master_weights(m, cfg.mixed_precision, self.fsdp)
        trainees = method.trainees()
        # under FSDP, sharding changes the trained models in place: plain copies (without storage) take their
        # weights at the end. Taken before checkpointing and compilation, which export and evaluation do not need.
        self.plain_copies = {t.role: (t.model, sharded.storage_free_copy(t.model)) for t in trainees if self.fsdp}
        if cfg.gradient_checkpointing:
            from .models import checkpoint_blocks
            for m in method.backpropagated:
                checkpoint_blocks(m)
        if cfg.compile != "off":  # after every LoRA is in place: the compiled blocks trace them
            from .models import compile_blocks
            for m in method.called:
                compile_blocks(m, cfg.compile)
        for t in trainees:  # in order: checkpoints store the prepared models in it
            self.trainees[t.name] = Prepared(*self._prepared(t.model, *self._optimizer(t)), t)
        self._describe()
        method.bind({name: t.model for name, t in self.trainees.items()})

    @property
    def trained(self) -> list:
        """The prepared trained models, in the order prepared."""
        return [t.model for t in self.trainees.values()]

    def _optimizer(self, t: Trainee) -> tuple:
        """The trainee's optimizer and learning-rate schedule (None: constant)."""
        params = [p for p in t.params if p.requires_grad]
        if self.cfg.mixed_precision == "bf16-weights" and not (self.fsdp or self.deepspeed):  # else shards or ZeRO
            self.masters[t.name] = MasterWeights(params)
            params = self.masters[t.name].masters
        opt = optimizer(params, t.lr, self.cfg.optimizer, t.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, t.schedule) if t.schedule else None

    def _prepared(self, model, opt, schedule) -> tuple:
        """A model with its optimizer (and schedule), in one call as FSDP requires; under DeepSpeed each by its own
        Accelerator, as an engine trains one model."""
        by = self.acc
        if self.deepspeed:
            by = Accelerator(cpu=not torch.cuda.is_available()) if self.engines else self.acc
            by.gradient_accumulation_steps = self.cfg.micro_batches  # as DeepSpeed's config has them (no warning)
        model, opt, *schedule = by.prepare(model, opt, *([schedule] if schedule else []))
        if self.deepspeed:
            self.engines.append(model)
        return model, opt, schedule[0] if schedule else None

    def _describe(self) -> None:
        acc = self.acc
        processes = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
        if self.fsdp and acc.is_main_process:
            first = self.trained[0]
            units = sorted({type(m).__name__.removeprefix("FSDP") for m in first.modules()
                            if m is not first and hasattr(m, "unshard")})
            print(f"FSDP2: {', '.join(self.plain_copies)} sharded over {processes}, by {', '.join(units)}")
        if self.deepspeed and acc.is_main_process:
            roles = ", ".join(t.trainee.role for t in self.trainees.values())
            print(f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}: {roles} trained by an engine each, their "
                  f"fp32 weights and AdamW states partitioned over {processes}")

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    # --- what a method's step uses ------------------------------------------------------------------------------

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A per-sample quantity of the whole global batch (the identity under one process)."""
        return self.acc.gather(x.contiguous()) if self.acc.num_processes > 1 else x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over processes, detached."""
        return self.acc.reduce(x.detach(), "mean") if self.acc.num_processes > 1 else x.detach()

    def fit(self, name: str, loss_of, step: int) -> tuple[torch.Tensor, dict]:
        """One update of trainee `name`: the gradients of the mean loss over this process's part of the batch,
        `loss_of(part) -> (loss, logs)` (a slice of it: its mean loss, and values to log) computed and
        differentiated one micro-batch at a time, each weighted by its share, so that only one micro-batch's
        activations are held (the gradients synchronised across processes on the last one only); then a step.
        Returns the batch's loss and logged values, averaged over processes."""
        model = self.trainees[name].model
        total, logs = 0, {}
        for i, part in enumerate(self.micro):
            last = i == len(self.micro) - 1
            with self.acc.no_sync(model) if not (last or self.deepspeed) else contextlib.nullcontext():
                loss, logged = loss_of(part)
                loss = loss * (1 / len(self.micro))
                if self.deepspeed:
                    zero.backward(model, loss, last)
                else:
                    self.acc.backward(loss)
            total = total + loss.detach()
            for k, v in logged.items():
                logs[k] = logs.get(k, 0) + v.detach() / len(self.micro)
        return self._step(total, name, step), {k: self.mean(v) for k, v in logs.items()}

    def _step(self, loss, name: str, step: int) -> torch.Tensor:
        """After backward: the gradient norm clipped to 1 and one step (of the fp32 masters under bf16-weights),
        skipped when the batch's `loss` is non-finite (settle counts it). A fused AdamW skips on the device (its
        found_inf, as under a GradScaler), so the host does not wait for the GPU to decide, and settle reads the
        loss at the next logged row or checkpoint; elsewhere the host decides at once. Returns the loss averaged
        over processes."""
        held = self.trainees[name]
        model, opt, what = held.model, held.optimizer, held.label
        mean = self.mean(loss)
        self.pending.append((what, step, mean))  # every process takes the same decision
        if self.deepspeed:  # the engine clips, and skips a step whose gradient norm (a non-finite loss's) is not finite
            self.settle()
            model.step()
            return self._stepped(held, mean)
        inner = inner_optimizer(opt)
        if not self.fsdp and getattr(inner, "defaults", {}).get("fused"):
            inner.found_inf = (~torch.isfinite(mean)).float()
        elif not self.settle():
            model.zero_grad(set_to_none=True)
            return mean
        if name in self.masters:
            self.masters[name].step(opt, max_norm=1.0)
            return self._stepped(held, mean)
        # under FSDP, torch's own clipping of the sharded gradients: accelerate's compares parameter lists with ==,
        # which fails on two sharded models of one shape
        (torch.nn.utils.clip_grad_norm_ if self.fsdp else self.acc.clip_grad_norm_)(params_of(opt), 1.0)
        opt.step()
        return self._stepped(held, mean)

    def _stepped(self, held: Prepared, mean: torch.Tensor) -> torch.Tensor:
        """After an optimizer step: the schedule's step, the gradients cleared, the EMA updated."""
        if held.schedule is not None:
            held.schedule.step()
        if not self.deepspeed:
            held.optimizer.zero_grad(set_to_none=True)
        if held.trainee.ema is not None:
            held.trainee.ema.step(held.trainee.model.parameters())  # the module the prepared model wraps
        return mean

    # --- what the loop uses -------------------------------------------------------------------------------------

    def settle(self) -> bool:
        """Reads the pending updates' losses: each non-finite one is counted (its update was skipped), and
        `max_nonfinite` of them without a good update of the first trainee (DMDR's generator) in between stop the
        run. Returns whether the last was finite."""
        finite, first = True, next(iter(self.trainees.values())).label if self.trainees else None
        for what, step, value in self.pending:
            finite = bool(torch.isfinite(value))
            if finite:
                self.in_a_row = 0 if what == first else self.in_a_row
                continue
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            print(f"step {step}: non-finite {what} loss ({float(value)}), update skipped ({self.skipped} so far)")
            if self.in_a_row >= self.cfg.max_nonfinite:
                self.pending.clear()
                raise FloatingPointError(
                    f"{self.in_a_row} non-finite losses in a row (last: {what} at step {step}); stopping. Lower the "
                    f"learning rates or check the reward. The last good checkpoint stays in {self.checkpoint_dir}")
        self.pending.clear()
        return finite

    def read(self, values: dict) -> dict:
        """The logged values as numbers, the pending losses settled first (the host waits here for the GPU: once a
        logged row or checkpoint, not once a step)."""
        self.settle()
        return {k: float(v) for k, v in values.items()}

    def _tensors(self) -> dict:
        """The trained state beyond the prepared models: fp32 masters and EMA weights."""
        return ({f"master.{name}.{i}": m for name, w in self.masters.items() for i, m in enumerate(w.masters)}
                | {f"ema.{name}.{i}": m for name, t in self._emas().items() for i, m in enumerate(t.shadow_params)})

    def _emas(self) -> dict:
        return {name: t.trainee.ema for name, t in self.trainees.items() if t.trainee.ema is not None}

    def load(self, ckpt) -> dict | None:
        state = resume.load(self.acc, ckpt, self._tensors(), self.trained)
        if state is not None:
            for w in self.masters.values():
                w.give_weights()
            for name, ema in self._emas().items():
                ema.optimization_step = state["ema_steps"][name]
        return state

    def save(self, ckpt, state: dict) -> None:
        state = state | {"ema_steps": {name: ema.optimization_step for name, ema in self._emas().items()}}
        if not resume.save(self.acc, ckpt, state, self.trained, self._tensors()):
            raise FloatingPointError(f"non-finite weights at step {state['step']}: not checkpointed; the last good "
                                     f"checkpoint stays in {self.checkpoint_dir}")

    def finish(self) -> dict[str, torch.nn.Module]:
        """Training's end: the fp32 masters into the models, DeepSpeed's engines released. Returns the trained models
        that FSDP sharded, by role, gathered back into plain modules on the host (beside the sharded ones, a full
        SD3.5-Large may not fit a GPU)."""
        for w in self.masters.values():
            w.release()
        zero.release(self.engines)
        return {k: sharded.gathered(model, skeleton, "cpu") for k, (model, skeleton) in self.plain_copies.items()}

    def end_tracking(self) -> None:
        if self.tracking:
            self.acc.end_training()


def run(engine: Engine, method: Method, steps: int, log_every: int, curve_fn=None, curve_path: Path | None = None,
        ckpt: resume.Checkpoint | None = None, checkpoint_at_end: bool = False) -> list[dict]:
    """`steps` steps of `method`, from its checkpoint in `ckpt` when there is one of the same run. Every `log_every`
    steps, and after the last, a row: the method's last logged values and `curve_fn(model, step)` (held-out numbers
    of the model `method.evaluated()` returns after `step` updates; image arrays, N x H x W x C uint8, go to the
    trackers instead), written to `curve_path` as CSV. With `checkpoint_at_end` the finished run is checkpointed
    too, so that a later part of its stage that fails does not train it again. Returns the rows."""
    acc = engine.acc
    rows, t0, last, start = [], time.time(), {}, 0
    if (state := engine.load(ckpt)) is not None:
        rows, last, start, engine.skipped = state["rows"], state["last"], state["step"], state["skipped"]
        t0 -= state.get("seconds", 0.0)
    bar = tqdm(range(start, steps + 1), desc=method.name, mininterval=5)
    for step in bar:
        if (step % log_every == 0 or step == steps) and not (state and step == start):
            last = engine.read(last)
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if k.startswith("loss")}, refresh=False)
            row, images = {"step": step, "seconds": round(time.time() - t0, 2)}, {}
            if curve_fn is not None and (acc.is_main_process or engine.fsdp):  # a sharded model needs every process
                held_out = curve_fn(method.evaluated(), step)
                images = {k: held_out.pop(k) for k in [k for k, v in held_out.items()
                                                       if isinstance(v, np.ndarray) and v.ndim == 4]}
                row |= held_out if acc.is_main_process else {}
                if held_out and acc.is_main_process:
                    tqdm.write(f"{method.name} step {step}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in held_out.items() if isinstance(v, (int, float))))
            rows.append(row | last | ({"nonfinite_skipped": engine.skipped} if engine.skipped else {}))
            if engine.tracking:
                acc.log({k: v for k, v in rows[-1].items() if k != "step" and isinstance(v, (int, float))}, step=step)
                if images and acc.is_main_process:
                    log_images(acc.trackers, images, step)
            if curve_path is not None and acc.is_main_process:
                write_csv(rows, curve_path)
        if ckpt is not None and step > start and (step % ckpt.every == 0 if step < steps else checkpoint_at_end):
            last = engine.read(last)
            engine.save(ckpt, {"step": step, "rows": rows, "last": last, "skipped": engine.skipped,
                               "seconds": time.time() - t0})
        if step == steps:
            break
        last = method.step(step)
    return rows
