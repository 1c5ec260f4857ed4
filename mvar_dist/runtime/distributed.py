"""The rank environment: who this process is (rank, world size, local rank) and where ranks
meet (env:// rendezvous). Launchers build it with :class:`RankEnv` (local ranks, SLURM tasks);
the run skeleton reads it back, from the torch variables or from SLURM's own, and joins the
process group (:func:`init_distributed`)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def as_environ(self) -> dict[str, str]:
        """The torch variables env:// rendezvous reads; every launcher sets exactly these."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }


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
    os.environ.update(rank_env.as_environ())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(rank_env: RankEnv, backend: str | None) -> torch.device:
    """env:// rendezvous (gloo on CPU, NCCL on GPUs unless ``backend`` says otherwise); returns
    this rank's device."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    export_rank_env(rank_env)
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"), init_method="env://")
    if cuda:
        torch.cuda.set_device(rank_env.local_rank)
        return torch.device("cuda", rank_env.local_rank)
    return torch.device("cpu")


def leave_distributed() -> None:
    """Destroy the process group once this rank's run is complete (every collective done).

    Left to interpreter exit, the group's gloo threads are torn down in no set order, and a rank
    of a finished run can die with SIGABRT ("terminate called without an active exception");
    seen on ranks started by torchrun, whose store lives in the agent. Not called after an
    error: a peer may still be blocked in a collective with this rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
