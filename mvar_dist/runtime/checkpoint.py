"""Checkpoints a killed job resumes from exactly: every engine's DeepSpeed state, rank 0's
:class:`~mvar_dist.run_state.RunState` and every rank's :class:`~mvar_dist.run_state.RankState`,
``latest`` moved last, old tags pruned; and, on resume, the newest complete tag (falling back
past damaged ones). The layout is :class:`mvar_dist.run_dir.RunDir`'s, the run-state files
:mod:`mvar_dist.run_state`'s; this module is the only writer of ``checkpoints/``."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mvar_dist.atomic import fsync_path, write_bytes, write_json
from mvar_dist.run_dir import FILES_RECORD, ResumePoint, RunDir, step_of, tag_for
from mvar_dist.run_state import RankState, RunState, read_rank_state, write_rank_state, write_run_state
from mvar_dist.runtime import resize
from mvar_dist.runtime.collectives import broadcast_from_rank0
from mvar_dist.runtime.safe_loading import inspect_files, weights_only_loading

logger = logging.getLogger(__name__)

_PER_RANK = re.compile(r"zero_pp_rank_(\d+)_|^rank_(\d+)\.pt$")


@dataclass(frozen=True)
class Engines:
    """The DeepSpeed engines of a run: ``main`` is saved at the top of each tag, every one of
    ``others`` (a discriminator) in a sub-directory of the tag named after its key."""

    main: Any
    others: dict[str, Any] = field(default_factory=dict)


# ----- checkpoint files -----


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only or forbidden directory): one
    line for the user; the previous checkpoint stays ``latest``."""


def _write_failure(run_dir: RunDir, tag: str, error: BaseException) -> CheckpointWriteError | None:
    """What went wrong, in words, when the storage is the cause (None otherwise): DeepSpeed's
    writer reports a full disk as ``basic_ios::clear: iostream error`` or ``unexpected pos``,
    with no path and no errno."""
    directory = run_dir.checkpoints
    free = shutil.disk_usage(directory).free if directory.is_dir() else 0
    errno_ = getattr(error, "errno", None)
    if errno_ == errno.ENOSPC or free < 2**20:
        cause = f"No space left on device ({free / 2**20:.1f} MiB free)"
    elif errno_ in (errno.EACCES, errno.EPERM, errno.EROFS) or not os.access(directory, os.W_OK):
        cause = "permission denied or read-only file system"
    else:  # not the storage (a peer that died mid-save, a bug): the original error says more
        return None
    latest = run_dir.latest_tag()
    kept = f"{latest} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
    return CheckpointWriteError(f"checkpoint {tag}: cannot write {directory}: {cause}; {kept}. "
                                "Make room (or fix the directory) and run the same command to resume")


def save_checkpoint(engines: Engines, run_dir: RunDir, run_state: RunState, rank_state: RankState,
                    keep_last: int) -> Path:
    """Collective: every rank writes its part and makes it durable; ``latest`` moves only once
    all files of the tag and the tag directory are on disk (a node crash may lose the newest
    tag, never leave ``latest`` naming a tag that is incomplete). A write that fails raises
    :class:`CheckpointWriteError` saying why."""
    tag = tag_for(run_state.step)
    try:
        return _save(engines, run_dir, run_state, rank_state, keep_last)
    except (OSError, RuntimeError) as error:
        failure = _write_failure(run_dir, tag, error)
        if failure is None:
            raise
        raise failure from error


def _save(engines: Engines, run_dir: RunDir, run_state: RunState, rank_state: RankState, keep_last: int) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(run_state.step)
    tag_dir = run_dir.tag_dir(tag)
    info = resize.universal_info()  # what lets the tag resume on another world size
    engines.main.save_checkpoint(str(run_dir.checkpoints), tag=tag, client_state={"run_state": run_state.to_json(), **info},
                                 save_latest=False)
    for name, other in engines.others.items():
        other.save_checkpoint(str(tag_dir), tag=name, client_state=info, save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    write_rank_state(run_dir.rank_file(tag, rank), rank_state)
    for path in _files(tag_dir):
        if _written_by(path.name, rank):  # DeepSpeed writes without fsync
            fsync_path(path)
    _barrier()
    if rank == 0:
        write_run_state(run_dir.run_state_file(tag), run_state)
        sizes = {str(p.relative_to(tag_dir)): p.stat().st_size for p in _files(tag_dir)}
        write_json(run_dir.tag_dir(tag) / FILES_RECORD, sizes)
        for directory in [*(tag_dir / name for name in engines.others), tag_dir]:
            fsync_path(directory)
        write_bytes(run_dir.latest_file, (tag + "\n").encode())
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", tag_dir)
    return tag_dir


def _files(tag_dir: Path) -> list[Path]:
    """Every file of a tag, sub-directories included; temporary names (another rank's atomic
    write in progress) are not files of the tag yet."""
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def _written_by(name: str, rank: int) -> bool:
    """Which rank makes a file of a tag durable: per-rank files (DeepSpeed's ``zero_pp_rank_<r>_``,
    our ``rank_<r>.pt``) their writer, everything else rank 0."""
    per_rank = _PER_RANK.search(name)
    return int(per_rank.group(1) or per_rank.group(2)) == rank if per_rank else rank == 0


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


def load_checkpoint(engines: Engines, run_dir: RunDir, point: ResumePoint, world_size: int = 1) -> RankState:
    """Load weights, optimizer and DeepSpeed state into the engines, as saved (no unpickling of
    anything but tensors and DeepSpeed's few types); returns this rank's state. A checkpoint of
    another world size is loaded through its universal copy (:mod:`mvar_dist.runtime.resize`),
    built by the engines with ``checkpoint.load_universal``; each rank then takes the rank state
    of rank ``rank mod old world size`` (the loader's position is the same on every rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    saved_world = point.run_state.world_size
    resized = saved_world != world_size
    root = run_dir.checkpoints
    if resized:
        failure = None
        if rank == 0:
            try:
                resize.prepare_universal(run_dir, point.tag, list(engines.others))
            except RuntimeError as error:
                failure = str(error)
        failure = broadcast_from_rank0(failure)  # the other ranks wait for the conversion here
        if failure is not None:
            raise RuntimeError(failure)
        root = resize.universal_root(run_dir)
    loads = [(engines.main, root, point.tag), *((e, root / point.tag, n) for n, e in engines.others.items())]
    # ZeRO-3's universal loading gives every parameter group the first group's hyperparameters (a
    # decay group and a no-decay group would both decay): the config's values are put back after it
    settings = [_group_settings(target) for target, _, _ in loads]
    for target, directory, tag in loads:
        with weights_only_loading():
            path, _ = target.load_checkpoint(
                str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
    if resized:
        for (target, _, _), saved in zip(loads, settings):
            for group, values in zip(target.optimizer.param_groups, saved):
                group.update(values)
        _barrier()
        if rank == 0:
            resize.remove_universal(run_dir)
    rank_file = run_dir.rank_file(point.tag, rank % saved_world)
    if not rank_file.is_file():
        raise RuntimeError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks than this job has; "
            f"resume with the same world size"
        )
    return read_rank_state(rank_file)


def _group_settings(engine: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]


# ----- finding a checkpoint to resume from -----


def damage(run_dir: RunDir, tag: str) -> str | None:
    """What is wrong with checkpoint ``tag`` (missing, truncated or unreadable files), or None.
    Raises UnsafeCheckpointError for a file that would run code when loaded."""
    tag_dir = run_dir.tag_dir(tag)
    if not tag_dir.is_dir():
        return "the tag directory is missing"
    try:
        point = run_dir.read_resume_point(tag)
    except (FileNotFoundError, ValueError, KeyError) as error:
        return f"{run_dir.run_state_file(tag).name} is missing or unreadable ({error})"
    record = tag_dir / FILES_RECORD
    if record.is_file():  # tags of earlier versions have none: their files are only inspected
        for name, size in json.loads(record.read_text()).items():
            path = tag_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} when it was written"
    for rank in range(point.run_state.world_size):
        if not run_dir.rank_file(tag, rank).is_file():
            return f"{run_dir.rank_file(tag, rank).name} is missing"
    return inspect_files(tag_dir)


def find_resume_point(run_dir: RunDir) -> tuple[ResumePoint | None, list[tuple[str, str]]]:
    """The checkpoint to resume from: the tag ``latest`` names, or, if that one is damaged (a node
    crash, a full disk), the newest older tag that is complete. Returns it with the (tag, reason)
    of every damaged tag passed over; None for a fresh run."""
    latest = run_dir.latest_tag()
    if latest is None:
        return None, []
    newest = step_of(latest)
    older = [tag_for(s) for s in reversed(run_dir.tag_steps()) if newest is None or s < newest]
    damaged: list[tuple[str, str]] = []
    for tag in [latest, *older]:
        problem = damage(run_dir, tag)
        if problem is None:
            return run_dir.read_resume_point(tag), damaged
        damaged.append((tag, problem))
        logger.error("checkpoint %s is damaged: %s", run_dir.tag_dir(tag), problem)
    raise RuntimeError(
        f"no complete checkpoint in {run_dir.checkpoints} (damaged: {damaged}); move the checkpoints "
        f"directory aside to start this run over (and {run_dir.mlflow_record.name}, for a new MLflow run)"
    )


def set_aside_damaged(run_dir: RunDir, damaged: list[tuple[str, str]], point: ResumePoint) -> None:
    """Rank 0, on resuming from an older ``point``: rename the damaged tags ``<tag>.damaged``
    (kept for inspection, never deleted) and point ``latest`` at ``point``."""
    for tag, reason in damaged:
        source = run_dir.tag_dir(tag)
        if source.is_dir():
            target = source.with_name(f"{tag}.damaged")
            suffix = 1
            while target.exists():
                target, suffix = source.with_name(f"{tag}.damaged-{suffix}"), suffix + 1
            source.rename(target)
            logger.error("kept the damaged checkpoint as %s (%s)", target, reason)
    write_bytes(run_dir.latest_file, (point.tag + "\n").encode())
    logger.error("falling back to %s: resuming at step %d", point.tag, point.step)
