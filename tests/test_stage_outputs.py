"""A stage's outputs are replaced only when its run succeeds (also across a SIGKILL), and one run of a stage runs at
a time (dmdr.stage_outputs, used by pipeline/run_stage.py)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dmdr.stage_outputs import SET_ASIDE, StageBusy, one_run_at_a_time, replaced_on_success

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [Path("models/world"), Path("results/metrics/world.json"), Path("runs/world.ipynb")]


def finished_outputs(root: Path) -> dict:
    (root / "models" / "world").mkdir(parents=True)
    (root / "models" / "world" / "teacher.safetensors").write_text("trained for 45 minutes")
    (root / "results" / "metrics").mkdir(parents=True)
    (root / "results" / "metrics" / "world.json").write_text('{"geneval": 0.5}')
    (root / "runs").mkdir()
    (root / "runs" / "world.ipynb").write_text("executed")
    return snapshot(root)


def snapshot(root: Path) -> dict:
    return {str(f.relative_to(root)): f.read_text() for f in sorted(root.rglob("*"))
            if f.is_file() and "checkpoints" not in f.parts}


def test_a_successful_run_replaces_the_outputs(tmp_path):
    finished_outputs(tmp_path)
    with replaced_on_success(tmp_path, "world", OUTPUTS, tmp_path / "runs" / "world.ipynb"):
        assert not (tmp_path / "models" / "world").exists()  # the run starts from nothing, as without persist
        (tmp_path / "models" / "world").mkdir()
        (tmp_path / "models" / "world" / "teacher.safetensors").write_text("retrained")
    assert snapshot(tmp_path) == {"models/world/teacher.safetensors": "retrained"}
    assert not (tmp_path / SET_ASIDE / "world").exists()


def test_a_failed_run_puts_the_old_outputs_back_and_keeps_its_notebook(tmp_path):
    before = finished_outputs(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        with replaced_on_success(tmp_path, "world", OUTPUTS, tmp_path / "runs" / "world.ipynb"):
            (tmp_path / "models" / "world").mkdir()
            (tmp_path / "models" / "world" / "clip.safetensors").write_text("half of a new world")
            (tmp_path / "runs" / "world.ipynb").write_text("the traceback")
            raise RuntimeError("out of memory")
    after = snapshot(tmp_path)
    assert after.pop("runs/failed/world.ipynb") == "the traceback"
    assert after == before


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from dmdr.stage_outputs import replaced_on_success
root = Path(sys.argv[1])
with replaced_on_success(root, "world", [Path("models/world"), Path("results/metrics/world.json"),
                                          Path("runs/world.ipynb")]):
    (root / "models" / "world").mkdir()
    (root / "models" / "world" / "clip.safetensors").write_text("half of a new world")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_s_outputs_are_put_back_by_the_next_run(tmp_path):
    before = finished_outputs(tmp_path)
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert r.returncode == -signal.SIGKILL
    assert (tmp_path / SET_ASIDE / "world" / "files" / "models" / "world" / "teacher.safetensors").exists()
    with pytest.raises(RuntimeError):
        with replaced_on_success(tmp_path, "world", OUTPUTS):
            raise RuntimeError("fails too")
    assert snapshot(tmp_path) == before  # the killed run's half world removed, the old one back


HOLDER = """
import sys, time
from pathlib import Path
from dmdr.stage_outputs import one_run_at_a_time
with one_run_at_a_time(Path(sys.argv[1]), sys.argv[2]):
    print("holding", flush=True)
    time.sleep(60)
"""


def hold_lock(root: Path, stage: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), stage], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_run_of_a_stage_fails_at_once_naming_the_first(tmp_path):
    holder = hold_lock(tmp_path, "distill@dmd2-4")
    try:
        t = time.time()
        with pytest.raises(StageBusy, match=rf"stage distill@dmd2-4 is already running \(pid {holder.pid}, started"):
            with one_run_at_a_time(tmp_path, "distill@dmd2-4"):
                pass
        assert time.time() - t < 1
        with one_run_at_a_time(tmp_path, "distill@dmdr-4"):  # another stage runs beside it
            pass
    finally:
        holder.kill()
        holder.wait()
    with one_run_at_a_time(tmp_path, "distill@dmd2-4"):  # a killed holder's lock is gone with it
        pass


def test_the_stage_runner_refuses_a_second_run_before_touching_anything():
    holder = hold_lock(ROOT, "report")
    try:
        r = subprocess.run([sys.executable, str(ROOT / "pipeline" / "run_stage.py"), "report"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and "stage report is already running" in r.stderr
    assert (ROOT / "results" / "summary.json").exists()
