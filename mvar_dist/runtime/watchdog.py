"""Ending a job whose ranks stopped making progress (``train.hang_timeout_s``).

A rank that hangs (stopped, deadlocked, blocked in a read of a dead file system) never fails:
the other ranks wait for it in their next collective, forever, and a SLURM job burns its whole
allocation. Each rank therefore watches itself: the step loop calls :meth:`HangWatchdog.beat`
whenever it finishes a step, an evaluation or a checkpoint, and a daemon thread ends the
process with :data:`EXIT_HUNG` once no beat came for ``timeout_s``. A rank stuck in I/O sees
this itself; a rank that is stopped cannot, but every other rank is then stuck in a
collective waiting for it, and each of those ends. The launcher (``mvar-dist train --nproc``,
or srun's ``--kill-on-bad-exit``) then stops what is left, the stopped rank included. The
thread never touches shared storage: no cross-node clocks, no polling of a file system.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

EXIT_HUNG = 3  # docs/troubleshooting.md, "Exit codes"

# what a launcher does when one of its ranks ends hung, before the process exits: under SLURM,
# requeue the job (mvar_dist.launch.job); run after the watchdog's own cleanup
_hang_actions: list[Callable[[], None]] = []


def on_hang(action: Callable[[], None]) -> None:
    """Run ``action`` in a rank that ends itself for lack of progress, just before it exits."""
    _hang_actions.append(action)


class HangWatchdog:
    """Exits the process with EXIT_HUNG when :meth:`beat` was not called for ``timeout_s``;
    ``before_exit`` runs first (release the run lock). ``timeout_s`` 0 turns it off."""

    def __init__(self, rank: int, timeout_s: float, before_exit: Callable[[], None] = lambda: None) -> None:
        self.rank, self.timeout_s, self.before_exit = rank, timeout_s, before_exit
        self.step = 0
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mvar-dist-hang-watchdog", daemon=True)

    def start(self) -> "HangWatchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self._last = step, time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        poll = min(10.0, self.timeout_s / 4)
        while not self._done.wait(poll):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                self._end(idle)

    def _end(self, idle: float) -> None:
        logger.error(
            "rank %d made no progress for %.0f s after step %d (train.hang_timeout_s=%g): a rank is stopped, "
            "deadlocked or blocked in I/O, or this rank waits for one; ending the job (exit status %d). "
            "Resume with the same command", self.rank, idle, self.step, self.timeout_s, EXIT_HUNG,
        )
        for action in (self.before_exit, *_hang_actions):
            try:
                action()
            except Exception:  # noqa: BLE001 - the process must end whatever the cleanup does
                logger.exception("cleanup before ending the hung rank failed")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_HUNG)  # the main thread is stuck: only a hard exit ends the process
