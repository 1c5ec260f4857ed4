"""One training run on one rank: everything checked before compute, distributed init, the lock
on the run directory, model, engine, resume (falling back past damaged checkpoints) and
tracking; then :class:`mvar_dist.training.loop.TrainingLoop` runs the steps."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from mvar_dist.config import (
    RESUMABLE_CHANGES,
    ConfigError,
    ExperimentConfig,
    compatibility_hash,
    incompatible_keys,
    save_resolved,
    validate,
)
from mvar_dist.model.released import load_released_weights
from mvar_dist.model.transformer import MVAR
from mvar_dist.run_dir import ResumePoint, RunDir
from mvar_dist.tokenizer import Tokenizer, load_tokenizer
from mvar_dist.tracking import RunTracker, Tracker, read_run_record, resolve_tracking_uri
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training import engine as engine_lib
from mvar_dist.training.distributed import export_rank_env, read_rank_env
from mvar_dist.training.loop import TrainingLoop
from mvar_dist.training.run_lock import RunDirInUse, RunLock
from mvar_dist.training.safe_loading import UnsafeCheckpointError
from mvar_dist.training.step import StopFlag

logger = logging.getLogger(__name__)


def build_tokenizer(config: ExperimentConfig, device: torch.device) -> Tokenizer:
    """The experiment's tokenizer (``tokenizer`` section); ConfigError naming the file if it fails."""
    section = config.tokenizer
    if section.checkpoint is None:
        raise ConfigError("tokenizer.checkpoint is required: the teacher input is computed from the codes with it")
    try:
        return load_tokenizer(section.checkpoint, section.kind, section.options, device)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"tokenizer.checkpoint {section.checkpoint}: {err}") from None


class Trainer:
    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.rank_env = read_rank_env()
        self.rank = self.rank_env.rank
        self.world = self.rank_env.world_size
        self.run_dir = RunDir(Path(config.run.dir))
        self.config_dict = config.to_dict()
        self.stop = StopFlag()
        self.val_loader: Any = None
        self.damaged: list[tuple[str, str]] = []  # checkpoint tags found damaged, passed over

    # ----- setup -----

    def _check_before_compute(self) -> ResumePoint | None:
        """Everything that can be wrong with the inputs, on every rank, before any process group."""
        validate(self.config, self.world)
        try:  # before reading checkpoints that another job may be writing
            RunLock(self.run_dir).check()
        except RunDirInUse as error:
            raise ConfigError(str(error)) from None
        latest = self.run_dir.latest_tag()
        try:  # another experiment's run directory is refused before its files are looked at
            named = self.run_dir.read_resume_point(latest) if latest is not None else None
        except (FileNotFoundError, ValueError, KeyError):
            named = None  # its run state is damaged: the search below says so
        if named is not None:
            self._check_resumable(named)
        try:
            point, self.damaged = checkpoints.find_resume_point(self.run_dir)
        except (UnsafeCheckpointError, RuntimeError) as error:
            raise ConfigError(str(error)) from None
        if point is not None:
            self._check_resumable(point)
        return point

    def _check_resumable(self, point: ResumePoint) -> None:
        changed = incompatible_keys(point.run_state["config"], self.config_dict)
        if changed:
            raise ConfigError(
                f"{self.run_dir.path} holds a checkpoint ({point.tag}) of a different experiment: "
                f"{', '.join(changed)} changed. Only {', '.join(RESUMABLE_CHANGES)} may change on "
                f"resume; use a new run.dir to start over"
            )
        if point.run_state.get("world_size") != self.world:
            raise ConfigError(
                f"{point.tag} was written by {point.run_state.get('world_size')} ranks; "
                f"resume it with the same number of ranks (got {self.world})"
            )

    def _build_data(self, tokenizer: Tokenizer) -> tuple[Any, Any]:
        """The train loader and, with ``train.val_every_steps``, the validation loader (else None)."""
        from mvar_dist import data as data_lib
        from mvar_dist.shards.manifest import check_manifest_matches, check_same_classes

        model, batch = self.config.model, self.config.train.micro_batch_size
        loaders = []
        try:
            loaders.append(data_lib.build_train_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch))
            if self.config.train.val_every_steps > 0:
                loaders.append(data_lib.build_val_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch))
            for loader in loaders:
                check_manifest_matches(loader.manifest, model.patch_nums, model.vocab_size, tokenizer.identity())
            if len(loaders) > 1:  # class indices are positions in the class list: it must be the same
                check_same_classes(loaders[0].manifest, loaders[1].manifest)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from None
        for loader in loaders:
            if int(loader.manifest.num_classes) > model.num_classes:
                raise ConfigError(
                    f"data: {loader.manifest.location} has {loader.manifest.num_classes} classes but "
                    f"model.num_classes is {model.num_classes}"
                )
        return loaders[0], (loaders[1] if len(loaders) > 1 else None)

    def _init_distributed(self) -> torch.device:
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        export_rank_env(self.rank_env)
        backend = self.config.deepspeed.backend or ("nccl" if cuda else "gloo")
        deepspeed.init_distributed(dist_backend=backend, init_method="env://")
        if cuda:
            torch.cuda.set_device(self.rank_env.local_rank)
            return torch.device("cuda", self.rank_env.local_rank)
        return torch.device("cpu")

    def _build_model(self, resuming: bool) -> MVAR:
        torch.manual_seed(self.config.run.seed)  # identical initial weights on every rank
        model = MVAR(self.config.model)
        if self.config.train.init_from and not resuming:
            try:
                load_released_weights(model, self.config.train.init_from)
            except ValueError as err:
                raise ConfigError(f"train.init_from: {err}") from None
        return model

    # ----- run -----

    def run(self) -> int:
        point = self._check_before_compute()
        tokenizer = build_tokenizer(self.config, torch.device("cpu"))
        loader, self.val_loader = self._build_data(tokenizer)
        device = self._init_distributed()
        tokenizer = tokenizer.to(device)
        lock = self._claim_run_dir(point)
        try:
            return self._train(point, tokenizer, loader, device, lock)
        finally:
            if lock is not None:
                lock.release()

    def _claim_run_dir(self, point: ResumePoint | None) -> RunLock | None:
        """Rank 0 locks the run directory (every rank learns if that failed), then tidies it."""
        lock = RunLock(self.run_dir) if self.rank == 0 else None
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
            self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
            save_resolved(self.config, self.run_dir.config_file)
            if point is not None and self.damaged:
                checkpoints.set_aside_damaged(self.run_dir, self.damaged, point)
            checkpoints.prune_checkpoints(self.run_dir, self.config.checkpoint.keep_last)
        return lock

    def _train(self, point: ResumePoint | None, tokenizer: Tokenizer, loader: Any, device: torch.device,
               lock: RunLock | None) -> int:
        model = self._build_model(resuming=point is not None)
        engine = engine_lib.build_engine(model, self.config, self.world)
        step, rng = 0, None
        if point is not None:
            rank_state = checkpoints.load_checkpoint(engine, self.run_dir, point)
            loader.load_state_dict(rank_state["loader"])
            step, rng = point.step, rank_state["rng"]
            logger.info("resumed from %s at step %d", point.tag, step)
        tracker = self._start_tracking(point)
        loop = TrainingLoop(self.config, self.run_dir, self.rank, self.world, engine, model, tokenizer, loader,
                            self.val_loader, tracker, self.stop, lock, device)
        if point is not None:
            loop.restore(point.run_state, step)
        tracker.set_tags({
            "mvar_dist.world_size": self.world, "mvar_dist.zero_stage": engine.zero_optimization_stage(),
            "mvar_dist.schedule": self.config.train.schedule if self.config.model.mode == "mvar" else "var",
            "mvar_dist.start_step": step,
        })
        self.stop.install()
        # last, so that nothing between here and the first step draws from the generators
        if rng is not None:
            checkpoints.set_rng_states(rng, device)
        else:
            checkpoints.seed_all(self.config.run.seed * 1000 + self.rank + 1)  # label drop differs per rank
        status = "FAILED"
        try:
            status = loop.run(step)
        finally:
            tracker.finish(status)
        return 0 if status in ("FINISHED", "KILLED") else 1

    def _start_tracking(self, point: ResumePoint | None) -> Tracker:
        """The MLflow run: the checkpoint's, else the one ``mlflow_run.json`` names (a run killed
        before its first checkpoint continues its run), with what the checkpoint could not send."""
        tracking, run_id, undelivered = self.config.tracking, None, None
        if point is not None:
            run_id, undelivered = point.run_state.get("mlflow_run_id"), point.run_state.get("undelivered_metrics")
        if run_id is None and self.rank == 0:
            run_id = recorded_run_id(self.run_dir, tracking.uri)
        return engine_lib.on_every_rank(lambda: RunTracker.create(
            self.config_dict, self.run_dir.path, tracking.uri, tracking.experiment, run_id, self.rank,
            timeout_s=tracking.timeout_s, retry_interval_s=tracking.retry_interval_s, undelivered=undelivered,
            config_hash=compatibility_hash(self.config_dict),
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
