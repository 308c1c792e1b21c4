"""Scratch space for one run: downloads, checkpoint staging, the report before its upload.

A folder under the system temp dir with a lock file that the process holds (flock) while it
runs. The kernel drops the lock when the process dies, however it dies (SIGKILL, the OOM
killer), so the next run tells a dead run's folder from a live one's and removes it: a killed
run leaks nothing past the next start, and two runs on one machine never touch each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "kubetune-run-"
LOCK = ".lock"


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the scratch folders of runs that are gone (their lock is free)."""
    removed = []
    for folder in sorted(parent.glob(PREFIX + "*")):
        lock = folder / LOCK
        try:
            handle = lock.open("rb")
        except OSError:
            continue  # being created (the lock appears last), or not ours
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its run is alive
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def workdir(given: Path | None = None) -> Iterator[Path]:
    """A fresh, locked scratch folder, removed at the end (stale ones of dead runs first). A
    folder the caller gives is used as it is and kept."""
    if given is not None:
        yield given
        return
    parent = Path(tempfile.gettempdir())
    sweep_stale(parent)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    # Lock under another name, then rename: a sweeper never finds a .lock not yet held.
    pending = folder / ".lock-pending"
    handle = pending.open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        os.replace(pending, folder / LOCK)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        handle.close()
