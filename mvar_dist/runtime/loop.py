"""One training run on one rank, whatever it trains: :func:`run_training` is the skeleton both
``mvar-dist train`` and ``train-tokenizer`` run, :class:`StepLoop` its step loop.

Before compute, on every rank: the config's checks, the checkpoint to resume from (refused if it
belongs to another experiment or world size, or is locked by a live job), the data. Then the
process group, rank 0's claim on the run directory, the task's engines, the checkpoint loaded
into them, tracking, and the RNG states restored last so that nothing draws from them before
the first step. The loop then runs the task's steps and applies the policies every run shares:

- a stop signal (SIGTERM, SIGUSR2, SIGINT; :mod:`mvar_dist.runtime.stop`) is agreed on by every
  rank after the step, which is checkpointed; an evaluation due at that step is postponed to the
  resume (its step's metrics wait for it in the tracker) so that the checkpoint comes first;
- a step whose loss or gradients are non-finite is skipped by the optimizer on every rank;
  ``train.max_consecutive_nonfinite`` of them in a row save and end the run as FAILED;
- a checkpoint every ``checkpoint.every_steps`` steps and at the last step.

What the loop carries between steps (the non-finite streak, a postponed evaluation) is saved
in the :class:`~mvar_dist.run_state.RunState`, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from mvar_dist.config import experiment_hash, kind_of, validate_experiment
from mvar_dist.run_dir import RunDir
from mvar_dist.run_state import RankState, RunState
from mvar_dist.runtime import checkpoint as checkpoints
from mvar_dist.runtime import setup
from mvar_dist.runtime.collectives import any_rank
from mvar_dist.runtime.distributed import (
    init_distributed,
    leave_distributed,
    read_rank_env,
)
from mvar_dist.runtime.rng import rng_states, seed_all, set_rng_states
from mvar_dist.runtime.run_lock import RunLock
from mvar_dist.runtime.stop import StopFlag
from mvar_dist.runtime.task import Loader, RankContext, TrainingTask
from mvar_dist.runtime.watchdog import HangWatchdog
from mvar_dist.tracking import Tracker

logger = logging.getLogger(__name__)


def is_due(every: int, step: int, total_steps: int) -> bool:
    """Every ``every`` steps and at the last step; never when ``every`` is 0."""
    return every > 0 and (step % every == 0 or step == total_steps)


def run_training(task: TrainingTask) -> int:
    """Train ``task`` on this rank (of a launcher's, or srun's); exit code 0 for a finished or
    stopped run (a stop resumes), 1 for a failed one. User errors raise ConfigError before any
    compute."""
    config = task.config
    rank_env = read_rank_env()
    rank, world = rank_env.rank, rank_env.world_size
    run_dir = RunDir(Path(config.run.dir))
    validate_experiment(config, world)
    point, damaged = setup.resume_point(run_dir, config, world)
    loader = task.build_loader(rank, world)
    device = init_distributed(rank_env, config.deepspeed.backend)
    lock = setup.claim_run_dir(run_dir, rank, config, point, damaged)
    try:
        resized_from = point.run_state.world_size if point is not None and point.run_state.world_size != world else None
        context = RankContext(rank, world, device, resized_from)
        engines = task.build_engines(context, resuming=point is not None)
        step, rank_state = 0, None
        if point is not None:
            rank_state = checkpoints.load_checkpoint(engines, run_dir, point, world)
            setup.restore_loader(loader, rank_state.loader, run_dir, point)
            task.load_state_dict(rank_state.task)
            step = point.step
            logger.info("resumed from %s at step %d", point.tag, step)
        config_hash = experiment_hash(config)
        saved = point.run_state if point is not None else None
        tracker = setup.start_tracking(config, config_hash, run_dir, saved, rank)
        loop = StepLoop(task, run_dir, context, engines, loader, tracker, lock, config_hash)
        if saved is not None:
            loop.restore(saved)
        split = config.train.batch_split(world)
        logger.info("batch split: %s", split.describe())
        tracker.set_tags({
            "mvar_dist.kind": kind_of(config).name, "mvar_dist.world_size": world,
            "mvar_dist.micro_batch_size": split.micro_batch, "mvar_dist.gradient_accumulation": split.accumulation,
            "mvar_dist.zero_stage": engines.main.zero_optimization_stage(), "mvar_dist.start_step": step,
            **task.tags(),
        })
        if context.resized_from is not None:
            logger.warning("resumed %s, written by %d ranks, on %d ranks", point.tag, context.resized_from, world)
            tracker.set_tags({f"mvar_dist.resized_at_step_{step}": f"{context.resized_from}->{world}"})
        loop.stop.install()
        if rank_state is not None:
            set_rng_states(rank_state.rng, device)
        else:
            seed_all(config.run.seed * 1000 + rank + 1)  # label drop differs per rank
        status = "FAILED"
        loop.watchdog.start().beat(step)
        try:
            status = loop.run(step)
        finally:
            loop.watchdog.stop()
            tracker.finish(status)
        leave_distributed()
        return 0 if status in ("FINISHED", "KILLED") else 1
    finally:
        if lock is not None:
            lock.release()


class StepLoop:
    """The steps of one rank with the policies of the module docstring; :meth:`run` returns the
    run's final status (FINISHED, KILLED on a stop, FAILED)."""

    def __init__(self, task: TrainingTask, run_dir: RunDir, context: RankContext, engines: checkpoints.Engines,
                 loader: Loader, tracker: Tracker, lock: RunLock | None, config_hash: str) -> None:
        self.task, self.config, self.run_dir, self.context = task, task.config, run_dir, context
        self.engines, self.loader, self.tracker, self.lock = engines, loader, tracker, lock
        self.config_dict, self.config_hash = task.config.to_dict(), config_hash
        self.stop = StopFlag()
        self.consecutive_nonfinite = 0
        self.evaluation_pending = False  # the evaluation of the checkpoint's step was postponed by a stop
        self.world_sizes: tuple[tuple[int, int], ...] = ((0, context.world_size),)
        # started by run_training once the run is set up; a hung rank releases the lock it holds
        self.watchdog = HangWatchdog(context.rank, self.config.train.hang_timeout_s,
                                     lock.release if lock is not None else lambda: None)

    def restore(self, saved: RunState) -> None:
        self.world_sizes = saved.with_world_size(saved.step, self.context.world_size)
        self.consecutive_nonfinite = saved.consecutive_nonfinite
        self.evaluation_pending = saved.evaluation_pending
        if self.evaluation_pending:  # the step's metrics wait for the evaluation, as at the stop
            self.tracker.hold_from(saved.step)

    def run(self, step: int) -> str:
        train, total = self.config.train, self.config.train.total_steps
        if self.evaluation_pending:  # what a stop postponed at the checkpoint's step
            self.task.evaluate(step, self.tracker)
            self.evaluation_pending = False
            self.tracker.hold_from(None)
        batches = iter(self.loader)
        first_session = step == 0  # the debug hang fires once: a resumed or requeued run gets past it
        while step < total:
            step += 1
            if self.config.debug.stop_at_step == step and self.context.rank == 0:
                self.stop.request("debug.stop_at_step")
            if (self.config.debug.hang_at_step == step and self.context.rank == self.config.debug.hang_rank
                    and first_session):
                hang(self.config.debug.hang_how, self.run_dir)
            outcome = self.task.train_step(step, batches)
            stopping = any_rank(self.stop.requested)
            if outcome.applied:
                self.consecutive_nonfinite = 0
            else:
                self.consecutive_nonfinite += 1
                logger.warning("step %d: non-finite loss or gradients; the optimizer step was skipped", step)
            if step % train.log_every == 0 or step == total:
                self.tracker.log_metrics(outcome.metrics, step)
            if self.lock is not None:
                self.lock.heartbeat()
            self.watchdog.beat(step)
            too_many = self.consecutive_nonfinite >= train.max_consecutive_nonfinite
            if stopping:
                # inside the signal window the checkpoint comes first; the evaluation due now runs
                # when the run resumes, and this step's metrics reach MLflow with its results
                self.evaluation_pending = self.task.evaluation_due(step)
                if self.evaluation_pending:
                    self.tracker.hold_from(step)
            else:
                self.task.evaluate(step, self.tracker)  # before the checkpoint, whose flush then covers it
                self.watchdog.beat(step)
            if step % self.config.checkpoint.every_steps == 0 or step == total or stopping or too_many:
                self.save(step)
                self.watchdog.beat(step)
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

    def save(self, step: int) -> None:
        self.tracker.flush()
        run_state = RunState(
            step=step, config=self.config_dict, world_size=self.context.world_size, config_hash=self.config_hash,
            mlflow_run_id=self.tracker.run_id if self.context.rank == 0 else None,  # type: ignore[attr-defined]
            consecutive_nonfinite=self.consecutive_nonfinite, evaluation_pending=self.evaluation_pending,
            # what MLflow did not take (server down): sent when the run resumes, never dropped
            undelivered_metrics=self.tracker.undelivered(),
            resizable=True, world_sizes=self.world_sizes,
        )
        rank_state = RankState(loader=self.loader.state_dict(), rng=rng_states(self.context.device),
                               task=self.task.state_dict())
        checkpoints.save_checkpoint(self.engines, self.run_dir, run_state, rank_state, self.config.checkpoint.keep_last)
        if self.config.debug.kill_after_checkpoint_step == step:
            # testing hook (debug.kill_after_checkpoint_step): die like a preempted node would
            logger.warning("debug.kill_after_checkpoint_step=%d: SIGKILL", step)
            os.kill(os.getpid(), signal.SIGKILL)


def hang(how: str, run_dir: RunDir) -> None:
    """Testing hook (``debug.hang_at_step``): this rank hangs as a real one would."""
    logger.warning("debug.hang_at_step: rank hangs (%s)", how)
    if how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:  # a read that never returns: a FIFO nobody writes to
        fifo = run_dir.path / f".debug-hang-{os.getpid()}"
        os.mkfifo(fifo)
        with open(fifo, "rb") as never:
            never.read()
