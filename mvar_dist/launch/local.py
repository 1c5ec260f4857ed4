"""Local multi-process launch (``mvar-dist train --nproc N``): N ranks of one command on this
machine, rendezvous through ``env://`` (no DeepSpeed launcher, no ssh), stop signals forwarded."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Sequence

from mvar_dist.runtime.distributed import RankEnv, free_port

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
# after a rank failed, the others get SIGTERM and this long to exit before SIGKILL: a stopped
# (SIGSTOP) or hung rank never handles SIGTERM
KILL_AFTER_S = 10.0


def launch(nproc: int, command: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` as ``nproc`` ranks on this machine; forward stop signals to all of them.

    Returns 0 when every rank succeeded, else the first non-zero exit code (a rank killed by a
    signal counts as 128 + signal number). When one rank fails the others are terminated.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    base = dict(os.environ if env is None else env)
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        base.pop(name, None)
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = RankEnv(rank, nproc, rank, "127.0.0.1", port)
        procs.append(subprocess.Popen(list(command), env={**base, **rank_env.as_environ()}))

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return _wait_all(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _wait_all(procs: list[subprocess.Popen]) -> int:
    failed, kill_at = 0, None
    while any(proc.poll() is None for proc in procs):
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and not failed:
                failed = _exit_code(code)
                logger.error("rank %d exited with code %d; stopping the other ranks", rank, failed)
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
                kill_at = time.monotonic() + KILL_AFTER_S
        if kill_at is not None and time.monotonic() > kill_at:
            for rank, proc in enumerate(procs):
                if proc.poll() is None:
                    logger.error("rank %d did not exit %.0f s after SIGTERM (stopped or hung): SIGKILL", rank, KILL_AFTER_S)
                    proc.kill()
            kill_at = None
        time.sleep(0.2)
    if not failed:
        failed = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
    return failed
