"""Profiling for a benchmark's subprocess, without touching its code: Python imports this module
at start-up when this folder is on PYTHONPATH (``operator_scale.py --profile DIR`` puts it on the
operator's). With ``KUBETUNE_BENCH_PROFILE=DIR`` set:

- a thread samples the main thread's stack every 10 ms (the operator's event loop runs there);
  on SIGUSR2 or at exit, DIR/stacks.txt gets the functions seen most (inclusive: anywhere on
  the stack; self: at the top), as a share of samples; ``select`` at the top is the loop idle;
- with ``KUBETUNE_BENCH_TRACEMALLOC=1`` also, allocations are traced (slower: for memory
  questions only) and SIGUSR2 writes DIR/memory.txt: the live allocations by line and by file.

Nothing happens without KUBETUNE_BENCH_PROFILE.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import sys
import threading
import time
from pathlib import Path

_OUT = os.environ.get("KUBETUNE_BENCH_PROFILE")


def _where(frame: object) -> str:
    code = frame.f_code  # type: ignore[attr-defined]
    parts = Path(code.co_filename).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else code.co_filename
    return f"{short}:{code.co_name}"


class _Sampler(threading.Thread):
    def __init__(self, out: Path, every: float = 0.01) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.out, self.every = out, every
        self.main = threading.main_thread().ident
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.self_: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            time.sleep(self.every)
            frame = sys._current_frames().get(self.main)  # type: ignore[arg-type]
            if frame is None:
                continue
            seen, top = set(), _where(frame)
            while frame is not None:
                seen.add(_where(frame))
                frame = frame.f_back
            with self.lock:
                self.samples += 1
                self.self_[top] += 1
                self.inclusive.update(seen)

    def dump(self) -> None:
        with self.lock:
            n = max(self.samples, 1)
            lines = [f"{self.samples} samples of the main thread, every {self.every * 1000:.0f} ms"]
            for title, counter in (("inclusive", self.inclusive), ("self", self.self_)):
                lines.append(f"\n-- {title}")
                lines += [f"{100 * c / n:6.1f}%  {name}" for name, c in counter.most_common(80)]
        (self.out / "stacks.txt").write_text("\n".join(lines) + "\n")


def _memory(out: Path) -> None:
    import tracemalloc

    if not tracemalloc.is_tracing():
        return
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"traced now {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB"]
    for key in ("lineno", "filename"):
        lines.append(f"\n-- by {key}")
        for stat in snapshot.statistics(key)[:40]:
            lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d}  {stat.traceback}")
    (out / "memory.txt").write_text("\n".join(lines) + "\n")


def _start(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("KUBETUNE_BENCH_TRACEMALLOC") == "1":
        import tracemalloc

        tracemalloc.start(1)
    sampler = _Sampler(out)
    sampler.start()

    def dump(*_: object) -> None:
        sampler.dump()
        _memory(out)
        (out / "dumped").write_text(str(time.time()))

    signal.signal(signal.SIGUSR2, dump)
    atexit.register(sampler.dump)


if _OUT:
    _start(Path(_OUT))
