"""The pipeline's runners: pipeline/run_stage.py gives each stage its thread count, pipeline/repro.py runs stages
side by side where the graph allows and stops cleanly at a failure."""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage, name, threads", [("distill", "dmd2-4", "1"), ("evaluate", "dmdr-4", "1"),
                                                  ("world", "", None), ("classifier", "", None)])
def test_a_stage_computes_with_cpu_threads_and_a_stand_in_with_all_cores(monkeypatch, stage, name, threads):
    run_stage = load("run_stage")
    seen = {}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_stage.papermill, "execute_notebook",
                        lambda *a, **k: seen.update(omp=os.environ.get("OMP_NUM_THREADS"),
                                                    mkl=os.environ.get("MKL_NUM_THREADS")))
    nothing = lambda *a, **k: contextlib.nullcontext()  # noqa: E731  (the repository's own outputs stay untouched)
    monkeypatch.setattr(run_stage.stage_outputs, "one_run_at_a_time", nothing)
    monkeypatch.setattr(run_stage.stage_outputs, "replaced_on_success", nothing)
    monkeypatch.setattr(run_stage.stage_outputs, "declared", lambda *a: [])
    assert run_stage.main([stage, name] if name else [stage]) == 0
    assert seen == {"omp": threads, "mkl": threads}


def test_each_stage_that_computes_with_cpu_threads_reruns_when_they_change():
    """run_stage sets torch's threads to `cpu_threads` for every stage but the committed stand-ins, and the thread
    count changes floating-point order: those stages, and only those, list the param in dvc.yaml."""
    all_cores = load("run_stage").ALL_CORES
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        listed = "cpu_threads" in stage.get("do", stage).get("params", [])
        assert listed == (name not in all_cores), name


STAGE = """import json, sys, time
name, seconds, fail = sys.argv[1], float(sys.argv[2]), len(sys.argv) > 3
start = time.time()
time.sleep(seconds)
if fail:
    sys.exit(f"{name} fails on purpose")
open(f"out/{name}.json", "w").write(json.dumps({"start": start, "end": time.time()}))
"""


def graph_repo(tmp_path: Path, failing: str = "") -> Path:
    """A DVC repository whose graph is a -> (b, c) -> d, e: b and c independent, d waits for both, e for nothing.
    A copy of pipeline/repro.py beside it, as in this repository."""
    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "pipeline" / "repro.py").write_text((ROOT / "pipeline" / "repro.py").read_text())
    (repo / "params.yaml").write_text("cpu_threads: 1\n")
    (repo / "stage.py").write_text(STAGE)
    (repo / "out").mkdir()

    def stage(name, deps, seconds):
        return {"cmd": f"python stage.py {name} {seconds}" + (" fail" if name == failing else ""),
                "deps": ["stage.py", *(f"out/{d}.json" for d in deps)], "outs": [f"out/{name}.json"]}
    stages = {"a": stage("a", [], 0), "b": stage("b", ["a"], 5), "c": stage("c", ["a"], 5),
              "d": stage("d", ["b", "c"], 0), "e": stage("e", [], 0)}
    (repo / "dvc.yaml").write_text(json.dumps({"stages": stages}))
    for cmd in (["git", "init", "-q"], [dvc_bin(), "init", "-q"], [dvc_bin(), "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env())
    return repo


def dvc_bin() -> str:
    return str(Path(sys.executable).parent / "dvc")


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), DVC_NO_ANALYTICS="1")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e["PATH"]
    return e


def run_repro(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline/repro.py", *args], cwd=repo, env=env(), capture_output=True,
                          text=True, timeout=300)


def times(repo: Path, name: str) -> dict:
    return json.loads((repo / "out" / f"{name}.json").read_text())


def test_independent_stages_run_side_by_side_and_a_stage_waits_for_its_inputs(tmp_path):
    repo = graph_repo(tmp_path)
    r = run_repro(repo, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    b, c, d = times(repo, "b"), times(repo, "c"), times(repo, "d")
    assert max(b["start"], c["start"]) < min(b["end"], c["end"])  # b and c overlapped
    assert d["start"] >= max(b["end"], c["end"])
    status = subprocess.run([dvc_bin(), "status", "--json"], cwd=repo, env=env(), capture_output=True, text=True)
    assert json.loads(status.stdout) == {}  # DVC records every stage as it would after its own repro
    assert "every stage is up to date" in run_repro(repo, "--jobs", "2").stdout  # nothing runs twice


def test_one_job_runs_the_stages_one_after_another(tmp_path):
    repo = graph_repo(tmp_path)
    assert run_repro(repo, "--jobs", "1").returncode == 0
    b, c = times(repo, "b"), times(repo, "c")
    assert min(b["end"], c["end"]) <= max(b["start"], c["start"])


def test_after_a_failed_stage_nothing_downstream_starts_and_finished_work_is_kept(tmp_path):
    repo = graph_repo(tmp_path, failing="b")
    r = run_repro(repo, "--jobs", "2")
    assert r.returncode == 1
    assert "FAILED b" in r.stdout and "b fails on purpose" in r.stdout  # the end of its log
    assert "b failed" in r.stderr
    assert not (repo / "out" / "d.json").exists()
    assert (repo / "out" / "c.json").exists()  # c ran beside b and finished: kept, and recorded
    status = json.loads(subprocess.run([dvc_bin(), "status", "--json"], cwd=repo, env=env(), capture_output=True,
                                       text=True).stdout)
    assert "c" not in status and "b" in status


def test_a_dry_run_predicts_the_wall_time_of_the_plan_and_runs_nothing(tmp_path):
    """--dry-run replays each stage's last time (its executed notebook's; a minute where neither it nor its kind has
    one) through the runner's own order: at 2 at once a and e, then b and c, then d (3 minutes); at 1, five; with b's
    notebook saying 4 minutes, 6 at 2 at once. --all plans an up-to-date repository in full."""
    repo = graph_repo(tmp_path)
    r = run_repro(repo, "--jobs", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "5 stages" in r.stdout and "3.0 min of wall time at 2 at once" in r.stdout
    assert "5.0 min of wall time at 1 at once" in run_repro(repo, "--jobs", "1", "--dry-run").stdout
    (repo / "runs").mkdir()
    (repo / "runs" / "b.ipynb").write_text(json.dumps({"metadata": {"papermill": {"duration": 240.0}}, "cells": []}))
    assert "6.0 min of wall time at 2 at once" in run_repro(repo, "--jobs", "2", "--dry-run").stdout
    (repo / "runs" / "b.ipynb").unlink()
    assert not list((repo / "out").iterdir())  # nothing ran
    assert run_repro(repo, "--jobs", "2").returncode == 0
    assert "0 stages" in run_repro(repo, "--dry-run").stdout
    assert "5 stages" in run_repro(repo, "--dry-run", "--all").stdout
    assert run_repro(repo, "--all").returncode == 2  # only with --dry-run


def test_the_time_a_stage_spends_outside_its_notebook_is_read_from_the_gaps_between_notebooks():
    """Each notebook's start minus the last end before it, under a minute (the same run); a pause is not counted."""
    stamp = lambda s: f"2026-12-05T10:{s // 60:02d}:{s % 60:02d}+00:00"  # noqa: E731
    meta = {n: {"start_time": stamp(a), "end_time": stamp(b)}
            for n, (a, b) in {"x": (0, 100), "y": (109, 200), "z": (211, 300), "later": (1800, 1900)}.items()}
    assert load("repro").start_gap(meta) == 10.0  # the median of 9 and 11; the 1500 s pause left out


def test_a_bad_jobs_count_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "pipeline" / "repro.py"), "--jobs", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--jobs 0: must be at least 1" in r.stderr


def test_the_span_of_a_run_and_how_many_stages_ran_at_once(tmp_path):
    """The README's wall time of the last run from the executed notebooks: first start to last end, and the most at
    once; a pause of over 10 minutes with none running ends a run."""
    from dmdr.report import papermill_metadata, stage_span

    def notebook(name, start, end):
        meta = {"papermill": {"start_time": f"2026-12-05T10:{start:02d}:00.000000",
                              "end_time": f"2026-12-05T10:{end:02d}:00.000000", "duration": (end - start) * 60.0}}
        (tmp_path / f"{name}.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    notebook("world", 0, 50)  # a stand-in: not part of the run
    notebook("distill-a", 1, 5)
    notebook("distill-b", 2, 7)
    notebook("evaluate-a", 5, 6)  # starts as distill-a ends: two at once, not three
    notebook("report", 7, 9)
    assert stage_span(papermill_metadata(tmp_path)) == (4, 8.0, 2)
    notebook("distill-c", 25, 31)  # after a pause of 16 minutes: a later run, which the README reports
    notebook("evaluate-c", 31, 33)
    assert stage_span(papermill_metadata(tmp_path)) == (2, 8.0, 1)
    assert stage_span(papermill_metadata(tmp_path), pause=20.0) == (6, 32.0, 2)
