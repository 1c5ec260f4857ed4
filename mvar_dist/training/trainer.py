"""One training run on one rank: everything checked before compute, distributed init, the lock
on the run directory, model, engine, resume (falling back past damaged checkpoints) and
tracking; then :class:`mvar_dist.training.loop.TrainingLoop` runs the steps."""

from __future__ import annotations

import logging
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
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training import engine as engine_lib
from mvar_dist.training import run_setup
from mvar_dist.training.distributed import read_rank_env
from mvar_dist.training.loop import TrainingLoop
from mvar_dist.training.run_lock import RunLock
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
        point, self.damaged = run_setup.resume_point(self.run_dir, self._check_resumable)
        return point

    def _check_resumable(self, point: ResumePoint) -> None:
        changed = incompatible_keys(point.run_state["config"], self.config_dict)
        if changed:
            raise ConfigError(
                f"{self.run_dir.path} holds a checkpoint ({point.tag}) of a different experiment: "
                f"{', '.join(changed)} changed. Only {', '.join(RESUMABLE_CHANGES)} may change on "
                f"resume; use a new run.dir to start over"
            )
        run_setup.check_world_size(point, self.world)

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

    def _build_model(self, resuming: bool) -> MVAR:
        torch.manual_seed(self.config.run.seed)  # identical initial weights on every rank
        model = MVAR(self.config.model)
        model.set_activation_checkpointing(self.config.train.recompute_every)
        if self.config.train.compile:
            model.compile_blocks()
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
        device = run_setup.init_distributed(self.rank_env, self.config.deepspeed.backend)
        tokenizer = tokenizer.to(device)
        lock = run_setup.claim_run_dir(self.run_dir, self.rank, lambda: save_resolved(self.config, self.run_dir.config_file),
                                       point, self.damaged, self.config.checkpoint.keep_last)
        try:
            return self._train(point, tokenizer, loader, device, lock)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, point: ResumePoint | None, tokenizer: Tokenizer, loader: Any, device: torch.device,
               lock: RunLock | None) -> int:
        model = self._build_model(resuming=point is not None)
        engine = engine_lib.build_engine(model, self.config, self.world)
        step, rng = 0, None
        if point is not None:
            rank_state = checkpoints.load_checkpoint(engine, self.run_dir, point)
            run_setup.restore_loader(loader, rank_state["loader"], self.run_dir, point)
            step, rng = point.step, rank_state["rng"]
            logger.info("resumed from %s at step %d", point.tag, step)
        tracker = run_setup.start_tracking(self.config_dict, self.run_dir, self.config.tracking, point, self.rank,
                                           compatibility_hash(self.config_dict))
        loop = TrainingLoop(self.config, self.run_dir, self.rank, self.world, engine, model, tokenizer, loader,
                            self.val_loader, tracker, self.stop, lock, device)
        if point is not None:
            loop.restore(point.run_state, step)
        tracker.set_tags({
            "mvar_dist.world_size": self.world, "mvar_dist.zero_stage": engine.zero_optimization_stage(),
            "mvar_dist.schedule": self.config.train.schedule if self.config.model.mode == "mvar" else "var",
            "mvar_dist.start_step": step,
        })
        seed = self.config.run.seed * 1000 + self.rank + 1  # label drop differs per rank
        return run_setup.run_loop(loop, step, tracker, self.stop, rng, seed, device)
