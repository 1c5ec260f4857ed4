"""The step loop of one rank: steps, per-step metrics, periodic evaluation, checkpoints, and the
ways a run ends (finished, stopped by a signal, too many non-finite steps).

What the loop carries from step to step is checkpointed with the run state, so a resumed run
continues exactly: the count of consecutive non-finite steps, and an evaluation that a stop
signal postponed (a stop checkpoints first; the evaluation due at that step runs on resume).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import torch

from mvar_dist.config import ExperimentConfig, compatibility_hash
from mvar_dist.run_dir import RunDir
from mvar_dist.tracking import Tracker
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training import engine as engine_lib
from mvar_dist.training import evaluation
from mvar_dist.training.run_lock import RunLock
from mvar_dist.training.schedule import step_groups
from mvar_dist.training.step import ScaleStats, StopFlag, peak_memory_mb, reduce_step, scale_metrics, train_step

logger = logging.getLogger(__name__)


class TrainingLoop:
    """Everything the steps of one rank share; :meth:`run` returns the run's final status."""

    def __init__(self, config: ExperimentConfig, run_dir: RunDir, rank: int, world: int, engine: Any, model: Any,
                 tokenizer: Any, loader: Any, val_loader: Any, tracker: Tracker, stop: StopFlag, lock: RunLock | None,
                 device: torch.device) -> None:
        self.config, self.run_dir, self.rank, self.world = config, run_dir, rank, world
        self.engine, self.model, self.tokenizer, self.device = engine, model, tokenizer, device
        self.loader, self.val_loader, self.tracker, self.stop, self.lock = loader, val_loader, tracker, stop, lock
        self.config_dict = config.to_dict()
        self.consecutive_nonfinite = 0
        self.evaluation_pending = False  # the evaluation of the checkpoint's step was postponed by a stop

    def restore(self, run_state: dict[str, Any], step: int) -> None:
        """The loop's state as the checkpoint of ``step`` left it (absent in earlier versions')."""
        self.consecutive_nonfinite = int(run_state.get("consecutive_nonfinite", 0))
        self.evaluation_pending = bool(run_state.get("evaluation_pending", False))
        if self.evaluation_pending:  # the step's metrics wait for the evaluation, as at the stop
            self.tracker.hold_from(step)

    def run(self, step: int) -> str:
        cfg = self.config
        if self.evaluation_pending:  # what a stop postponed at the checkpoint's step
            self.evaluate(step)
            self.evaluation_pending = False
            self.tracker.hold_from(None)
        micro = self.engine.gradient_accumulation_steps()
        batches = iter(self.loader)
        while step < cfg.train.total_steps:
            step += 1
            if cfg.debug.stop_at_step == step and self.rank == 0:
                self.stop.request("debug.stop_at_step")
            # from the step count, not from how many optimizer steps were applied: a step skipped
            # for non-finite gradients still moves the schedule (the run ends at total_steps)
            lr = engine_lib.set_lr(self.engine, cfg, step)
            start = time.perf_counter()
            stats = ScaleStats(len(cfg.model.patch_nums), self.device)
            poison = self.rank == 0 and step in cfg.debug.nonfinite_loss_steps
            result = train_step(
                self.engine, self.model, self.tokenizer, batches, micro, step_groups(cfg, step), stats,
                cfg.train.label_smoothing, self.device, poison=poison,
            )
            applied = self.engine.was_step_applied()
            sums, reduced = reduce_step(
                result, stats, self.stop.requested, int(getattr(self.loader, "num_skipped", 0)),
                time.perf_counter() - start, peak_memory_mb(self.device),
            )
            if applied:
                self.consecutive_nonfinite = 0
            else:
                self.consecutive_nonfinite += 1
                logger.warning("step %d: non-finite loss or gradients; the optimizer step was skipped", step)
            if step % cfg.train.log_every == 0 or step == cfg.train.total_steps:
                self.tracker.log_metrics(self.metrics(lr, sums, reduced, applied, step), step)
            if self.lock is not None:
                self.lock.heartbeat()
            too_many = self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite
            stopping = reduced["stop_ranks"] > 0
            if stopping:
                # inside the signal window the checkpoint comes first; the evaluation due now runs
                # when the run resumes, and this step's metrics reach MLflow with its results
                self.evaluation_pending = self.evaluation_due(step)
                if self.evaluation_pending:
                    self.tracker.hold_from(step)
            else:
                self.evaluate(step)  # before the checkpoint, whose flush then covers these metrics
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.total_steps or stopping or too_many:
                self.save(step)
            if too_many:
                logger.error(
                    "stopping: %d consecutive steps had a non-finite loss (train.max_consecutive_nonfinite); "
                    "checkpoint saved at step %d. Lower the lr or check the data", self.consecutive_nonfinite, step,
                )
                return "FAILED"
            if stopping:
                logger.warning("stopping on %s at step %d; checkpoint saved", self.stop.signal_name or "a peer's signal", step)
                return "KILLED"
        return "FINISHED"

    def evaluation_due(self, step: int) -> bool:
        train, total = self.config.train, self.config.train.total_steps
        validation = self.val_loader is not None and evaluation.is_due(train.val_every_steps, step, total)
        return validation or evaluation.is_due(self.config.sample.every_steps, step, total)

    def evaluate(self, step: int) -> None:
        """Validation (every rank) and the sample grid (rank 0) when due; see mvar_dist.training.evaluation."""
        train, total = self.config.train, self.config.train.total_steps
        if self.val_loader is not None and evaluation.is_due(train.val_every_steps, step, total):
            metrics = evaluation.validate(self.engine, self.model, self.tokenizer, self.val_loader,
                                          train.val_max_batches, self.device)
            self.tracker.log_metrics(metrics, step)
            logger.info("step %d: val/loss %.4f val/acc %.2f", step, metrics.get("val/loss", float("nan")),
                        metrics.get("val/acc", float("nan")))
        if evaluation.is_due(self.config.sample.every_steps, step, total):
            evaluation.log_sample_grid(self.engine, self.model, self.tokenizer, self.config, self.tracker, step,
                                       self.rank, self.device)

    def metrics(self, lr: float, sums: torch.Tensor, reduced: dict[str, float], applied: bool,
                step: int) -> dict[str, float]:
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
            "nonfinite_steps": float(self.engine.skipped_steps),  # checkpointed by DeepSpeed
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and applied:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({f"train/{k}": v for k, v in scale_metrics(sums).items()})
        return metrics

    def save(self, step: int) -> None:
        self.tracker.flush()
        run_state = {
            "step": step,
            "config": self.config_dict,
            "config_hash": compatibility_hash(self.config_dict),
            "mlflow_run_id": self.tracker.run_id if self.rank == 0 else None,
            "world_size": self.world,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "evaluation_pending": self.evaluation_pending,
            # what MLflow did not take (server down): sent when the run resumes, never dropped
            "undelivered_metrics": {str(s): m for s, m in self.tracker.undelivered().items()},
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoints.rng_states(self.device)}
        checkpoints.save_checkpoint(self.engine, self.run_dir, step, run_state, rank_state,
                                    self.config.checkpoint.keep_last)
        if self.config.debug.kill_after_checkpoint_step == step:
            # testing hook (debug.kill_after_checkpoint_step): die like a preempted node would
            logger.warning("debug.kill_after_checkpoint_step=%d: SIGKILL", step)
            os.kill(os.getpid(), signal.SIGKILL)
