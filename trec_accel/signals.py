"""Stopping on a signal: SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a pre-emption) and SIGINT ask
a training run to save a checkpoint and exit 0.

The handler only records the first signal: schedulers repeat theirs and people press Ctrl-C twice, and a repeat
must not kill a process that is saving. scripts/train.py installs it before its heavy imports and, once the run
is over, ignores the signals until the process has exited, so a signal at any moment, start-up included, ends the
run cleanly (`train.run` stops before the model loads, before the first step, or with a checkpoint after the
current step).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """`signum`: the first stop signal received, 0 while there is none."""

    def __init__(self):
        self.signum = 0
        self._previous: dict | None = None

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = None


_FLAG = StopFlag()


def ignore_while_exiting() -> None:
    """After the run, to the end of the process: Python sets its handlers back to the defaults while it shuts down,
    and a repeated signal would then kill a process that has done its work."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def install_for_process() -> None:
    """A script's first act: the handlers, for the rest of the process's life."""
    _FLAG.install()


@contextlib.contextmanager
def stop_flag() -> Iterator[StopFlag]:
    """The process's stop flag for one run. Where the script installed it for the whole process, it stays, with any
    signal already received; otherwise (a caller of `train.run` in its own process) the handlers are installed
    for the run and handed back after it, so that the caller can still be stopped."""
    if _FLAG._previous is not None:
        yield _FLAG
        return
    _FLAG.signum = 0
    _FLAG.install()
    try:
        yield _FLAG
    finally:
        _FLAG.restore()
