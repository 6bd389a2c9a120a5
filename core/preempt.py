"""Preemption: SIGTERM/SIGINT ask the loop to checkpoint at the end of the current step and exit.

Why: schedulers (Slurm, Kubernetes) send SIGTERM before they kill a job, and torchrun forwards it to its
workers. Stopping mid-step or on one rank only would lose work or deadlock the others, so the handler
only sets a flag, the loop all-reduces it once per step, and every rank saves and leaves together.
A second signal of the same kind falls back to its previous handler (a second Ctrl-C interrupts).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from haina.core import collectives

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Leaves the process with 128 + the signal number after the checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step


class Preemption:
    """Context manager installing the flag-setting handlers (main thread only) and restoring the old ones."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested(self) -> int:
        """The signal any rank received (the same answer on every rank), or 0."""
        return collectives.max_int(self.signum)
