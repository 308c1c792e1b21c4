"""SIGTERM (preemption, a deleted pod) and SIGINT (Ctrl-C) for the whole run.

Outside the training loop a signal stops the run at once: the handler raises
:class:`Interrupted` wherever the run is (a download, an evaluation), and the recipe turns it
into :class:`~kubetune_trainer.errors.Preempted` (exit 12) with a message that says what a
rerun redoes. Inside the loop the signal only sets ``received``: the loop finishes its
optimizer step, commits a checkpoint and stops, so the steps done are never lost. A second
signal while that checkpoint is pending stops at once: whoever sent it insists.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised from the signal handler. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way (a retry loop, a cleanup) swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class Interrupts:
    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name, e.g. "SIGTERM"
        self._deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        first = self.received is None
        self.received = self.received or name
        if not (self._deferred and first):
            raise Interrupted(name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle both signals while the block runs (signals reach only the main thread: from
        any other, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[Interrupts]:
        """While training: a signal sets ``received`` and the loop stops at the next step. One
        that arrived too late for the loop to see stops the run when the block ends."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False
        if self.received is not None:
            raise Interrupted(self.received)
