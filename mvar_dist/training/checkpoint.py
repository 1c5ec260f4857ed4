"""Checkpoints a killed job resumes from exactly: every rank's DeepSpeed state plus its RNG and
data-loader state, ``latest`` moved last, old tags pruned. The layout is
:class:`mvar_dist.run_dir.RunDir`'s; this module is the only writer."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mvar_dist.atomic import write_bytes, write_json, write_via_temp
from mvar_dist.run_dir import ResumePoint, RunDir, tag_for

logger = logging.getLogger(__name__)


# ----- RNG states -----


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every generator training draws from (label drop and drop path use torch's global one)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value


# ----- checkpoint files -----


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any, run_dir: RunDir, step: int, run_state: dict[str, Any], rank_state: dict[str, Any], keep_last: int,
) -> Path:
    """Collective: every rank writes its part; ``latest`` moves only once all have finished."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    engine.save_checkpoint(str(run_dir.checkpoints), tag=tag, client_state={"run_state": run_state}, save_latest=False)
    run_dir.tag_dir(tag).mkdir(parents=True, exist_ok=True)
    write_via_temp(run_dir.rank_file(tag, rank), lambda tmp: torch.save(rank_state, tmp))
    if rank == 0:
        write_json(run_dir.run_state_file(tag), run_state)
    _barrier()
    if rank == 0:
        write_bytes(run_dir.latest_file, (tag + "\n").encode())
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", run_dir.tag_dir(tag))
    return run_dir.tag_dir(tag)


def prune_checkpoints(run_dir: RunDir, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete tags; drop older ones and any newer than ``latest``
    (left half-written by a killed save)."""
    point = run_dir.read_latest()
    if point is None:
        return
    steps = run_dir.tag_steps()
    complete = [s for s in steps if s <= point.step]
    keep = set(complete[-keep_last:]) | {point.step}
    for s in steps:
        if s not in keep:
            shutil.rmtree(run_dir.tag_dir(tag_for(s)), ignore_errors=True)


def load_checkpoint(engine: Any, run_dir: RunDir, point: ResumePoint) -> dict[str, Any]:
    """Load weights, optimizer and lr scheduler into ``engine``; returns this rank's extra state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, _ = engine.load_checkpoint(
        str(run_dir.checkpoints), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {run_dir.tag_dir(point.tag)}")
    rank_file = run_dir.rank_file(point.tag, rank)
    if not rank_file.is_file():
        raise RuntimeError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks than this job has; "
            f"resume with the same world size"
        )
    return torch.load(rank_file, map_location="cpu", weights_only=True)
