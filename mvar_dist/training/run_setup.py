"""The setup every training run shares (the transformer's and the tokenizer's): finding the
checkpoint to resume from with its checks, distributed init, claiming the run directory, and
starting tracking. Each step is a function of what it needs, so both trainers call the same."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import torch

from mvar_dist.config import ConfigError, TrackingConfig
from mvar_dist.run_dir import ResumePoint, RunDir
from mvar_dist.tracking import RunTracker, Tracker, read_run_record, resolve_tracking_uri
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training import engine as engine_lib
from mvar_dist.training.distributed import RankEnv, export_rank_env
from mvar_dist.training.run_lock import RunDirInUse, RunLock
from mvar_dist.training.safe_loading import UnsafeCheckpointError

logger = logging.getLogger(__name__)


def resume_point(run_dir: RunDir, check: Callable[[ResumePoint], None]) -> tuple[ResumePoint | None, list[tuple[str, str]]]:
    """The checkpoint to resume from and the damaged tags passed over, on any rank, before any
    process group: a live job's lock, another experiment's checkpoint (``check`` raises), damaged
    or unsafe checkpoints are all refused as ConfigError here."""
    try:  # before reading checkpoints that another job may be writing
        RunLock(run_dir).check()
    except RunDirInUse as error:
        raise ConfigError(str(error)) from None
    latest = run_dir.latest_tag()
    try:  # another experiment's run directory is refused before its files are looked at
        named = run_dir.read_resume_point(latest) if latest is not None else None
    except (FileNotFoundError, ValueError, KeyError):
        named = None  # its run state is damaged: the search below says so
    if named is not None:
        check(named)
    try:
        point, damaged = checkpoints.find_resume_point(run_dir)
    except (UnsafeCheckpointError, RuntimeError) as error:
        raise ConfigError(str(error)) from None
    if point is not None:
        check(point)
    return point, damaged


def check_world_size(point: ResumePoint, world: int) -> None:
    if point.run_state.get("world_size") != world:
        raise ConfigError(
            f"{point.tag} was written by {point.run_state.get('world_size')} ranks; "
            f"resume it with the same number of ranks (got {world})"
        )


def init_distributed(rank_env: RankEnv, backend: str | None) -> torch.device:
    """env:// rendezvous (gloo on CPU, NCCL on GPUs unless ``backend`` says otherwise)."""
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


def claim_run_dir(run_dir: RunDir, rank: int, save_config: Callable[[], None], point: ResumePoint | None,
                  damaged: list[tuple[str, str]], keep_last: int) -> RunLock | None:
    """Rank 0 locks the run directory (every rank learns if that failed), then writes the
    resolved config, sets damaged checkpoints aside and prunes old ones. Collective."""
    lock = RunLock(run_dir) if rank == 0 else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirInUse as error:
            refused = str(error)
    refused = engine_lib.broadcast_from_rank0(refused)
    if refused is not None:
        raise ConfigError(refused)
    if lock is not None:
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config()
        if point is not None and damaged:
            checkpoints.set_aside_damaged(run_dir, damaged, point)
        checkpoints.prune_checkpoints(run_dir, keep_last)
    return lock


def start_tracking(config_dict: Mapping[str, Any], run_dir: RunDir, tracking: TrackingConfig, point: ResumePoint | None,
                   rank: int, config_hash: str) -> Tracker:
    """The MLflow run: the checkpoint's, else the one ``mlflow_run.json`` names (a run killed
    before its first checkpoint continues its run), with what the checkpoint could not send."""
    run_id, undelivered = None, None
    if point is not None:
        run_id, undelivered = point.run_state.get("mlflow_run_id"), point.run_state.get("undelivered_metrics")
    if run_id is None and rank == 0:
        run_id = recorded_run_id(run_dir, tracking.uri)
    return engine_lib.on_every_rank(lambda: RunTracker.create(
        config_dict, run_dir.path, tracking.uri, tracking.experiment, run_id, rank,
        timeout_s=tracking.timeout_s, retry_interval_s=tracking.retry_interval_s, undelivered=undelivered,
        config_hash=config_hash, same_config_only=point is None,
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


def restore_loader(loader: Any, state: Mapping[str, Any], run_dir: RunDir, point: ResumePoint) -> None:
    """Put the loader where the checkpoint left it. Data locations may change on resume, but a
    position only means something for the same samples and seed: other data is a user error."""
    try:
        loader.load_state_dict(state)
    except ValueError as err:
        raise ConfigError(f"cannot resume {run_dir.tag_dir(point.tag)}: {err}; point the data back at the "
                          "run's own, or start a new run.dir") from None


def run_loop(loop: Any, step: int, tracker: Tracker, stop: Any, rng: Any, seed: int, device: torch.device) -> int:
    """Install the stop handlers, restore (or seed) the random generators last, so that nothing
    draws from them before the first step, run the loop, and end the MLflow run with its status.
    Exit code 0 for a finished or stopped run (a stop resumes), 1 otherwise."""
    stop.install()
    if rng is not None:
        checkpoints.set_rng_states(rng, device)
    else:
        checkpoints.seed_all(seed)
    status = "FAILED"
    try:
        status = loop.run(step)
    finally:
        tracker.finish(status)
    return 0 if status in ("FINISHED", "KILLED") else 1
