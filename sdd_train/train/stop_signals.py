"""SIGTERM and SIGUSR1 (Slurm's preemption warning, ``scancel``, a node's shutdown) are recorded from
the moment ``sdd-train`` starts, not only once training does: the default action of both kills the
process, so one that arrived while the data was prepared or the model built would end a worker with a
traceback and no word of why. Recorded, it stops the run before its first step (exit 0); the
checkpointing callback acts on one that arrives later."""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """The stop signal this process received (0: none), recorded by handlers that ``install`` sets and
    ``restore`` removes again (nested installs keep the first one's previous handlers). The first
    install forgets an earlier run's signal; ``restore`` keeps it, so a caller that trained in its own
    process (a test, ``make matrix``) can tell a run that was stopped from one that finished."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def install(self) -> None:
        if not self._previous:
            self.received = 0
        for sig in STOP_SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


STOPS = StopSignals()  # this process's: signal handlers are per process
