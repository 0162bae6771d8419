"""A pipeline stage's outputs are replaced only when its run succeeds, and one run of a stage runs at a time.

DVC removes a stage's outputs before running it, unless they are declared `persist: true` (every output in
dvc.yaml is). A stage's runner (pipeline/run_stage.py) then sets its old outputs aside under
`checkpoints/.previous-outputs/<stage>` before the run, deletes them when the run succeeds, and puts them back when
it fails; a run killed outright (SIGKILL) leaves them set aside, and the next run of the stage puts them back first.
So a typo in params.yaml, a crash or a kill never loses a trained world, a generator or committed metrics.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

SET_ASIDE = Path("checkpoints") / ".previous-outputs"  # checkpoints/ is ignored by git and DVC
LOCKS = Path("checkpoints") / ".locks"
FAILED_RUNS = Path("runs") / "failed"


class StageBusy(RuntimeError):
    pass


def declared(root: Path, stage: str) -> list[Path]:
    """The outputs (outs, metrics, plots) dvc.yaml declares for `stage` ('world', 'distill@dmd2-4'), relative to
    `root`."""
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        (found,) = repo.stage.collect(stage)
        return [Path(str(o.def_path)) for o in found.outs]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def put_back(root: Path, stage: str) -> bool:
    """Restore what an earlier run of `stage` set aside and did not finish (killed, or failed while restoring):
    each output it had set aside goes back, each it made anew is removed. Returns whether there was any."""
    aside = root / SET_ASIDE / stage
    record = aside / "outputs.json"
    if not record.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return False
    outputs = json.loads(record.read_text())
    for rel in outputs["declared"]:
        kept, current = aside / "files" / rel, root / rel
        if rel in outputs["existed"]:
            if kept.exists() or kept.is_symlink():  # else it was never moved: `current` is still the old output
                _remove(current)
                current.parent.mkdir(parents=True, exist_ok=True)
                os.replace(kept, current)
        else:
            _remove(current)  # a partial output of the unfinished run
    shutil.rmtree(aside)
    return True


@contextmanager
def replaced_on_success(root: Path, stage: str, outputs: list[Path], notebook: Path | None = None):
    """Run the body with `outputs` (paths relative to `root`) set aside; keep what the body wrote only if it
    returns. A failed run's executed `notebook` is kept under runs/failed/ for its traceback."""
    root = Path(root)
    if put_back(root, stage):
        print(f"{stage}: put back the outputs that an unfinished earlier run had set aside")
    aside = root / SET_ASIDE / stage
    (aside / "files").mkdir(parents=True)
    rels = [str(p) for p in outputs]
    existed = [r for r in rels if (root / r).exists() or (root / r).is_symlink()]
    (aside / "outputs.json").write_text(json.dumps({"declared": rels, "existed": existed}))  # before anything moves
    for rel in existed:
        (aside / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / rel, aside / "files" / rel)
    try:
        yield
    except BaseException:
        if notebook is not None and notebook.exists():
            failed = root / FAILED_RUNS / notebook.name
            failed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(notebook, failed)
            print(f"{stage} failed: its executed notebook is {failed.relative_to(root)}; the outputs of its last "
                  f"successful run are kept")
        put_back(root, stage)
        raise
    shutil.rmtree(aside)


@contextmanager
def one_run_at_a_time(root: Path, stage: str):
    """Hold `stage`'s lock (an flock, released by the system when the process ends, killed or not) for the body;
    a second run of the stage fails at once, naming the first."""
    path = Path(root) / LOCKS / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StageBusy(f"stage {stage} is already running ({f.read().strip() or 'another process'}): two runs "
                            f"of one stage would write the same files; wait for it to end or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
