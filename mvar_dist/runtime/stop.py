"""Stopping on a signal: SIGTERM, SIGUSR2 (SLURM's pre-timeout and preemption signal) and SIGINT
set a flag; the loop makes every rank agree at the end of the step, saves and returns."""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.requested = True
        self.signal_name = reason
