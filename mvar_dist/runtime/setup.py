"""What every run does before its first step, whatever it trains: the checkpoint to resume from
with its checks (on every rank, before any process group), claiming the run directory (rank 0),
putting the loader where the checkpoint left it, and starting tracking. Called in this order by
:func:`mvar_dist.runtime.loop.run_training`."""

from __future__ import annotations

import logging
from typing import Any

from mvar_dist.config import ConfigError, Experiment, TrackingConfig, kind_of, resume_conflicts, save_resolved
from mvar_dist.run_dir import ResumePoint, RunDir
from mvar_dist.run_state import RunState
from mvar_dist.runtime import checkpoint as checkpoints
from mvar_dist.runtime.collectives import broadcast_from_rank0, on_every_rank
from mvar_dist.runtime.run_lock import RunDirInUse, RunLock
from mvar_dist.runtime.safe_loading import UnsafeCheckpointError
from mvar_dist.tracking import RunTracker, Tracker, read_run_record, resolve_tracking_uri

logger = logging.getLogger(__name__)


def resume_point(run_dir: RunDir, config: Experiment, world_size: int) -> tuple[ResumePoint | None, list[tuple[str, str]]]:
    """The checkpoint to resume from and the damaged tags passed over. A live job's lock,
    another experiment's checkpoint, another world size, damaged or unsafe checkpoints are all
    refused here as ConfigError, before any process group exists."""
    try:  # before reading checkpoints that another job may be writing
        RunLock(run_dir).check()
    except RunDirInUse as error:
        raise ConfigError(str(error)) from None
    latest = run_dir.latest_tag()
    try:  # another experiment's run directory is refused before its files are looked at
        named = run_dir.read_resume_point(latest) if latest is not None else None
    except (FileNotFoundError, ValueError):
        named = None  # its run state is damaged: the search below says so
    if named is not None:
        check_resumable(run_dir, named, config, world_size)
    try:
        point, damaged = checkpoints.find_resume_point(run_dir)
    except (UnsafeCheckpointError, RuntimeError) as error:
        raise ConfigError(str(error)) from None
    if point is not None:
        check_resumable(run_dir, point, config, world_size)
    return point, damaged


def check_resumable(run_dir: RunDir, point: ResumePoint, config: Experiment, world_size: int) -> None:
    changed = resume_conflicts(point.run_state.config, config)
    if changed:
        raise ConfigError(
            f"{run_dir.path} holds a checkpoint ({point.tag}) of a different experiment: {', '.join(changed)} "
            f"changed. Only {', '.join(kind_of(config).resumable_changes)} may change on resume; use a new "
            f"run.dir to start over"
        )
    if point.run_state.world_size != world_size and not point.run_state.resizable:
        raise ConfigError(
            f"{point.tag} was written by {point.run_state.world_size} ranks before runs could change their number "
            f"of ranks; resume it with {point.run_state.world_size} ranks (got {world_size})"
        )


def claim_run_dir(run_dir: RunDir, rank: int, config: Experiment, point: ResumePoint | None,
                  damaged: list[tuple[str, str]]) -> RunLock | None:
    """Rank 0 locks the run directory (every rank learns if that failed), then writes the
    resolved config, sets damaged checkpoints aside and prunes old ones. Collective."""
    lock = RunLock(run_dir) if rank == 0 else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirInUse as error:
            refused = str(error)
    refused = broadcast_from_rank0(refused)
    if refused is not None:
        raise ConfigError(refused)
    if lock is not None:
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        save_resolved(config, run_dir.config_file)
        if point is not None and damaged:
            checkpoints.set_aside_damaged(run_dir, damaged, point)
        checkpoints.prune_checkpoints(run_dir, config.checkpoint.keep_last)
    return lock


def restore_loader(loader: Any, state: dict[str, Any], run_dir: RunDir, point: ResumePoint) -> None:
    """Put the loader where the checkpoint left it. Data locations may change on resume, but a
    position only means something for the same samples and seed: other data is a user error."""
    try:
        loader.load_state_dict(state)
    except ValueError as err:
        raise ConfigError(f"cannot resume {run_dir.tag_dir(point.tag)}: {err}; point the data back at the "
                          "run's own, or start a new run.dir") from None


def start_tracking(config: Experiment, config_hash: str, run_dir: RunDir, saved: RunState | None, rank: int) -> Tracker:
    """The MLflow run: the checkpoint's, else the one ``mlflow_run.json`` names (a run killed
    before its first checkpoint continues its run), with what the checkpoint could not send."""
    tracking: TrackingConfig = config.tracking
    run_id = saved.mlflow_run_id if saved is not None else None
    undelivered = saved.undelivered_metrics if saved is not None else None
    if run_id is None and rank == 0:
        run_id = recorded_run_id(run_dir, tracking.uri)
    return on_every_rank(lambda: RunTracker.create(
        config.to_dict(), run_dir.path, tracking.uri, tracking.experiment, run_id, rank,
        timeout_s=tracking.timeout_s, retry_interval_s=tracking.retry_interval_s, undelivered=undelivered,
        config_hash=config_hash, same_config_only=saved is None,
    ))


def recorded_run_id(run_dir: RunDir, tracking_uri: str | None) -> str | None:
    """The MLflow run ``mlflow_run.json`` names, if it is on the store this run logs to."""
    try:
        record = read_run_record(run_dir.path)
    except ValueError as error:  # a damaged record must not stop training: a new run starts
        logger.warning("%s", error)
        return None
    if record is None or record.tracking_uri != resolve_tracking_uri(tracking_uri, run_dir.path):
        return None
    return record.run_id
