"""Why a run should stop early: a scheduler's signal, or the death of the launcher.

SIGTERM and SIGUSR1 set a flag; the trainer agrees on it across ranks every micro step, so
a signal that reaches any one rank stops every rank at the same optimizer step, with a
checkpoint, exit status 0. (The data workers ignore both signals: see
:func:`albef_bal.data.webdataset.ignore_stop_signals`.)

A rank started by a launcher (torchrun, the deepspeed launcher, accelerate) also watches
its parent: when the launcher dies without passing a signal on (``kill -9``, a crash, an
OOM kill), the rank is re-parented, notices it at the next micro step and stops the same
way instead of running on as an orphan that a restarted job would collide with.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Optional

log = logging.getLogger("albef_bal")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, rank: int, launcher_pid: Optional[int] = None):
        self.rank = rank
        self.launcher_pid = launcher_pid
        self.reason: Optional[str] = None

    def install(self) -> "StopRequests":
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"
            log.warning("rank %d: %s; saving a checkpoint at the end of this step and exiting", self.rank,
                        self.reason)

    def requested(self) -> bool:
        """Whether this rank wants to stop (cheap: one getppid per call)."""
        if self.reason is None and self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            self.reason = f"its launcher (pid {self.launcher_pid}) exited"
            log.warning("rank %d: %s; saving a checkpoint at the end of this step and exiting", self.rank,
                        self.reason)
        return self.reason is not None
