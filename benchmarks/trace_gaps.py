"""Where the GPU waits: reads a torch profiler timeline (a Chrome trace, `.json` or `.json.gz`, as gpu_step.py
--profile writes them) and prints how much of the profiled span the GPU is busy, and, for the time it is idle, what
each host thread is doing meanwhile: the outermost op it is in (`aten::...`, a profiler step's own time), or no op at
all (Python between ops). A launch-bound step shows its idle time under the ops that launch slowly; a loop's own host
work shows as time outside any op.

    python benchmarks/trace_gaps.py results/benchmarks/profile_stage1_h200.json.gz [--top 12]
"""
import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

GPU = {"kernel", "gpu_memcpy", "gpu_memset"}
NO_OP = "(no op: Python between ops)"


def load(path: Path) -> list[dict]:
    """The trace's complete events (ph "X": a name, a category, a thread, a start and a duration in microseconds)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def merged(intervals) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def idle_windows(busy, span) -> list[tuple[float, float]]:
    """The parts of `span` (start, end) that no interval of `busy` (sorted, disjoint) covers."""
    out, at = [], span[0]
    for start, end in busy:
        if start > at:
            out.append((at, min(start, span[1])))
        at = max(at, end)
        if at >= span[1]:
            break
    if at < span[1]:
        out.append((at, span[1]))
    return [(a, b) for a, b in out if b > a]


def outermost(ops) -> list[tuple[float, float, str]]:
    """The ops of one thread that no other op of it contains, as (start, end, name), sorted."""
    out = []
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        start, end = e["ts"], e["ts"] + e["dur"]
        if out and end <= out[-1][1]:
            continue  # inside the last outermost op
        out.append((start, end, e["name"]))
    return out


def overlap(windows, starts, start: float, end: float) -> float:
    """Time in [start, end) covered by `windows` (sorted, disjoint; `starts` their starts)."""
    total, i = 0.0, max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(windows) and windows[i][0] < end:
        total += max(0.0, min(end, windows[i][1]) - max(start, windows[i][0]))
        i += 1
    return total


def idle_by_host_activity(events) -> tuple[dict, dict]:
    """(totals, idle time by thread and activity): the profiled span (from the first host op to the last GPU or host
    event), the GPU's busy and idle time in it, and for each host thread the idle time spent in each outermost op's
    name or in no op (NO_OP), in microseconds."""
    gpu = [e for e in events if e.get("cat") in GPU]
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    if not host:
        raise ValueError("the trace has no host ops: not a torch profiler timeline")
    span = (min(e["ts"] for e in host), max(e["ts"] + e["dur"] for e in host + gpu))
    # a profiler step holds all of its step's ops: its own time is what no op covers
    cpu = [e for e in host if not e["name"].startswith("ProfilerStep")]
    busy = merged((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    windows = idle_windows(busy, span)
    starts = [w[0] for w in windows]
    idle = sum(b - a for a, b in windows)
    threads = collections.defaultdict(list)
    for e in cpu:
        threads[e["tid"]].append(e)
    by_thread = {}
    for tid, ops in threads.items():
        spent, covered = collections.Counter(), 0.0
        for start, end, name in outermost(ops):
            t = overlap(windows, starts, start, end)
            spent[name] += t
            covered += t
        spent[NO_OP] = idle - covered
        by_thread[tid] = spent
    totals = {"span": span[1] - span[0], "busy": sum(b - a for a, b in busy), "idle": idle, "windows": len(windows),
              "longest": max((b - a for a, b in windows), default=0.0)}
    return totals, by_thread


def report(totals: dict, by_thread: dict, top: int = 12) -> list[str]:
    ms = lambda us: f"{us / 1e3:.1f} ms"
    lines = [f"profiled span {ms(totals['span'])}: GPU busy {ms(totals['busy'])} "
             f"({totals['busy'] / totals['span']:.0%}), idle {ms(totals['idle'])} in {totals['windows']} windows "
             f"(longest {ms(totals['longest'])})"]
    for tid, spent in sorted(by_thread.items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k != NO_OP)):
        lines.append(f"host thread {tid}, what it was in while the GPU was idle:")
        lines += [f"  {ms(t):>10}  {name}" for name, t in spent.most_common(top) if t > 0]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=12, help="activities listed per thread")
    a = ap.parse_args()
    print("\n".join(report(*idle_by_host_activity(load(a.trace)), a.top)))


if __name__ == "__main__":
    main()
