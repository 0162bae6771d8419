"""params.yaml: typed, validated on load, before any compute.

Every key is checked against the dataclasses below: an unknown key, a wrong type
or an out-of-range value is a `ParamsError` naming the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ParamsError(ValueError):
    pass


@dataclass
class PromptsParams:
    n_train: int = 2000
    test_per_tag: int = 24
    n_test_dense: int = 96
    extra_files: list = field(default_factory=list)  # real prompt files to convert, e.g. GenEval metadata


@dataclass
class ClipConfig:
    """The tiny CLIP's architecture (saved with its weights)."""
    embed_dim: int = 64
    width: int = 64
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    patch_size: int = 4
    image_size: int = 32
    context_length: int = 24


@dataclass
class ClipParams(ClipConfig):
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3


@dataclass
class VaeParams:
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    check_renders: int = 400  # renders whose reconstruction is parsed (vae_reconstruction_parse_exact)


@dataclass
class TeacherParams:
    backbone: str = "unet"  # unet | sd3
    channels: list = field(default_factory=lambda: [32, 64])
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    timesteps: str = "logit_normal"  # logit_normal | uniform
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    pool_size: int = 60000
    mixed_precision: str = "bf16"  # bf16 | no
    eval_every: int = 1000
    eval_prompts_per_tag: int = 8
    eval_steps: int = 25
    cfg: float = 3.0


@dataclass
class WorldParams:
    clip: ClipParams = field(default_factory=ClipParams)
    clip_eval_seed: int = 1  # the independent CLIP of the clip_score metric
    vae: VaeParams = field(default_factory=VaeParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    checkpoint_every: int = 500  # steps between resumable checkpoints of each stand-in (checkpoints/world/); 0: none


@dataclass
class RewardsParams:
    """The reward models' training (the `rewards` stage): gold-labelled pairs with label noise."""
    prompts: int = 800  # train prompts whose candidates make the pairs (first half: hps, second half: pick)
    steps: int = 300
    batch: int = 64  # pairs per step
    lr: float = 1e-4
    hps_label_noise: float = 0.1
    pick_label_noise: float = 0.2
    aesthetic_label_noise: float = 0.1


@dataclass
class RtdmParams:
    """RT-DM (Eq. 4): per-sample DMD weights from the reward of the sample's full few-step output."""
    enabled: bool = False
    beta: float = 0.05  # temperature of the tilt p_real(x) exp(r(x) / beta)
    form: str = "exp"  # exp: w = B softmax(r / beta) | reward: w = r / mean(r) (the paper's "reward as weight")
    tilt_fake: bool = False  # also train the fake score on exp(-r / beta)-weighted samples: the exact tilted optimum


@dataclass
class DynaDGParams:
    """DynaDG: a LoRA in the real-score estimator, trained on generator samples, its scale annealed to 0."""
    form: str = "off"  # off | paper (own LoRA on the real score; full-copy fake) | released (one shared LoRA copy)
    rank: int = 8
    scale: float = 1.0  # the real score's LoRA scale at step 0 (released: 0.5)
    fake_scale: float = 2.0  # released form: the fake score is the same model at this LoRA scale
    lr: float = 1.0e-4
    steps: int = 100  # K: scale = scale * 0.5 (1 + cos(pi step / K)), 0 after K


@dataclass
class DynaRSParams:
    """DynaRS: renoise levels t ~ Beta(a, b) (biased to high noise), annealed to uniform over K steps."""
    enabled: bool = False
    a: float = 4.0
    b: float = 1.5
    steps: int = 100


@dataclass
class RLParams:
    """Stage 2 (Eq. 3): L = dmd_weight * L_DMD + weight * L_RL, ReFL through the generator's one-step x0."""
    weight: float = 0.0  # lambda; 0: no RL
    loss: str = "refl"  # refl: -r (the paper) | hinge: relu(margin - r) (released code)
    margin: float = 0.7
    reward: str = "hps"  # a reward or weighted sum: clip | hps | pick | aesthetic | clip+hps | 0.5*clip+hps


@dataclass
class GeneratorLoraParams:
    """The generator as a LoRA on a frozen copy of its start (released SD3 scripts: rank 64, alpha 128)."""
    enabled: bool = False
    rank: int = 64
    alpha: float = 128.0


@dataclass
class DistillParams:
    """One training run; recipes override these."""
    init: str = "models/world/teacher"  # where the generator (and fake score) start: the teacher or models/distill/<recipe>
    real: str = "teacher"  # the real score: teacher (the world's) | init (the init checkpoint, e.g. an RL-tuned teacher)
    seed: int = 0  # added to the global seed (repeat a recipe over seeds)
    dmd_weight: float = 1.0  # 0: RL alone (no fake score, no distillation loss)
    generator_cfg: float = 1.0  # > 1: the generator itself samples with CFG (multi-step RL on the teacher)
    rollout: str = "renoise"  # renoise: DMD2 backward simulation | trajectory: ReFL, stop at a late step of the ODE
    rollout_reuse: bool = False  # the generator update reuses the last fake update's rollout (released) | a fresh one
    rtdm: RtdmParams = field(default_factory=RtdmParams)
    dynadg: DynaDGParams = field(default_factory=DynaDGParams)
    dynars: DynaRSParams = field(default_factory=DynaRSParams)
    rl: RLParams = field(default_factory=RLParams)
    generator_steps: int = 4
    steps: int = 200  # generator updates
    batch: int = 32
    generator_lr: float = 1e-4
    fake_lr: float = 1e-4
    ttur: int = 5  # fake-score updates per generator update
    real_cfg: float = 3.0
    cfg_jitter: float = 0.0  # released code: real CFG ~ U[cfg - 0.5, cfg + 0.5]; the paper: fixed
    t_min: float = 0.02
    t_max: float = 0.98
    shift: float = 1.0  # generator time shift s t / (1 + (s - 1) t)
    mixed_precision: str = "bf16"  # bf16 (autocast, fp32 trained weights) | bf16-weights (bf16, fp32 masters) | no
    log_every: int = 25
    curve_prompts_per_tag: int = 4
    checkpoint_every: int = 20  # generator steps between resumable checkpoints (checkpoints/<recipe>/); 0: none
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row (each one skips its step)
    gradient_checkpointing: bool = False  # recompute activations in backward (real-scale memory)
    reward_chunk: int = 0  # RL: decode this many samples at a time, recomputed in backward; 0: all at once
    micro_batches: int = 1  # each process's part of the batch in this many passes, gradients summed: the same update
    compile: str = "off"  # inductor: torch.compile each repeated block of the models (GPUs) | aot_eager (checks)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA)
    generator_weight_decay: float = 0.0  # AdamW's, for the generator (released: 0.01; the fake score's is 0)
    generator_lora: GeneratorLoraParams = field(default_factory=GeneratorLoraParams)  # off: full fine-tuning


@dataclass
class EvalModel:
    checkpoint: str
    steps: int
    cfg: float = 1.0  # <= 1: no guidance (generators never use it)
    kind: str = "generator"  # generator (few-step ODE) | teacher (Euler scheduler)


@dataclass
class EvaluateParams:
    images_per_prompt: int = 4
    batch: int = 256
    models: dict = field(default_factory=dict)  # name -> EvalModel


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
    resolution: int = 1024
    max_sequence_length: int = 256
    reward_models: dict = field(default_factory=dict)  # reward name -> RewardModelParams
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    eval_steps: int = 28  # the teacher's sampler for comparison (CFG at stage1.real_cfg)


@dataclass
class RealParams:
    """`python -m dmdr.real`: which preset runs, on which prompts, into which directory."""
    preset: str = "sd3-medium"
    train_prompts: str = ""  # training prompts, one per line
    eval_prompts: str = ""  # prompts whose few-step samples are scored by every reward; empty: none
    out: str = "models/real"
    sample_prompts: int = 4  # each logged step: the generator's samples of this many prompts saved as one PNG
    log_with: str = ""  # experiment trackers of accelerate for the training curves: tensorboard, wandb, ... (comma-separated)


@dataclass
class Params:
    seed: int = 0
    prompts: PromptsParams = field(default_factory=PromptsParams)
    world: WorldParams = field(default_factory=WorldParams)
    distill: DistillParams = field(default_factory=DistillParams)
    rewards: RewardsParams = field(default_factory=RewardsParams)
    recipes: dict = field(default_factory=dict)  # name -> DistillParams overrides
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    real: RealParams = field(default_factory=RealParams)
    presets: dict = field(default_factory=dict)  # name -> PresetParams


POSITIVE = {"steps", "batch", "lr", "resolution", "max_sequence_length", "eval_steps", "n_train", "test_per_tag",
            "generator_lr", "fake_lr", "ttur", "generator_steps",
            "images_per_prompt", "log_every", "eval_every", "pool_size", "width", "embed_dim", "heads", "layers"}
CHOICES = {"backbone": ("unet", "sd3"), "timesteps": ("logit_normal", "uniform"), "mixed_precision": ("bf16", "bf16-weights", "no"),
           "kind": ("generator", "teacher"),
           "loss": ("refl", "hinge"), "optimizer": ("adamw", "adamw8bit"), "real": ("teacher", "init"),
           "rollout": ("renoise", "trajectory"), "compile": ("off", "inductor", "aot_eager")}
UNIT_INTERVAL = {"cfg_dropout", "ema_decay", "t_min", "t_max", "hps_label_noise", "pick_label_noise",
                 "aesthetic_label_noise"}
NON_NEGATIVE = {"weight", "dmd_weight", "scale", "fake_scale", "seed", "checkpoint_every", "generator_weight_decay",
                "reward_chunk", "sample_prompts"}
POSITIVE |= {"beta", "rank", "alpha", "a", "b", "prompts", "max_nonfinite", "micro_batches"}
FORMS = {"rtdm": ("exp", "reward"), "dynadg": ("off", "paper", "released")}


def _check_value(key: str, name: str, value):
    parent = key.rsplit(".", 2)[-2] if key.count(".") else ""
    if name == "form" and parent in FORMS:
        if value not in FORMS[parent]:
            raise ParamsError(f"{key}: must be one of {FORMS[parent]}, got {value!r}")
        return
    if name == "mixed_precision" and value == "bf16-weights" and key.startswith("world."):
        raise ParamsError(f"{key}: bf16-weights is a mode of the distillation loop; the world's models take bf16 or no")
    if name in POSITIVE and value <= 0:
        raise ParamsError(f"{key}: must be positive, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ParamsError(f"{key}: must be one of {CHOICES[name]}, got {value!r}")
    if name in UNIT_INTERVAL and not 0 <= value <= 1:
        raise ParamsError(f"{key}: must lie in [0, 1], got {value!r}")
    if name in NON_NEGATIVE and value < 0:
        raise ParamsError(f"{key}: must be >= 0, got {value!r}")


def build(cls, data, key: str = ""):
    """Instantiate dataclass `cls` from a dict, checking every key, type and range; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{key or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ParamsError(f"{key + '.' if key else ''}{k}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        k, v, t = f"{key + '.' if key else ''}{f.name}", data[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = build(t, v, k)
        elif t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif t in (int, float, str, bool, list, dict) and (not isinstance(v, t) or (t is int and isinstance(v, bool))):
            raise ParamsError(f"{k}: expected {t.__name__}, got {type(v).__name__} {v!r}")
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            _check_value(k, f.name, v)
        values[f.name] = v
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ParamsError(f"{key}: {e}") from None


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
DISTILL_DIR = "models/distill/"
REWARD_NAMES = ("clip", "hps", "pick", "aesthetic")


def check_reward_spec(spec: str, key: str) -> None:
    """'hps', 'clip+hps' or '0.5*clip+hps': every term a known reward with a non-negative weight."""
    for term in spec.split("+"):
        w, _, name = term.strip().rpartition("*")
        if name not in REWARD_NAMES:
            raise ParamsError(f"{key}: unknown reward {name!r} in {spec!r} (known: {', '.join(REWARD_NAMES)})")
        try:
            if w and float(w) < 0:
                raise ValueError
        except ValueError:
            raise ParamsError(f"{key}: bad weight {w!r} in {spec!r}") from None


def parent(p: Params, name: str) -> str | None:
    """The recipe whose checkpoint recipe `name` starts from (None: the world's teacher)."""
    init = (p.recipes[name] or {}).get("init", TEACHER)
    if init == TEACHER:
        return None
    if not init.startswith(DISTILL_DIR) or init[len(DISTILL_DIR):] not in p.recipes:
        raise ParamsError(f"recipes.{name}.init: {init!r} is neither {TEACHER} nor {DISTILL_DIR}<recipe> of a "
                          f"recipe in params.yaml")
    return init[len(DISTILL_DIR):]


def recipe(p: Params, name: str) -> DistillParams:
    if name not in p.recipes:
        raise ParamsError(f"recipes.{name}: no such recipe (known: {', '.join(sorted(p.recipes))})")
    if not isinstance(p.recipes[name], dict) or "init" not in p.recipes[name]:
        raise ParamsError(f"recipes.{name}.init: required (the checkpoint it starts from: {TEACHER} or "
                          f"{DISTILL_DIR}<recipe>; dvc.yaml makes it a dependency)")
    seen = [name]
    while (up := parent(p, seen[-1])) is not None:
        if up in seen:
            raise ParamsError(f"recipes.{name}.init: a cycle of recipes: {' -> '.join(seen + [up])}")
        seen.append(up)
    cfg = build(DistillParams, deep_merge(dataclasses.asdict(p.distill), p.recipes[name]), f"recipes.{name}")
    check_reward_spec(cfg.rl.reward, f"recipes.{name}.rl.reward")
    return cfg


def preset(p: Params, name: str) -> tuple[PresetParams, DistillParams, DistillParams]:
    """A real preset and its two stages (each `distill` with the stage's overrides), checked."""
    if name not in p.presets:
        raise ParamsError(f"presets.{name}: no such preset (known: {', '.join(sorted(p.presets))})")
    key = f"presets.{name}"
    pre = build(PresetParams, p.presets[name], key)
    if not pre.teacher:
        raise ParamsError(f"{key}.teacher: required (a diffusers pipeline directory or hub id)")
    for reward, where in pre.reward_models.items():
        check_reward_spec(reward, f"{key}.reward_models")
        build(RewardModelParams, where, f"{key}.reward_models.{reward}")
    stages = []
    for stage in ("stage1", "stage2"):
        cfg = build(DistillParams, deep_merge(dataclasses.asdict(p.distill), getattr(pre, stage)), f"{key}.{stage}")
        if cfg.rl.weight > 0 or cfg.rtdm.enabled:
            for r in parse_spec(cfg.rl.reward, f"{key}.{stage}.rl.reward"):
                if r not in pre.reward_models:
                    raise ParamsError(f"{key}.{stage}.rl.reward: {r!r} has no entry in {key}.reward_models")
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


def eval_model(p: Params, name: str) -> EvalModel:
    if name not in p.evaluate.models:
        raise ParamsError(f"evaluate.models.{name}: no such model (known: {', '.join(sorted(p.evaluate.models))})")
    m = build(EvalModel, p.evaluate.models[name], f"evaluate.models.{name}")
    if m.checkpoint.startswith(DISTILL_DIR) and m.checkpoint[len(DISTILL_DIR):] not in p.recipes:
        raise ParamsError(f"evaluate.models.{name}.checkpoint: {m.checkpoint!r} names no recipe of params.yaml")
    return m


def overrides(assignments: list[str]) -> dict:
    """`KEY=VALUE` assignments (dotted keys, YAML values), as `dvc exp run -S` takes them, as one nested dict:
    ['presets.sd3-medium.stage1.optimizer=adamw'] -> {'presets': {'sd3-medium': {'stage1': {'optimizer': 'adamw'}}}}."""
    out: dict = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq or not key.strip() or any(not k for k in key.strip().split(".")):
            raise ParamsError(f"{a!r}: expected KEY=VALUE with a dotted KEY")
        *parents, last = key.strip().split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{a!r}: {k} is set to a value and to a mapping")
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ParamsError(f"{a!r}: the value is not valid YAML ({e})") from None
    return out


def load(path: str | Path = "params.yaml", changes: dict | None = None) -> Params:
    """params.yaml, with `changes` (a nested dict, see `overrides`) merged over it, checked as a whole."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    try:
        p = build(Params, deep_merge(raw, changes or {}))
        for name in p.recipes:  # validate every recipe and model entry up front
            recipe(p, name)
        for name in p.evaluate.models:
            eval_model(p, name)
        for name in p.presets:
            preset(p, name)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    return p
