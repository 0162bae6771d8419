"""params.yaml: typed, validated on load, before any compute.

Every key is checked against the dataclasses below: an unknown key, a wrong type, a value outside the range its
field states (`knob(default, rule)`), or two keys that contradict each other (a class's `relations`) is a
`ParamsError` naming the dotted key(s). The file is read as YAML 1.2, as DVC reads and writes it, so that what
`dvc exp run -S` writes back (`no`, `off` unquoted, `1e-05`) reads as it was meant.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML, YAMLError


class ParamsError(ValueError):
    """A bad parameter; `key` is its dotted key (empty where the error is about the file itself)."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def fail(key: str, text: str):
    raise ParamsError(f"{key}: {text}", key)


# --- what a field accepts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (lo < value with `above`); None: unbounded on that side; optionally a multiple of `step`."""
    lo: float | None = None
    hi: float | None = None
    above: bool = False
    step: int | None = None

    def error(self, v) -> str | None:
        low = self.lo is None or (v > self.lo if self.above else v >= self.lo)
        high = self.hi is None or v <= self.hi
        if low and high and (self.step is None or v % self.step == 0):
            return None
        return f"must be {self.text()}"

    def text(self) -> str:
        if self.lo == 0 and self.above:
            lower = "positive"
        elif self.lo is not None and self.hi is not None and not self.above:
            lower = f"in [{_num(self.lo)}, {_num(self.hi)}]"
        elif self.lo is not None:
            lower = f"{'>' if self.above else '>='} {_num(self.lo)}"
        else:
            lower = ""
        upper = f"at most {_num(self.hi)}" if self.hi is not None and not lower.startswith("in") else ""
        step = f"a multiple of {self.step}" if self.step else ""
        return " and ".join(s for s in (lower, upper, step) if s)


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def error(self, v) -> str | None:
        return None if v in self.choices else f"must be one of {self.choices}"


@dataclass(frozen=True)
class Registered:
    """The name of an RL objective: a module of dmdr.rl (a file each)."""

    def error(self, v) -> str | None:
        from .rl import names
        return None if v in names() else f"must be one of {tuple(names())}"


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


@dataclass(frozen=True)
class Names:
    """A mapping whose keys name directories and files (recipes, models, presets): letters, digits and ._+- only,
    so that no name reaches outside the directory it names a part of (`../x` would). `stages`: the names are also
    DVC stages' (foreach keys), whose params DVC reads by dotted path, so a dot is refused too."""
    stages: bool = False

    def error(self, v) -> str | None:
        bad = [k for k in v if not isinstance(k, str) or not NAME.fullmatch(k) or (self.stages and "." in k)]
        if not bad:
            return None
        chars = "letters, digits and _ + -" + ("" if self.stages else " .")
        why = " (a DVC stage's name: DVC reads its params by a dotted path)" if self.stages else ""
        return f"names must be {chars} (starting with a letter or digit, at most 100){why}, got {bad[0]!r}"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def knob(default=dataclasses.MISSING, rule=None):
    """A field with the rule its values must meet (a Range, OneOf or Names; for a list, each element)."""
    meta = {"rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


UNIT = Range(0, 1)
LR = Range(0, 1, above=True)
CFG = Range(0, 50)
SEED = Range(0, 2**31 - 1)
STEPS = Range(1, 10_000_000)  # training and annealing steps
EVERY = Range(0, 10_000_000)  # an interval in steps; 0: never
BATCH = Range(1, 4096)
WIDTH = Range(1, 4096)


# --- the parameters ---------------------------------------------------------------------------------------------


@dataclass
class PromptsParams:
    n_train: int = knob(2000, Range(1, 1_000_000))
    test_per_tag: int = knob(24, Range(1, 100_000))
    n_test_dense: int = knob(96, Range(0, 100_000))
    extra_files: dict = knob({}, Names(stages=True))  # name: a real prompt file, each converted by the stage extra_prompts@name

    def relations(self):
        bad = [k for k, v in self.extra_files.items() if not isinstance(v, str) or not v.strip()]
        yield (f"extra_files.{bad[0]}" if bad else "extra_files",), not bad, "expected the path of a prompt file"


@dataclass
class ClipConfig:
    """The tiny CLIP's architecture (saved with its weights)."""
    embed_dim: int = knob(64, WIDTH)
    width: int = knob(64, WIDTH)
    vision_layers: int = knob(3, Range(1, 64))
    text_layers: int = knob(2, Range(1, 64))
    heads: int = knob(4, Range(1, 64))
    patch_size: int = knob(4, Range(1, 32))
    image_size: int = knob(32, OneOf((32,)))  # the world's renders
    context_length: int = knob(24, Range(4, 1024))

    def relations(self):
        yield ("width", "heads"), self.width % self.heads == 0, "width must be a multiple of heads"
        yield ("image_size", "patch_size"), self.image_size % self.patch_size == 0, \
            "image_size must be a multiple of patch_size"


@dataclass
class ClipParams(ClipConfig):
    steps: int = knob(600, STEPS)
    batch: int = knob(128, BATCH)
    lr: float = knob(2e-3, LR)


@dataclass
class VaeParams:
    steps: int = knob(600, STEPS)
    batch: int = knob(64, BATCH)
    lr: float = knob(1e-3, LR)
    kl_weight: float = knob(1e-6, UNIT)
    check_renders: int = knob(400, Range(1, 100_000))  # renders whose reconstruction is parsed


@dataclass
class TeacherParams:
    backbone: str = knob("unet", OneOf(("unet", "sd3")))
    channels: list[int] = knob([32, 64], Range(16, 4096, step=16))  # UNet blocks (group norm of 16 groups)
    layers: int = knob(4, Range(1, 64))  # sd3
    heads: int = knob(4, Range(1, 64))  # sd3
    head_dim: int = knob(16, Range(1, 1024))
    steps: int = knob(6000, STEPS)
    batch: int = knob(64, BATCH)
    lr: float = knob(1e-3, LR)
    warmup: int = knob(200, EVERY)
    timesteps: str = knob("logit_normal", OneOf(("logit_normal", "uniform")))  # epsilon: uniform over the 1000
    prediction: str = knob("velocity", OneOf(("velocity", "epsilon")))  # flow matching | DDPM's epsilon (SD's schedule)
    cfg_dropout: float = knob(0.1, UNIT)
    ema_decay: float = knob(0.999, Range(0, 1))
    pool_size: int = knob(60000, Range(1, 10_000_000))
    mixed_precision: str = knob("bf16", OneOf(("bf16", "no")))  # bf16-weights is a mode of the distillation loop
    eval_every: int = knob(1000, Range(1, 10_000_000))
    eval_prompts_per_tag: int = knob(8, Range(1, 10_000))
    eval_steps: int = knob(25, Range(1, 1000))
    cfg: float = knob(3.0, CFG)

    def relations(self):
        yield ("channels",), 1 <= len(self.channels) <= 4, "must list 1 to 4 blocks (the 8x8 latents halve per block)"
        if self.backbone == "unet":
            yield ("channels", "head_dim"), all(c % self.head_dim == 0 for c in self.channels), \
                "every channel count must be a multiple of head_dim"
        yield ("prediction", "timesteps"), self.prediction == "velocity" or self.timesteps == "uniform", \
            "an epsilon teacher trains on DDPM's discrete timesteps, drawn uniformly: timesteps must be uniform"
        yield ("prediction", "backbone"), self.prediction == "velocity" or self.backbone == "unet", \
            "an epsilon teacher is a UNet (as SDXL's)"


@dataclass
class WorldParams:
    clip: ClipParams = field(default_factory=ClipParams)
    clip_eval_seed: int = knob(1, SEED)  # the independent CLIP of the clip_score metric
    vae: VaeParams = field(default_factory=VaeParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    checkpoint_every: int = knob(500, EVERY)  # steps between resumable checkpoints of each stand-in; 0: none


@dataclass
class RewardsParams:
    """The reward models' training (the `rewards` stage): gold-labelled pairs with label noise."""
    prompts: int = knob(800, Range(2, 1_000_000))  # train prompts whose candidates make the pairs (half hps, half pick)
    steps: int = knob(300, STEPS)
    batch: int = knob(64, BATCH)  # pairs per step
    lr: float = knob(1e-4, LR)
    hps_label_noise: float = knob(0.1, Range(0, 0.5))  # above 0.5 the labels would invert
    pick_label_noise: float = knob(0.2, Range(0, 0.5))
    aesthetic_label_noise: float = knob(0.1, Range(0, 0.5))


@dataclass
class ClassifierParams:
    """The world classifier of Table 6 (the `classifier` stage): a linear probe on the independent CLIP."""
    steps: int = knob(300, STEPS)
    batch: int = knob(128, BATCH)
    lr: float = knob(0.01, LR)


@dataclass
class RtdmParams:
    """RT-DM (Eq. 4): per-sample DMD weights from the reward of the sample's full few-step output."""
    enabled: bool = False
    beta: float = knob(0.05, Range(0, 100, above=True))  # temperature of the tilt p_real(x) exp(r(x) / beta)
    form: str = knob("exp", OneOf(("exp", "reward")))  # exp: w = B softmax(r / beta) | reward: w = r / mean(r)
    tilt_fake: bool = False  # also train the fake score on exp(-r / beta)-weighted samples: the exact tilted optimum
    normalise: str = knob("batch", OneOf(("batch", "prompt")))  # weights over the batch | each prompt's samples
    target_ess: float = knob(0.0, UNIT)  # > 0: beta set before training so the weights keep this fraction (ESS)


@dataclass
class DynaDGParams:
    """DynaDG: a LoRA in the real-score estimator, trained on generator samples, its scale annealed to 0."""
    form: str = knob("off", OneOf(("off", "paper", "released")))  # paper: own LoRA, full-copy fake | released: shared
    rank: int = knob(8, Range(1, 1024))
    scale: float = knob(1.0, Range(0, 10))  # the real score's LoRA scale at step 0 (released: 0.5)
    fake_scale: float = knob(2.0, Range(0, 10))  # released form: the fake score is the same model at this LoRA scale
    lr: float = knob(1.0e-4, LR)
    steps: int = knob(100, STEPS)  # K: scale = scale * 0.5 (1 + cos(pi step / K)), 0 after K


@dataclass
class DynaRSParams:
    """DynaRS: renoise levels t ~ Beta(a, b) (biased to high noise), annealed to uniform over K steps."""
    enabled: bool = False
    a: float = knob(4.0, Range(0, 100, above=True))
    b: float = knob(1.5, Range(0, 100, above=True))
    steps: int = knob(100, STEPS)
    fake_score: bool = False  # released: the fake score's diffusion loss draws its levels from the same Beta


@dataclass
class GrpoParams:
    """GRPO (dmdr.rl.grpo): groups of `samples_per_prompt` samples of a prompt from the generator's noise-injected
    few-step ODE, a clipped ratio of their Gaussian step densities, group-relative advantages."""
    noise: float = knob(0.7, Range(0, 1, above=True))  # eta: the fresh share of each step's noise (0: the plain ODE)
    clip: float = knob(0.2, Range(0, 10, above=True))  # epsilon: the ratio is clipped to [1 - eps, 1 + eps]
    kl: float = knob(0.0, Range(0, 1000))  # weight of the KL to the reference (the stage's start); 0: none


@dataclass
class DpoParams:
    """DPO (dmdr.rl.dpo): Diffusion-DPO on pairs of the generator's own samples of a prompt, ranked by the reward."""
    beta: float = knob(5000.0, Range(0, 1e7, above=True))  # Diffusion-DPO's beta (its released SD1.5/SDXL value)


@dataclass
class RLParams:
    """Stage 2 (Eq. 3): L = dmd_weight * L_DMD + weight * L_RL, ReFL through the generator's one-step x0."""
    weight: float = knob(0.0, Range(0, 100))  # lambda; 0: no RL
    loss: str = knob("refl", Registered())  # an objective of dmdr.rl: refl | hinge | dpo | grpo
    margin: float = knob(0.7, Range(-1000, 1000))  # hinge: relu(margin - r)
    reward: str = "hps"  # a reward or weighted sum: clip | hps | pick | aesthetic | clip+hps | 0.5*clip+hps
    grpo: GrpoParams = field(default_factory=GrpoParams)
    dpo: DpoParams = field(default_factory=DpoParams)


@dataclass
class GeneratorLoraParams:
    """The generator as a LoRA on a frozen copy of its start (released SD3 scripts: rank 64, alpha 128)."""
    enabled: bool = False
    rank: int = knob(64, Range(1, 1024))
    alpha: float = knob(128.0, Range(0, 4096, above=True))


@dataclass
class DistillParams:
    """One training run; recipes override these."""
    init: str = "models/world/teacher"  # where the generator (and fake score) start: a teacher or models/distill/<recipe>
    prompts: str = knob("world", OneOf(("world", "classes")))  # train and curve prompts: the world's | 18 classes'
    real: str = knob("teacher", OneOf(("teacher", "init")))  # the real score: the lineage's teacher | the init checkpoint
    seed: int = knob(0, SEED)  # added to the global seed (repeat a recipe over seeds)
    dmd_weight: float = knob(1.0, Range(0, 100))  # 0: RL alone (no fake score, no distillation loss)
    generator_cfg: float = knob(1.0, CFG)  # > 1: the generator itself samples with CFG (multi-step RL on the teacher)
    rollout: str = knob("renoise", OneOf(("renoise", "trajectory")))  # renoise: DMD2 | trajectory: ReFL's late stop
    rollout_reuse: bool = False  # the generator update reuses the last fake update's rollout (released) | a fresh one
    rtdm: RtdmParams = field(default_factory=RtdmParams)
    dynadg: DynaDGParams = field(default_factory=DynaDGParams)
    dynars: DynaRSParams = field(default_factory=DynaRSParams)
    rl: RLParams = field(default_factory=RLParams)
    generator_steps: int = knob(4, Range(1, 100))
    steps: int = knob(200, STEPS)  # generator updates
    batch: int = knob(32, BATCH)  # the global batch
    generator_lr: float = knob(1e-4, LR)
    fake_lr: float = knob(1e-4, LR)
    ttur: int = knob(5, Range(1, 100))  # fake-score updates per generator update
    real_cfg: float = knob(3.0, CFG)
    cfg_jitter: float = knob(0.0, Range(0, 50))  # released code: real CFG ~ U[cfg - 0.5, cfg + 0.5]; the paper: fixed
    t_min: float = knob(0.02, UNIT)
    t_max: float = knob(0.98, UNIT)
    shift: float = knob(1.0, Range(0, 100, above=True))  # generator time shift s t / (1 + (s - 1) t)
    mixed_precision: str = knob("bf16", OneOf(("bf16", "bf16-weights", "no")))  # autocast | bf16, fp32 masters | fp32
    log_every: int = knob(25, Range(1, 10_000_000))
    curve_prompts_per_tag: int = knob(4, Range(1, 10_000))
    checkpoint_every: int = knob(20, EVERY)  # generator steps between resumable checkpoints; 0: none
    max_nonfinite: int = knob(5, Range(1, 1_000_000))  # abort after this many non-finite losses in a row
    gradient_checkpointing: bool = False  # recompute activations in backward (real-scale memory)
    reward_chunk: int = knob(0, Range(0, 4096))  # RL: decode this many samples at a time, recomputed; 0: all at once
    micro_batches: int = knob(1, BATCH)  # each process's part of the batch in this many passes: the same update
    samples_per_prompt: int = knob(1, BATCH)  # each drawn prompt this many times in a row in the batch (a group)
    compile: str = knob("off", OneOf(("off", "inductor", "aot_eager")))  # torch.compile each repeated block
    optimizer: str = knob("adamw", OneOf(("adamw", "adamw8bit")))  # adamw8bit: bitsandbytes, CUDA
    generator_weight_decay: float = knob(0.0, UNIT)  # AdamW's, for the generator (released: 0.01)
    generator_lora: GeneratorLoraParams = field(default_factory=GeneratorLoraParams)  # off: full fine-tuning

    def relations(self):
        yield ("t_min", "t_max"), self.t_min < self.t_max, "t_min must be below t_max"
        yield ("cfg_jitter", "real_cfg"), self.cfg_jitter <= self.real_cfg, \
            "cfg_jitter must be at most real_cfg (a jittered CFG scale below 0)"
        yield ("micro_batches", "batch"), self.batch % self.micro_batches == 0, "micro_batches must divide batch"
        yield ("samples_per_prompt", "batch"), self.batch % self.samples_per_prompt == 0, \
            "samples_per_prompt must divide batch"
        yield ("rtdm.normalise", "samples_per_prompt"), self.rtdm.normalise == "batch" or self.samples_per_prompt > 1, \
            "per-prompt RT-DM weights need several samples of each prompt (samples_per_prompt > 1)"
        grouped = self.rl.weight > 0 and self.rl.loss in ("grpo", "dpo")
        yield ("rl.loss", "samples_per_prompt"), not grouped or self.samples_per_prompt >= 2, \
            f"{self.rl.loss} compares samples of one prompt: samples_per_prompt must be at least 2"
        yield ("rl.loss", "samples_per_prompt"), not (grouped and self.rl.loss == "dpo") or \
            self.samples_per_prompt % 2 == 0, "dpo pairs a prompt's samples: samples_per_prompt must be even"
        yield ("rl.loss", "generator_steps"), not (grouped and self.rl.loss == "grpo") or self.generator_steps >= 2, \
            "grpo's densities are those of the steps between the generator's levels: generator_steps must be at least 2"
        problem = reward_spec_error(self.rl.reward)
        yield ("rl.reward",), problem is None, problem
        asks_class = problem is None and "classifier" in parse_spec(self.rl.reward)
        yield ("rl.reward", "prompts"), not asks_class or self.prompts == "classes", \
            "the classifier reward reads the asked class from the prompt: it needs prompts: classes"


@dataclass
class EvalModel:
    checkpoint: str
    steps: int = knob(rule=Range(1, 1000))
    cfg: float = knob(1.0, CFG)  # <= 1: no guidance (generators never use it)
    kind: str = knob("generator", OneOf(("generator", "teacher")))  # few-step ODE | Euler scheduler


@dataclass
class EvaluateParams:
    images_per_prompt: int = knob(4, Range(1, 64))
    batch: int = knob(256, BATCH)
    models: dict = knob({}, Names(stages=True))  # name -> EvalModel


@dataclass
class QualityParams:
    """Table 6 (the `quality@<model>` stages): each model's samples of every class against renders, in the world
    classifier's features."""
    samples_per_class: int = knob(128, Range(8, 100_000))
    splits: int = knob(8, Range(2, 1000))  # C7's intervals: the metrics of this many disjoint parts, paired
    batch: int = knob(256, BATCH)
    models: dict = knob({}, Names(stages=True))  # name -> EvalModel

    def relations(self):
        yield ("samples_per_class", "splits"), self.samples_per_class % self.splits == 0, \
            "splits must divide samples_per_class (each part holds as many samples of every class)"


@dataclass
class RewardModelParams:
    """Where one real reward model's weights are: a local file or directory, an open_clip pretrained tag ('dfn5b',
    'openai') or a hub id (dmdr.real_rewards.load_real_reward)."""
    checkpoint: str = ""
    arch: str = ""  # open_clip architecture (clip, hps, aesthetic's CLIP); empty: the paper's
    processor: str = ""  # pick: the CLIPProcessor's directory or hub id; empty: the checkpoint's
    clip_checkpoint: str = ""  # aesthetic: the CLIP ViT-L/14 under the head; empty: 'openai'
    train_prompt_prefix: str = ""  # put before each prompt when the reward trains (released HPS: "Realistic photo")


@dataclass
class PresetParams:
    """A real teacher with its training settings: `stage1` and `stage2` override `distill` as recipes do."""
    teacher: str = ""  # a diffusers pipeline directory or hub id
    resolution: int = knob(1024, Range(16, 4096, step=16))  # SD3: a multiple of the VAE's 8 x the patch's 2
    max_sequence_length: int = knob(256, Range(1, 512))  # T5's
    reward_models: dict = knob({})  # reward name -> RewardModelParams
    stage1: dict = knob({})
    stage2: dict = knob({})
    eval_steps: int = knob(28, Range(1, 1000))  # the teacher's sampler for comparison (CFG at stage1.real_cfg)


@dataclass
class RealParams:
    """`python -m dmdr.real`: which preset runs, on which prompts, into which directory."""
    preset: str = "sd3-medium"
    train_prompts: str = ""  # training prompts, one per line
    eval_prompts: str = ""  # prompts whose few-step samples are scored by every reward; empty: none
    out: str = "models/real"
    sample_prompts: int = knob(4, Range(0, 64))  # each logged step: the generator's samples of this many prompts
    log_with: str = ""  # experiment trackers of accelerate for the training curves: tensorboard, wandb, ...


@dataclass
class Params:
    seed: int = knob(0, SEED)
    cpu_threads: int = knob(1, Range(1, 1024))  # torch's CPU threads in every stage after the stand-ins (run_stage.py)
    prompts: PromptsParams = field(default_factory=PromptsParams)
    world: WorldParams = field(default_factory=WorldParams)
    teacher_eps: TeacherParams = field(default_factory=lambda: TeacherParams(prediction="epsilon", timesteps="uniform"))
    distill: DistillParams = field(default_factory=DistillParams)
    rewards: RewardsParams = field(default_factory=RewardsParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    recipes: dict = knob({}, Names(stages=True))  # name -> DistillParams overrides
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    quality: QualityParams = field(default_factory=QualityParams)
    real: RealParams = field(default_factory=RealParams)
    presets: dict = knob({}, Names())  # name -> PresetParams


# --- building and checking ---------------------------------------------------------------------------------------

BOOL_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false"}


def _check_type(key: str, v, t):
    """v as a value of type t (an int is a float where a float is asked), or a ParamsError naming the key."""
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is bool and isinstance(v, str) and v.lower() in BOOL_WORDS:
        fail(key, f"expected true or false, got the string {v!r} (params are read as YAML 1.2, as DVC writes them: "
                  f"there yes/no/on/off are words; write true or false)")
    if t is str and isinstance(v, bool):
        fail(key, f"expected str, got bool {v!r} (a YAML 1.1 reader turns no/off/yes/on into booleans: quote the word, "
                  f"e.g. \"no\")")
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        fail(key, f"expected {t.__name__}, got {type(v).__name__} {v!r}")
    if t is float and not math.isfinite(v):
        fail(key, f"must be a finite number, got {v!r}")
    return v


def _check_field(key: str, v, t, rule):
    if dataclasses.is_dataclass(t):
        return build(t, v, key)
    origin = typing.get_origin(t)
    if origin is list:
        (item,) = typing.get_args(t)
        v = _check_type(key, v, list)
        return [_check_field(f"{key}[{i}]", x, item, rule) for i, x in enumerate(v)]
    v = _check_type(key, v, t)
    if rule is not None and (problem := rule.error(v)):
        fail(key, f"{problem}, got {v!r}" if not isinstance(v, dict) else problem)
    return v


def build(cls, data, key: str = ""):
    """Instantiate dataclass `cls` from a dict, checking every key, type, range and relation; errors name the key."""
    if not isinstance(data, dict):
        fail(key or "params", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    at = f"{key}." if key else ""
    for k in data:
        if k not in fields:
            fail(f"{at}{k}", f"unknown key (known: {', '.join(sorted(fields))})")
    values = {name: _check_field(f"{at}{name}", data[name], hints[name], f.metadata.get("rule"))
              for name, f in fields.items() if name in data}
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        fail(f"{at}{missing[0]}", "required")
    obj = cls(**values)
    for keys, holds, why in getattr(obj, "relations", lambda: ())():
        if not holds:
            here = ", ".join(f"{k} = {_value_at(obj, k)!r}" for k in keys)
            fail(", ".join(f"{at}{k}" for k in keys), f"{why} (here {here})")
    return obj


def _value_at(obj, dotted_key: str):
    for k in dotted_key.split("."):
        obj = obj[k] if isinstance(obj, dict) else getattr(obj, k)
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dotted(nested: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: a nested dict's leaves under the dotted keys `overrides` takes."""
    out = {}
    for k, v in nested.items():
        out |= dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


TEACHER = "models/world/teacher"
TEACHER_EPS = "models/teacher_eps"  # the epsilon teacher (stage teacher_eps)
TEACHERS = (TEACHER, TEACHER_EPS)
DISTILL_DIR = "models/distill/"
REWARD_NAMES = ("clip", "hps", "pick", "aesthetic", "classifier")  # classifier: the embedded world's (Table 6)
# keys of `distill` that `python -m dmdr.real` does not read in a preset's stages: refused there, not ignored
UNREAD_BY_REAL = {"init": "stage 2 starts from stage 1, stage 1 from the teacher",
                  "real": "the real score is the preset's teacher", "seed": "the run's seed is the top-level seed",
                  "curve_prompts_per_tag": "a real run shows samples of real.sample_prompts prompts instead"}


def reward_spec_error(spec: str) -> str | None:
    """Why 'hps', 'clip+hps' or '0.5*clip+hps' is not a sum of known rewards with finite non-negative weights."""
    for term in spec.split("+"):
        w, _, name = term.strip().rpartition("*")
        if name not in REWARD_NAMES:
            return f"unknown reward {name!r} in {spec!r} (known: {', '.join(REWARD_NAMES)})"
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            return f"bad weight {w!r} in {spec!r} (a finite number >= 0)"
    return None


def check_reward_spec(spec: str, key: str) -> None:
    if problem := reward_spec_error(spec):
        fail(key, problem)


def parent(p: Params, name: str) -> str | None:
    """The recipe whose checkpoint recipe `name` starts from (None: a teacher)."""
    init = (p.recipes[name] or {}).get("init", TEACHER)
    if init in TEACHERS:
        return None
    if not isinstance(init, str) or not init.startswith(DISTILL_DIR) or init[len(DISTILL_DIR):] not in p.recipes:
        fail(f"recipes.{name}.init", f"{init!r} is neither a teacher ({', '.join(TEACHERS)}) nor "
                                     f"{DISTILL_DIR}<recipe> of a recipe in params.yaml")
    return init[len(DISTILL_DIR):]


def teacher_of(p: Params, name: str) -> str:
    """The teacher a recipe's lineage distils (TEACHER or TEACHER_EPS): its first recipe's init."""
    while (up := parent(p, name)) is not None:
        name = up
    return (p.recipes[name] or {}).get("init", TEACHER)


def recipe(p: Params, name: str) -> DistillParams:
    if name not in p.recipes:
        fail(f"recipes.{name}", f"no such recipe (known: {', '.join(sorted(p.recipes))})")
    if not isinstance(p.recipes[name], dict) or "init" not in p.recipes[name]:
        fail(f"recipes.{name}.init", f"required (the checkpoint it starts from: a teacher, {' or '.join(TEACHERS)}, or "
                                     f"{DISTILL_DIR}<recipe>; dvc.yaml makes it a dependency)")
    seen = [name]
    while (up := parent(p, seen[-1])) is not None:
        if up in seen:
            fail(f"recipes.{name}.init", f"a cycle of recipes: {' -> '.join(seen + [up])}")
        seen.append(up)
    return build(DistillParams, deep_merge(dataclasses.asdict(p.distill), p.recipes[name]), f"recipes.{name}")


def preset(p: Params, name: str) -> tuple[PresetParams, DistillParams, DistillParams]:
    """A real preset and its two stages (each `distill` with the stage's overrides), checked."""
    if name not in p.presets:
        fail(f"presets.{name}", f"no such preset (known: {', '.join(sorted(p.presets))})")
    key = f"presets.{name}"
    pre = build(PresetParams, p.presets[name], key)
    if not pre.teacher:
        fail(f"{key}.teacher", "required (a diffusers pipeline directory or hub id)")
    for reward, where in pre.reward_models.items():
        check_reward_spec(reward, f"{key}.reward_models")
        if reward == "classifier":
            fail(f"{key}.reward_models.classifier", "the classifier reward is the embedded world's (Table 6); a real "
                                                     "preset's rewards are clip, hps, pick and aesthetic")
        build(RewardModelParams, where, f"{key}.reward_models.{reward}")
    stages = []
    for stage in ("stage1", "stage2"):
        for k in getattr(pre, stage):
            if k in UNREAD_BY_REAL:
                fail(f"{key}.{stage}.{k}", f"not read by python -m dmdr.real ({UNREAD_BY_REAL[k]}): remove it")
        cfg = build(DistillParams, deep_merge(dataclasses.asdict(p.distill), getattr(pre, stage)), f"{key}.{stage}")
        if cfg.rl.weight > 0 or cfg.rtdm.enabled:
            for r in parse_spec(cfg.rl.reward, f"{key}.{stage}.rl.reward"):
                if r not in pre.reward_models:
                    fail(f"{key}.{stage}.rl.reward", f"{r!r} has no entry in {key}.reward_models")
        stages.append(cfg)
    return pre, *stages


def parse_spec(spec: str, key: str = "reward") -> dict[str, float]:
    """'hps' -> {hps: 1}; 'clip+hps' -> {clip: 1, hps: 1}; '0.5*clip+hps' -> {clip: 0.5, hps: 1}; errors name `key`."""
    check_reward_spec(spec, key)
    out = {}
    for term in spec.split("+"):
        w, _, name = term.strip().rpartition("*")
        out[name] = float(w) if w else 1.0
    return out


def extra_prompt_file(p: Params, name: str) -> str:
    if name not in p.prompts.extra_files:
        fail(f"prompts.extra_files.{name}", f"no such prompt file (known: {', '.join(sorted(p.prompts.extra_files))})")
    return p.prompts.extra_files[name]


def eval_model(p: Params, name: str, section: str = "evaluate") -> EvalModel:
    """Model entry `name` of `section`.models (evaluate or quality), checked."""
    models = getattr(p, section).models
    if name not in models:
        fail(f"{section}.models.{name}", f"no such model (known: {', '.join(sorted(models))})")
    m = build(EvalModel, models[name], f"{section}.models.{name}")
    if m.checkpoint.startswith(DISTILL_DIR) and m.checkpoint[len(DISTILL_DIR):] not in p.recipes:
        fail(f"{section}.models.{name}.checkpoint", f"{m.checkpoint!r} names no recipe of params.yaml")
    return m


def read_yaml(text: str):
    """YAML 1.2, as DVC reads and writes params files (a duplicate key is an error, not the last one silently)."""
    return YAML(typ="safe", pure=True).load(text)


def yaml_problem(e: YAMLError) -> tuple[int | None, str]:
    """The 1-based line and the one-line reason of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    return (mark.line + 1 if mark is not None else None), problem


def overrides(assignments: list[str]) -> dict:
    """`KEY=VALUE` assignments (dotted keys, YAML values), as `dvc exp run -S` takes them, as one nested dict:
    ['presets.sd3-medium.stage1.optimizer=adamw'] -> {'presets': {'sd3-medium': {'stage1': {'optimizer': 'adamw'}}}}."""
    out: dict = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq or not key.strip() or any(not k for k in key.strip().split(".")):
            raise ParamsError(f"--set {a}: expected KEY=VALUE with a dotted KEY")
        *parents, last = key.strip().split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {a}: {k} is set to a value and to a mapping")
        try:
            node[last] = read_yaml(value)
        except YAMLError as e:
            raise ParamsError(f"--set {a}: the value is not valid YAML ({yaml_problem(e)[1]})") from None
    return out


def _nested(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` are one key, or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _where_set(path: Path, key: str, changes: dict) -> str:
    """Where the bad value of `key` came from, for the error: a --set assignment, or a change to the params file
    since its last commit (an edit, or `dvc exp run -S`, which writes its changes into the file)."""
    for k, v in dotted(changes).items():
        if _nested(k, key):
            return f" (from --set {k}={v})"
    try:
        committed = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True,
                                   text=True, timeout=10)
        before = dotted(read_yaml(committed.stdout) or {}) if committed.returncode == 0 else None
        now = dotted(read_yaml(path.read_text()) or {})
    except (OSError, subprocess.SubprocessError, YAMLError):
        return ""
    if before is None:
        return ""
    changed = [k for k in sorted(now.keys() | before.keys()) if now.get(k) != before.get(k) and _nested(k, key)]
    if not changed:
        return ""
    k = changed[0]
    was = f"the committed {path.name} has {before[k]!r}" if k in before else f"it is not in the committed {path.name}"
    return f" (changed since the last commit: {k} = {now.get(k, '(removed)')!r}, set by an edit or by `dvc exp run -S " \
           f"{k}=...`; {was})"


def load(path: str | Path = "params.yaml", changes: dict | None = None) -> Params:
    """params.yaml, with `changes` (a nested dict, see `overrides`) merged over it, checked as a whole."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except YAMLError as e:
        line, problem = yaml_problem(e)
        raise ParamsError(f"{path}{f':{line}' if line else ''}: not valid YAML ({problem})") from None
    try:
        p = build(Params, deep_merge(raw, changes or {}) if isinstance(raw, dict) else raw)
        for name in p.recipes:  # validate every recipe and model entry up front
            recipe(p, name)
        for section in ("evaluate", "quality"):
            for name in getattr(p, section).models:
                eval_model(p, name, section)
        for name in p.presets:
            preset(p, name)
    except ParamsError as e:
        where = _where_set(path, e.key.split(", ")[0], changes or {}) if e.key else ""
        raise ParamsError(f"{path}: {e}{where}", e.key) from None
    return p
