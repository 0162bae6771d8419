"""Where the host's time goes in a launch-bound step, without a profiler's overhead: a thread samples the stepping
thread's Python stack (sys._current_frames) every millisecond and counts, for each sample, the innermost frame of
dmdr's or the benchmark's own code and the innermost frame overall (the Python line that is running, or that called
the torch op the thread is in, or that waits: a `.backward()` waits for the autograd thread, a host read of a GPU
value waits for the GPU). And where a step makes the host wait for the GPU: torch's sync debug mode
(torch.cuda.set_sync_debug_mode) warns at each synchronising CUDA call, counted here by the same two frames. On a GPU
a step is host-bound when it issues kernels slower than they run, and every wait for the GPU then idles the GPU
while the host issues the next ones: gpu_step.py --profile writes both readings beside its result.
"""
import collections
import sys
import threading
import warnings
from pathlib import Path

# our own code: the benchmarks and dmdr, but for dmdr's model wrappers (every model call's innermost frame of ours)
OURS = (f"{Path(__file__).resolve().parent}", f"{Path(__file__).resolve().parents[1] / 'src' / 'dmdr'}")
WRAPPERS = f"{Path(__file__).resolve().parents[1] / 'src' / 'dmdr' / 'models.py'}"


def frame_name(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"


def sites(frame) -> tuple[str, str]:
    """(the innermost frame of our own code (OURS), the innermost frame) of a stack, skipping the warnings
    module's."""
    while frame is not None and frame.f_code.co_filename.endswith("warnings.py"):
        frame = frame.f_back
    inner, ours = frame_name(frame) if frame else "?", "(not in our code)"
    while frame is not None:
        if frame.f_code.co_filename.startswith(OURS) and frame.f_code.co_filename != WRAPPERS:
            ours = frame_name(frame)
            break
        frame = frame.f_back
    return ours, inner


class Sampler:
    """Samples the thread that creates it, between start() and stop(): `counts[(ours, inner)]` samples each."""

    def __init__(self, every: float = 1e-3):
        self.every, self.target, self.counts = every, threading.get_ident(), collections.Counter()
        self._stop, self._thread = threading.Event(), None

    def start(self):
        if self._thread is None:
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(self.every / 2)  # so that the sampler gets the GIL on time from Python code
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            frame = sys._current_frames().get(self.target)
            if frame is not None:
                self.counts[sites(frame)] += 1

    def stop(self) -> collections.Counter:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.setswitchinterval(self._switch)
            self._thread = None
        return self.counts


class SyncSites:
    """Counts, between start() and stop(), the host's waits for the GPU by the frames that make them (torch's sync
    debug mode, `warn`); on a machine without CUDA, the warnings of that mode only (none)."""

    def __init__(self):
        import torch
        self.torch, self.counts, self._caught = torch, collections.Counter(), None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            self.counts[sites(sys._getframe(1))] += 1
        else:
            self._show_other(message, category, filename, lineno, file, line)

    def start(self):
        if self._caught is None:
            self._caught = warnings.catch_warnings()
            self._caught.__enter__()
            warnings.simplefilter("always")  # each wait, not the first of each line only
            self._show_other, warnings.showwarning = warnings.showwarning, self._show
            if self.torch.cuda.is_available():
                self.torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> collections.Counter:
        if self._caught is not None:
            if self.torch.cuda.is_available():
                self.torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
        return self.counts


def report(counts: collections.Counter, what: str, top: int = 15, unit: str = "samples") -> list[str]:
    """The counts by our own frame, and by the innermost frame, `top` each, with their shares."""
    total = sum(counts.values())
    lines = [f"{what}: {total} {unit}"]
    for i, title in enumerate(("by the innermost frame of the loop or the benchmark", "by the innermost frame")):
        by = collections.Counter()
        for key, n in counts.items():
            by[key[i]] += n
        lines.append(f"  {title}:")
        lines += [f"    {n:>6} {n / total:6.1%}  {name}" for name, n in by.most_common(top)] if total else []
    return lines
