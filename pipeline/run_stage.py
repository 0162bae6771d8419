"""Run one pipeline stage: validate params.yaml, then execute the stage's notebook with papermill.

    python pipeline/run_stage.py STAGE [NAME]

STAGE is a notebook under notebooks/ (prompts, world, distill, evaluate, quality, report); NAME picks the recipe or model of
a foreach stage. The executed notebook, with its outputs and plots, is written to runs/STAGE[-NAME].ipynb.

Nothing computed is lost to a bad parameter or a failed run (dmdr.stage_outputs): every knob is checked before
anything is touched; the stage's outputs (declared `persist: true` in dvc.yaml, so DVC leaves them in place) are
set aside, and put back unless the run succeeds, also after a kill, at the next start; one run of a stage at a time.

Every stage but the committed stand-ins computes with `cpu_threads` (params.yaml) torch threads: floating-point
order, and so every number, depends on the thread count, which must not depend on the machine or on how many stages
run at once (pipeline/repro.py). The stand-ins keep torch's default (all cores), with which they were trained.
"""
import os
import sys
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from dmdr import config, stage_outputs  # noqa: E402

ALL_CORES = {"world", "teacher_eps", "classifier"}  # the stand-ins: trained with torch's default threads


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    stage, name = argv[0], (argv[1] if len(argv) > 1 else "")
    notebook = ROOT / "notebooks" / f"{stage}.ipynb"
    if not notebook.exists():
        print(f"no notebook for stage {stage!r}: {notebook} does not exist", file=sys.stderr)
        return 2
    try:  # every knob checked before any compute
        p = config.load(ROOT / "params.yaml")
        if stage == "distill":
            config.recipe(p, name)
        elif stage in ("evaluate", "quality"):
            config.eval_model(p, name, stage)
        elif stage == "extra_prompts":
            config.extra_prompt_file(p, name)
    except config.ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    if stage not in ALL_CORES:  # the kernel's torch reads these at its start
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(p.cpu_threads)
    label = f"{stage}@{name}" if name else stage
    out = ROOT / "runs" / (f"{stage}-{name}.ipynb" if name else f"{stage}.ipynb")
    try:
        with stage_outputs.one_run_at_a_time(ROOT, label), \
                stage_outputs.replaced_on_success(ROOT, label, stage_outputs.declared(ROOT, label), out):
            out.parent.mkdir(exist_ok=True)
            papermill.execute_notebook(str(notebook), str(out), parameters={"name": name, "params_file": "params.yaml"},
                                       cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=True)
    except stage_outputs.StageBusy as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
