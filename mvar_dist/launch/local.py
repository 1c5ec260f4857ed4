"""Local multi-process launch (``mvar-dist train --nproc N``): N ranks of one command on this
machine, rendezvous through ``env://`` (no DeepSpeed launcher, no ssh), stop signals forwarded.

With several nodes (``--nnodes M --node-rank R --master-addr A``) the same command runs on every
node and each launcher starts its node's N ranks of the N x M: ranks R*N..R*N+N-1, all meeting
at A's port. The launchers never talk to each other; the ranks do, through the process group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mvar_dist.runtime.distributed import RankEnv, free_port

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
# after a rank failed, the others get SIGTERM and this long to exit before SIGKILL: a stopped
# (SIGSTOP) or hung rank never handles SIGTERM
KILL_AFTER_S = 10.0
# exit status of a rank that stopped on an error in the input (mvar_dist.commands.reporting.USER_ERROR)
USER_ERROR = 2


@dataclass(frozen=True)
class Nodes:
    """Where this launcher's ranks sit in the job: ``count`` nodes, this one ``rank``, all ranks
    meeting at ``master_addr:master_port`` (None: a free port, for a single node only)."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.rank < self.count:
            raise ValueError(f"node rank {self.rank} is out of range for {self.count} nodes")
        if self.count > 1 and self.master_port is None:
            raise ValueError("several nodes need a fixed master port: a free port differs from node to node")


def launch(nproc: int, command: Sequence[str], env: dict[str, str] | None = None, nodes: Nodes = Nodes()) -> int:
    """Run ``command`` as ``nproc`` ranks on this machine (this node's share of ``nodes``);
    forward stop signals to all of them.

    Returns 0 when every rank succeeded, else the first non-zero exit code (a rank killed by a
    signal counts as 128 + signal number). When one rank fails the others are terminated.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    base = dict(os.environ if env is None else env)
    # an outer srun or torchrun describes another layout: a rank reading SLURM_* would take it for
    # its own, and TORCHELASTIC_USE_AGENT_STORE would make rank 0 wait for a store no agent hosts
    for name in list(base):
        if name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") or name.startswith("TORCHELASTIC_"):
            del base[name]
    port = nodes.master_port if nodes.master_port is not None else free_port()
    world, first = nproc * nodes.count, nodes.rank * nproc
    if nodes.count > 1:
        logger.info("node %d of %d: starting ranks %d..%d of %d, meeting at %s:%d",
                    nodes.rank, nodes.count, first, first + nproc - 1, world, nodes.master_addr, port)
    procs = []
    for local in range(nproc):
        rank_env = RankEnv(first + local, world, local, nodes.master_addr, port)
        procs.append(subprocess.Popen(
            list(command), env={**base, **rank_env.as_environ(), "LOCAL_WORLD_SIZE": str(nproc)}))

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = _wait_all(procs, first)
        if code == USER_ERROR and nodes.rank > 0:
            # a config error is printed by global rank 0 only (every rank finds the same one)
            logger.error("a rank of this node stopped on an error in the input (exit status 2); if no message "
                         "above names it, the output of the node with --node-rank 0 does")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _wait_all(procs: list[subprocess.Popen], first_rank: int = 0) -> int:
    failed, kill_at = 0, None
    while any(proc.poll() is None for proc in procs):
        for local, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and not failed:
                failed = _exit_code(code)
                logger.error("rank %d exited with code %d; stopping the other ranks", first_rank + local, failed)
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
                kill_at = time.monotonic() + KILL_AFTER_S
        if kill_at is not None and time.monotonic() > kill_at:
            for local, proc in enumerate(procs):
                if proc.poll() is None:
                    logger.error("rank %d did not exit %.0f s after SIGTERM (stopped or hung): SIGKILL",
                                 first_rank + local, KILL_AFTER_S)
                    proc.kill()
            kill_at = None
        time.sleep(0.2)
    if not failed:
        failed = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
    return failed
