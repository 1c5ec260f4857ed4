"""Local multi-process launch (``mvar-dist train --nproc N``) and the rank environment.

Ranks rendezvous through ``env://`` (MASTER_ADDR/MASTER_PORT); there is no DeepSpeed launcher
and no ssh. Under SLURM the same program reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID when
the torch variables are absent.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first(env: dict[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name) not in (None, ""):
            return env[name]
    return None


def read_rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """RANK/WORLD_SIZE/LOCAL_RANK, else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, else one rank."""
    env = dict(os.environ if environ is None else environ)
    rank = int(_first(env, "RANK", "SLURM_PROCID") or 0)
    world = int(_first(env, "WORLD_SIZE", "SLURM_NTASKS") or 1)
    local = int(_first(env, "LOCAL_RANK", "SLURM_LOCALID") or 0)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    if world > 1 and not env.get("MASTER_ADDR") and "SLURM_PROCID" in env:
        raise RuntimeError("MASTER_ADDR is not set: the SLURM launcher must export the first node's address")
    # a lone rank picks a free port, so that single-process runs on one machine never collide
    port = int(env.get("MASTER_PORT") or (free_port() if world == 1 else 29500))
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is out of range for world size {world}")
    return RankEnv(rank, world, local, addr, port)


def export_rank_env(rank_env: RankEnv) -> None:
    """Make the torch variables exist for env:// even when we came from SLURM's."""
    os.environ.update(
        RANK=str(rank_env.rank), WORLD_SIZE=str(rank_env.world_size), LOCAL_RANK=str(rank_env.local_rank),
        MASTER_ADDR=rank_env.master_addr, MASTER_PORT=str(rank_env.master_port),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc))
    procs = []
    for rank in range(nproc):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(list(command), env=rank_env))

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
    failed = 0
    while any(proc.poll() is None for proc in procs):
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and not failed:
                failed = _exit_code(code)
                logger.error("rank %d exited with code %d; stopping the other ranks", rank, failed)
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
        time.sleep(0.2)
    if not failed:
        failed = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
    return failed
