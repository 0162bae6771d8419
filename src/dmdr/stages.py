"""The pipeline's stages, one function each: what the notebooks of dvc.yaml call. Each reads its part of the params,
writes its outputs and returns what its notebook shows. The library underneath knows no stage."""
from __future__ import annotations

from pathlib import Path

PROMPTS = Path("data/prompts")


def prompts(p, out: Path = PROMPTS, metrics: Path = Path("results/metrics")) -> dict:
    """The train and test prompt sets from the world's grammar, and the world's parser checked on random renders
    (clean and mildly corrupted)."""
    from .files import write_json
    from .prompts import build_prompt_sets
    from .world.parse import scene_exact_rate
    counts = build_prompt_sets(p, out)
    write_json(counts, metrics / "prompts.json")
    parser = {"clean_scene_exact": scene_exact_rate(300, seed=p.seed),
              "mild_corruption_scene_exact": scene_exact_rate(300, seed=p.seed + 1, corrupt=True), "scenes": 300}
    write_json(parser, metrics / "parser.json")
    return {"prompts": counts, "parser": parser}


def extra_prompts(p, name: str) -> dict:
    """A real prompt file of prompts.extra_files, converted to one prompt a line."""
    from .prompts import convert_prompt_file
    return convert_prompt_file(p.prompts.extra_files[name], Path("data/extra_prompts") / f"{name}.txt",
                               Path("results/extra_prompts") / f"{name}.json")


def world(p, prompt_dir: Path = PROMPTS) -> dict:
    """The world's stand-ins: the CLIPs, the VAE and the teacher (dmdr.standins.build_world)."""
    from .prompts import test_specs
    from .standins import build_world
    eval_specs = test_specs(prompt_dir, p.world.teacher.eval_prompts_per_tag)
    return build_world(p, eval_specs, Path("models/world"), Path("results/metrics/world.json"),
                       Path("results/curves/teacher.csv"))


def teacher_eps(p, prompt_dir: Path = PROMPTS) -> dict:
    """The epsilon teacher on the world's latents (dmdr.standins.build_teacher_eps)."""
    from .config import TEACHER_EPS
    from .prompts import test_specs
    from .standins import build_teacher_eps
    eval_specs = test_specs(prompt_dir, p.teacher_eps.eval_prompts_per_tag)
    return build_teacher_eps(p, eval_specs, Path("models/world"), Path(TEACHER_EPS),
                             Path("results/metrics/teacher_eps.json"), Path("results/curves/teacher-eps.csv"))


def classifier(p, out: Path = Path("models/classifier"),
               metrics_path: Path = Path("results/metrics/classifier.json")) -> dict:
    """The world classifier of Table 6 (dmdr.classifier): a linear probe on the independent CLIP, trained on renders
    of the class-conditional world."""
    import time
    from .classifier import train_classifier
    from .files import write_json
    from .tiny_clip import TinyClip
    from .class_world import CLASSES
    start = time.time()
    c = p.classifier
    model, info = train_classifier(TinyClip.load(Path("models/world/clip_eval")), p.seed, c.steps, c.batch, c.lr)
    model.save(out)
    metrics = {"accuracy": info["accuracy"], "classes": len(CLASSES), "minutes": round((time.time() - start) / 60, 2)}
    write_json(metrics, metrics_path)
    return metrics


def rewards(p, prompt_dir: Path = PROMPTS, out: Path = Path("models/rewards"),
            metrics_path: Path = Path("results/metrics/rewards.json")) -> dict:
    """The world's second half: the hps, pick and aesthetic analogues trained on gold-labelled pairs of the
    teacher's samples (dmdr.rewards.build_rewards)."""
    from .prompts import load_prompts, test_specs
    from .rewards import build_rewards
    from .standins import World
    from .world import grammar
    train_specs = [grammar.read(t) for t in load_prompts(prompt_dir / "train.txt")]
    return build_rewards(p, World.load(), train_specs, test_specs(prompt_dir), out, metrics_path)


def distill(p, name: str, prompt_dir: Path = PROMPTS, out: Path = Path("models/distill"),
            curves: Path = Path("results/curves"), checkpoints: Path = Path("checkpoints")) -> list[dict]:
    """One recipe on its lineage's teacher, the flow or the epsilon one (dmdr.distill.distill_stage): trained from
    its init checkpoint on the train prompts (or, with prompts: classes, the 18 class captions), with curves on
    held-out and train prompts; the generator (and fake score) saved as diffusers model directories with the sampler
    settings (sampler.json) and training record. The curve's per-image values go to results/curves/<recipe>.npz
    (evaluation.write_curve_scores). Returns the curve's rows."""
    from . import resume
    from .config import TEACHER, TEACHERS, recipe, teacher_of
    from .distill import distill_stage, training_record
    from .embedded import WorldTeacher
    from .evaluation import curve_metrics, write_curve_scores
    from .models import load_backbone, require_dir
    from .prompts import load_prompts, load_records, test_specs
    from .rewards import load_reward
    from .standins import World
    from .world import grammar

    cfg = recipe(p, name)
    world = World.load()
    root = teacher_of(p, name)  # the lineage's teacher: the flow teacher or the epsilon teacher
    teacher = WorldTeacher.load(world, Path(root))
    start = start_fake = None
    if cfg.init not in TEACHERS:
        init = require_dir(Path(cfg.init), f"recipe {name}'s init")
        start = teacher.wrap(load_backbone(init, world.latent_shape))
        if (init / "fake").is_dir():
            start_fake = teacher.wrap(load_backbone(init / "fake", world.latent_shape))
    reward = load_reward(cfg.rl.reward)
    if cfg.prompts == "classes":  # Table 6: the 18 class captions are what it trains on and what its curve samples
        from .class_world import CAPTIONS
        train_prompts, specs, dense = list(CAPTIONS), [grammar.read(t) for t in CAPTIONS], []
    else:
        specs = test_specs(prompt_dir, cfg.curve_prompts_per_tag)
        dense = [grammar.read(r["prompt"])
                 for r in load_records(prompt_dir / "test_dpg.csv")][: 6 * cfg.curve_prompts_per_tag]
        train_prompts = load_prompts(prompt_dir / "train.txt")
    seed = p.seed + cfg.seed

    per_step = {}  # step -> per-image values, written beside the curve (a resumed run has only its own steps)

    times = teacher.generator_times(cfg.generator_steps, cfg.shift)

    def curve_fn(generator, step):
        row, per_step[step] = curve_metrics(world, generator, times, specs, seed, dense, reward,
                                            train_prompts[: len(specs)])
        write_curve_scores(per_step, curves / f"{name}.npz")
        return row

    # the epsilon teacher is read beside its lineage's init (a dependency of the lineage's first recipe, whose
    # output each later recipe depends on)
    inits = [Path(x) for x in dict.fromkeys((root, cfg.init)) if x != TEACHER]
    read = [Path("models/world"), Path("models/rewards")] + inits
    record = training_record(cfg, seed, train_prompts, recipe=name, world=resume.files_fingerprint(*read[:2]),
                             init=cfg.init if cfg.init == TEACHER else resume.files_fingerprint(*read[2:]))
    *_, rows = distill_stage(cfg, teacher, train_prompts, seed, out / name, checkpoints / name, reward, start,
                             start_fake, curve_fn=curve_fn, curve_path=curves / f"{name}.csv",
                             run_identity=resume.files_fingerprint(*read), recipe=name, record=record)
    return rows


def evaluate(p, name: str) -> dict:
    """One model's samples of every test prompt, scored (dmdr.evaluation.evaluate)."""
    from .evaluation import evaluate as scored
    return scored(p, name)


def quality(p, name: str) -> dict:
    """One model's Table 6 row: samples of every class against renders in the world classifier's features
    (dmdr.quality_eval.evaluate_quality)."""
    from .quality_eval import evaluate_quality
    return evaluate_quality(p, name)


def report(p) -> dict:
    """Tables, figures, claims and the README's results section (dmdr.report.build)."""
    from .report import build
    return build(p)
