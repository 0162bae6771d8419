"""`dvc repro` with as many stages at once as the cores allow: what `make repro` runs.

    python pipeline/repro.py [--jobs N] [--dry-run [--all]]

DVC runs one stage at a time. On a small CPU one stage does not use the cores well: its steps are short and a
second thread speeds them up far less than twice, so two stages at one thread each do more than one at two.
This runner asks DVC which stages are stale, and runs each of them and everything downstream of them as its own
`dvc repro --single-item STAGE`, up to N at once, each as soon as the stages it depends on are done. DVC releases
its repository lock while a stage's command runs, and locks each stage's outputs, so stages on different branches
of the graph can run side by side. Every number is the same as under a plain `dvc repro`: each stage computes with
`cpu_threads` threads (params.yaml), however many run at once. A last plain `dvc repro` checks that nothing is
left stale.

N defaults to the cores this process may use divided by `cpu_threads`. Each stage's output goes to
runs/logs/STAGE.log. After a failed stage no new stage starts; the running ones finish (their results are kept),
and the runner exits non-zero, naming the stage and the end of its log.

--dry-run runs nothing: it prints the plan, when each stage would start and end at N at once by the last run's
stage times, and the wall time that predicts; with --all, for every stage after the committed ones (prompts and the
stand-ins), as a fresh run of the whole pipeline would run them.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from dmdr import config  # noqa: E402
from dmdr.report import BEFORE, notebook_spans, papermill_metadata, stage_timings  # noqa: E402


def plan(repo_dir: Path, meta: dict[str, dict], everything: bool = False
         ) -> tuple[list[str], dict[str, set[str]], dict[str, float]]:
    """The stages to run (the stale ones, or with `everything` all but the committed ones, report.BEFORE, and every
    stage downstream of them), longest path to the end first (by each stage's last wall time, from its executed
    notebook's papermill metadata `meta`; where none, the median of its kind's, as of every `distill@...`; else a
    minute), each after the stages it depends on; for each, the stages of that list it waits for; and each one's
    minutes."""
    timings = stage_timings(meta)
    kinds = {}
    for stem, m in timings.items():
        kinds.setdefault(stem.split("-")[0], []).append(m)

    def minutes(s) -> float:
        kind = kinds.get(s.addressing.split("@")[0])
        return timings.get(s.addressing.replace("@", "-"), statistics.median(kind) if kind else 1.0)
    with Repo(str(repo_dir)) as repo:
        graph = repo.index.graph  # an edge from a stage to each stage whose outputs it reads
        stale = {s.addressing for s in graph if s.addressing not in BEFORE} if everything else set(repo.status())
        todo = {s for s in graph if s.addressing in stale}
        todo |= {d for s in todo for d in nx.ancestors(graph, s)}
        order = [s for s in reversed(list(nx.topological_sort(graph))) if s in todo]
        to_end = {}  # the longest chain of wall minutes from the start of a stage to the end of the run
        for s in reversed(order):
            after = [to_end[d] for d in graph.predecessors(s) if d in todo]
            to_end[s] = minutes(s) + max(after, default=0.0)
        order.sort(key=lambda s: -to_end[s])  # a stage still comes after what it waits for: it has a longer path
        waits = {s.addressing: {d.addressing for d in nx.descendants(graph, s) & todo} for s in order}
    return [s.addressing for s in order], waits, {s.addressing: minutes(s) for s in order}


def startable(order: list[str], waits: dict[str, set[str]], done: set[str]) -> list[str]:
    """The stages of `order` whose inputs are done, in its order: the first of them starts next."""
    return [a for a in order if waits[a] <= done]


def schedule(order: list[str], waits: dict[str, set[str]], minutes: dict[str, float], jobs: int
             ) -> dict[str, tuple[float, float]]:
    """When each stage would start and end (minutes from the run's start) as `run` starts them: whenever fewer than
    `jobs` run, the first stage of `order` whose stages it waits for are done."""
    order, running, done, times, now = list(order), {}, set(), {}, 0.0
    while order or running:
        while len(running) < jobs and (ready := startable(order, waits, done)):
            order.remove(ready[0])
            running[ready[0]] = now + minutes[ready[0]]
        stage = min(running, key=running.get)  # the next to end
        now = running.pop(stage)
        times[stage] = (now - minutes[stage], now)
        done.add(stage)
    return times


def start_gap(meta: dict[str, dict]) -> float:
    """The seconds a stage spends outside its notebook (DVC, the kernel's start): the median gap between an executed
    notebook's start and the last end of another before it, where under a minute (the same run); 0 where none."""
    spans = notebook_spans(meta)
    gaps = [min(gap for _, end in spans if 0 <= (gap := (start - end).total_seconds())) for start, _ in spans
            if any(end <= start for _, end in spans)]
    gaps = [g for g in gaps if g < 60]
    return statistics.median(gaps) if gaps else 0.0


def dry_run(repo_dir: Path, jobs: int, everything: bool) -> int:
    """Print the plan with its schedule at `jobs` at once, and the wall time it predicts; run nothing."""
    meta = papermill_metadata(repo_dir / "runs")
    order, waits, minutes = plan(repo_dir, meta, everything)
    gap = start_gap(meta)
    times = schedule(order, waits, {s: m + gap / 60 for s, m in minutes.items()}, jobs)
    for stage, (start, end) in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"{start:7.1f} -> {end:7.1f} min  {stage}")
    span = max((end for _, end in times.values()), default=0.0)
    print(f"{len(order)} stages, {sum(minutes.values()):.1f} minutes in their notebooks (the last run's, runs/*.ipynb; "
          f"where a stage has none, its kind's median) and {gap:.1f} s each outside: {span:.1f} min of wall time at {jobs} at once")
    return 0


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run(repo_dir: Path, jobs: int) -> int:
    """Run the plan, `jobs` stages at a time; 0 when every stage succeeded."""
    order, waits, _ = plan(repo_dir, papermill_metadata(repo_dir / "runs"))
    if not order:
        print("every stage is up to date")
    logs = repo_dir / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    running, done, failed = {}, set(), []
    with tqdm(total=len(order), desc=f"stages ({jobs} at once)", unit="stage", disable=not order) as bar:
        while order or running:
            while not failed and len(running) < jobs and (ready := startable(order, waits, done)):
                stage = ready[0]
                order.remove(stage)
                log = (logs / f"{stage.replace('@', '-')}.log").open("w")
                running[stage] = (subprocess.Popen([dvc, "--wait-for-lock", "repro", "--single-item", stage],
                                                   cwd=repo_dir, stdout=log, stderr=subprocess.STDOUT),
                                  log, time.monotonic())
                bar.set_postfix_str(", ".join(running))
            if not running:  # a failure: what waited on it does not start
                break
            time.sleep(0.5)
            for stage, (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[stage]
                bar.update()
                minutes = (time.monotonic() - start) / 60
                if proc.returncode:
                    failed.append(stage)
                    tqdm.write(f"FAILED {stage} after {minutes:.1f} min (exit {proc.returncode}); end of {log.name}:\n"
                               f"{log_tail(Path(log.name))}")
                else:
                    done.add(stage)
                    tqdm.write(f"{stage}: {minutes:.1f} min")
                bar.set_postfix_str(", ".join(running))
    if failed:
        print(f"stopped: {', '.join(failed)} failed; {len(order)} stages not started; the finished ones are kept. "
              f"Fix the cause and run again: only what is stale runs.", file=sys.stderr)
        return 1
    return subprocess.run([dvc, "repro"], cwd=repo_dir).returncode  # nothing left: DVC's own check


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, help="stages at once (default: usable cores // cpu_threads)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its predicted wall time; run nothing")
    ap.add_argument("--all", action="store_true", help="with --dry-run: every stage after the committed ones")
    a = ap.parse_args(argv)
    if a.jobs is not None and a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: must be at least 1")
    if a.all and not a.dry_run:
        ap.error("--all: only with --dry-run (to rerun everything: dvc repro -f)")
    try:
        threads = config.load(ROOT / "params.yaml").cpu_threads
    except config.ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    jobs = a.jobs or max(1, len(os.sched_getaffinity(0)) // threads)
    return dry_run(ROOT, jobs, a.all) if a.dry_run else run(ROOT, jobs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
