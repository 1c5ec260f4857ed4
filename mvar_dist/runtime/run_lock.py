"""One job per run directory: a lock file that rank 0 holds while it trains.

Two jobs writing checkpoints into one run directory would interleave tags and overwrite each
other's ``latest``. The lock (``<run.dir>/.lock``, JSON: host, pid, SLURM job id, heartbeat)
is created exclusively; a later job refuses to start while its owner lives. A lock whose owner
is gone does not block forever: it is *stale* when its process is dead (same host), when it
belongs to this very SLURM job (a requeue), when its SLURM job no longer runs, or when its
heartbeat is older than :data:`STALE_AFTER_S` (an owner on another host that we cannot ask).
A stale lock is taken over with an atomic rename, so two jobs cannot both take it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from mvar_dist.atomic import write_json
from mvar_dist.run_dir import RunDir

logger = logging.getLogger(__name__)

STALE_AFTER_S = 15 * 60
HEARTBEAT_EVERY_S = 60


class RunDirInUse(RuntimeError):
    """Another live job trains into this run directory."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "heartbeat": time.time()}


def _slurm_job_running(job: str) -> bool | None:
    """True/False from squeue; None when there is no squeue to ask."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.returncode == 0 and any(s in out.stdout for s in ("RUNNING", "COMPLETING", "CONFIGURING"))


def stale_reason(owner: dict[str, Any]) -> str | None:
    """Why the lock of ``owner`` no longer protects anything, or None while its owner may live."""
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return f"process {owner['pid']} on this host is gone"
        except PermissionError:
            pass
        return None  # alive on this host (even within this SLURM job: two runs, one directory)
    job = owner.get("job")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        return f"it is this job's ({job}) own lock from before a requeue"
    if job and _slurm_job_running(str(job)) is False:
        return f"SLURM job {job} no longer runs"
    age = time.time() - float(owner.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age / 60:.0f} min old"
    return None


class RunLock:
    """Held by rank 0 from before it writes into the run directory until the run ends."""

    def __init__(self, run_dir: RunDir) -> None:
        self.path = run_dir.lock_file
        self._last_beat = 0.0

    def check(self) -> None:
        """Refuse early (any rank, nothing written) when a live job holds the lock; the
        exclusive claim comes later, in :meth:`acquire`."""
        try:
            owner = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return
        if stale_reason(owner) is None:
            raise RunDirInUse(_in_use(self.path, owner))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another job may take over or release between our steps
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            self._last_beat = time.monotonic()
            return
        raise RunDirInUse(f"could not lock {self.path}: another job keeps taking it")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            owner = {}  # half-written by a job killed at that instant: judge it by its age
            owner["heartbeat"] = self.path.stat().st_mtime
        reason = stale_reason(owner)
        if reason is None:
            raise RunDirInUse(_in_use(self.path, owner))
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)  # only one of several contenders finds the file to move
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        logger.warning("taking over the stale lock of %s: %s", self.path.parent, reason)

    def heartbeat(self) -> None:
        """Cheap to call every step: rewrites the lock only every HEARTBEAT_EVERY_S."""
        if time.monotonic() - self._last_beat >= HEARTBEAT_EVERY_S:
            write_json(self.path, _owner())
            self._last_beat = time.monotonic()

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass


def _in_use(path: Path, owner: dict[str, Any]) -> str:
    return (
        f"run directory {path.parent} is in use by process {owner.get('pid')} on {owner.get('host')}"
        + (f" (SLURM job {owner['job']})" if owner.get("job") else "")
        + f"; stop that job or choose another run.dir. If it is certainly dead, delete {path}"
    )
