"""One training run on one rank: setup (validation before compute, distributed init, model,
engine, resume), the step loop, checkpoints, stopping and tracking. The step itself is
:mod:`mvar_dist.training.step`."""

from __future__ import annotations

import logging
import os
import signal
import time
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
from mvar_dist.training import evaluation
from mvar_dist.training.distributed import export_rank_env, read_rank_env
from mvar_dist.training.schedule import step_groups
from mvar_dist.training.step import ScaleStats, StopFlag, peak_memory_mb, reduce_step, scale_metrics, train_step

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

    # ----- setup -----

    def _check_before_compute(self) -> ResumePoint | None:
        """Everything that can be wrong with the inputs, on every rank, before any process group."""
        validate(self.config, self.world)
        point = self.run_dir.read_latest()
        if point is not None:
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
        return point

    def _build_data(self, tokenizer: Tokenizer) -> tuple[Any, Any]:
        """The train loader and, with ``train.val_every_steps``, the validation loader (else None)."""
        from mvar_dist import data as data_lib
        from mvar_dist.shards.manifest import check_manifest_matches

        model, batch = self.config.model, self.config.train.micro_batch_size
        loaders = []
        try:
            loaders.append(data_lib.build_train_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch))
            if self.config.train.val_every_steps > 0:
                loaders.append(data_lib.build_val_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch))
            for loader in loaders:
                check_manifest_matches(loader.manifest, model.patch_nums, model.vocab_size, tokenizer.identity())
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
        if self.rank == 0:
            self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
            save_resolved(self.config, self.run_dir.config_file)
            checkpoints.prune_checkpoints(self.run_dir, self.config.checkpoint.keep_last)
        model = self._build_model(resuming=point is not None)
        engine = engine_lib.build_engine(model, self.config, self.world)
        step, run_id, rng = 0, None, None
        if point is not None:
            rank_state = checkpoints.load_checkpoint(engine, self.run_dir, point)
            loader.load_state_dict(rank_state["loader"])
            step, run_id, rng = point.step, point.run_state.get("mlflow_run_id"), rank_state["rng"]
            logger.info("resumed from %s at step %d", point.tag, step)
        from mvar_dist.tracking import RunTracker

        tracker = engine_lib.on_every_rank(lambda: RunTracker.create(
            self.config_dict, self.run_dir.path, self.config.tracking.uri, self.config.tracking.experiment,
            run_id, self.rank,
        ))
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
            status = self._loop(engine, model, tokenizer, loader, tracker, step, device)
        finally:
            tracker.finish(status)
        return 0 if status in ("FINISHED", "KILLED") else 1

    def _loop(self, engine: Any, model: Any, tokenizer: Any, loader: Any, tracker: Any, step: int,
              device: torch.device) -> str:
        cfg = self.config
        micro = engine.gradient_accumulation_steps()
        batches = iter(loader)
        consecutive_nonfinite = 0
        while step < cfg.train.total_steps:
            step += 1
            start = time.perf_counter()
            stats = ScaleStats(len(cfg.model.patch_nums), device)
            poison = self.rank == 0 and step in cfg.debug.nonfinite_loss_steps
            lr = engine_lib.current_lr(engine)
            result = train_step(
                engine, model, tokenizer, batches, micro, step_groups(cfg, step), stats,
                cfg.train.label_smoothing, device, poison=poison,
            )
            applied = engine.was_step_applied()
            sums, reduced = reduce_step(
                result, stats, self.stop.requested, int(getattr(loader, "num_skipped", 0)),
                time.perf_counter() - start, peak_memory_mb(device),
            )
            if applied:
                consecutive_nonfinite = 0
            else:
                consecutive_nonfinite += 1
                logger.warning("step %d: non-finite loss or gradients; the optimizer step was skipped", step)
            if step % cfg.train.log_every == 0 or step == cfg.train.total_steps:
                tracker.log_metrics(self._metrics(engine, lr, sums, reduced, applied, step), step)
            # before the checkpoint, whose flush then covers these metrics too
            self._evaluate(engine, model, tokenizer, tracker, step, device)
            too_many = consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite
            stopping = reduced["stop_ranks"] > 0
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.total_steps or stopping or too_many:
                self._save(engine, loader, tracker, step, device)
            if too_many:
                logger.error(
                    "stopping: %d consecutive steps had a non-finite loss (train.max_consecutive_nonfinite); "
                    "checkpoint saved at step %d. Lower the lr or check the data", consecutive_nonfinite, step,
                )
                return "FAILED"
            if stopping:
                logger.warning("stopping on %s at step %d; checkpoint saved", self.stop.signal_name or "a peer's signal", step)
                return "KILLED"
        return "FINISHED"

    def _evaluate(self, engine: Any, model: Any, tokenizer: Any, tracker: Any, step: int, device: torch.device) -> None:
        """Validation (every rank) and the sample grid (rank 0) when due; see mvar_dist.evaluation."""
        train, total = self.config.train, self.config.train.total_steps
        if self.val_loader is not None and evaluation.is_due(train.val_every_steps, step, total):
            metrics = evaluation.validate(engine, model, tokenizer, self.val_loader, train.val_max_batches, device)
            tracker.log_metrics(metrics, step)
            logger.info("step %d: val/loss %.4f val/acc %.2f", step, metrics.get("val/loss", float("nan")),
                        metrics.get("val/acc", float("nan")))
        if evaluation.is_due(self.config.sample.every_steps, step, total):
            evaluation.log_sample_grid(engine, model, tokenizer, self.config, tracker, step, self.rank, device)

    def _metrics(self, engine: Any, lr: float, sums: torch.Tensor, reduced: dict[str, float],
                 applied: bool, step: int) -> dict[str, float]:
        step_time = max(reduced["step_time"], 1e-9)
        metrics = {
            "train/loss": reduced["loss_sum"] / max(reduced["micro_batches"], 1),
            "train/images_seen": float(step * self.config.train.global_batch_size),
            "lr": lr,
            "images_per_s": reduced["images"] / step_time,
            "tokens_per_s": reduced["tokens"] / step_time,
            "step_time_s": reduced["step_time"],
            "data_wait_s": reduced["data_wait"],
            "peak_memory_mb": reduced["peak_mb"],
            "skipped_samples": reduced["skipped_samples"],
            "nonfinite_steps": float(engine.skipped_steps),  # checkpointed by DeepSpeed
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and applied:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({f"train/{k}": v for k, v in scale_metrics(sums).items()})
        return metrics

    def _save(self, engine: Any, loader: Any, tracker: Any, step: int, device: torch.device) -> None:
        tracker.flush()
        run_state = {
            "step": step,
            "config": self.config_dict,
            "config_hash": compatibility_hash(self.config_dict),
            "mlflow_run_id": tracker.run_id if self.rank == 0 else None,
            "world_size": self.world,
        }
        rank_state = {"loader": loader.state_dict(), "rng": checkpoints.rng_states(device)}
        checkpoints.save_checkpoint(engine, self.run_dir, step, run_state, rank_state, self.config.checkpoint.keep_last)
        if self.config.debug.kill_after_checkpoint_step == step:
            # testing hook (debug.kill_after_checkpoint_step): die like a preempted node would
            logger.warning("debug.kill_after_checkpoint_step=%d: SIGKILL", step)
            os.kill(os.getpid(), signal.SIGKILL)
