"""Checks of a whole experiment that no single field can make: batch arithmetic, schedules,
files, SLURM resources. They run once, before any rank starts, and name the field and value."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mvar_dist.config.experiment import ExperimentConfig
from mvar_dist.config.loading import ConfigError
from mvar_dist.config.sections import LaunchConfig

logger = logging.getLogger(__name__)

_MEM_PATTERN = re.compile(r"^[0-9]+[KMGT]?B?$", re.IGNORECASE)


class LaunchError(ValueError):
    """Bad launch input, found before anything is submitted."""


def validate(config: ExperimentConfig, world_size: int) -> None:
    """Checks that do not fit one field: batch arithmetic, schedules, files. Before any compute."""
    train, model = config.train, config.model
    for name in ("total_steps", "global_batch_size", "micro_batch_size", "ratio_k", "log_every",
                 "max_consecutive_nonfinite"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}; "
            f"choose a global batch that is a multiple of {per_step}"
        )
    if train.schedule == "paper" and model.mode != "mvar":
        raise ConfigError(
            "train.schedule='paper' rotates scale groups, which only mode='mvar' allows; "
            "use train.schedule='all' with model.mode='var'"
        )
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    optim = config.optim
    if optim.warmup_steps < 0 or optim.warmup_steps >= train.total_steps:
        raise ConfigError(
            f"optim.warmup_steps must be in 0..train.total_steps-1 ({train.total_steps - 1}), got {optim.warmup_steps}"
        )
    if config.peak_lr <= 0 or optim.grad_clip < 0 or optim.weight_decay < 0:
        raise ConfigError("optim: lr must be positive, grad_clip and weight_decay non-negative")
    if config.checkpoint.every_steps < 1 or config.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
    _validate_eval(config)
    try:
        config.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name, value in (("train.init_from", train.init_from), ("tokenizer.checkpoint", config.tokenizer.checkpoint)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}: file {value} does not exist")


def _validate_eval(config: ExperimentConfig) -> None:
    """Periodic validation and sample grids (trainer + mvar_dist.evaluation)."""
    train, sample = config.train, config.sample
    for name, value in (("train.val_every_steps", train.val_every_steps), ("train.val_max_batches", train.val_max_batches),
                        ("sample.every_steps", sample.every_steps)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {value}")
    if train.val_every_steps > 0 and not config.data.val_manifest:
        raise ConfigError(
            f"train.val_every_steps={train.val_every_steps} needs data.val_manifest (the validation split's "
            f"manifest.json); set it or use train.val_every_steps=0"
        )
    if sample.every_steps > 0:
        if sample.per_class < 1:
            raise ConfigError(f"sample.per_class must be >= 1, got {sample.per_class}")
        classes = sample.grid_classes(config.model.num_classes)
        bad = [c for c in classes if not 0 <= c <= config.model.num_classes]
        if not classes or bad:
            raise ConfigError(
                f"sample.classes must be a non-empty list of labels in 0..{config.model.num_classes} "
                f"(model.num_classes = unconditional), got {list(classes)}"
            )


def validate_launch(launch: LaunchConfig) -> None:
    """Checks that need no cluster; messages name the flag and the config field."""
    for name in ("nodes", "cpus_per_task", "time"):
        value = getattr(launch, name)
        if value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 1, got {value}")
    for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
        value = getattr(launch, name)
        if value < 0:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 0, got {value}")
    if launch.tasks_per_node is not None:
        if launch.tasks_per_node < 1:
            raise LaunchError(f"--tasks-per-node (launch.tasks_per_node) must be >= 1, got {launch.tasks_per_node}")
        if launch.gpus_per_node and launch.tasks_per_node != launch.gpus_per_node:
            raise LaunchError(
                f"--tasks-per-node={launch.tasks_per_node} with --gpus-per-node={launch.gpus_per_node}: "
                "GPU jobs run one task per GPU; drop --tasks-per-node (it is for CPU ranks)"
            )
    if launch.mem is not None and not _MEM_PATTERN.match(launch.mem):
        raise LaunchError(f"--mem (launch.mem) must look like 64G or 500M, got {launch.mem!r}")
    if launch.signal_delay_s >= launch.time * 60:
        raise LaunchError(
            f"--signal-delay={launch.signal_delay_s}s is not shorter than --time={launch.time} min: "
            "the job would be signalled before it starts working"
        )
    if launch.cluster not in ("slurm", "local", "debug"):
        raise LaunchError(f"--cluster (launch.cluster) must be slurm, local or debug, got {launch.cluster!r}")
    if launch.cluster != "slurm" and launch.nodes != 1:
        raise LaunchError(f"--cluster {launch.cluster} runs on this machine only: use --nodes 1")
    if launch.time <= 10:
        # submitit's has_timed_out() is always true then, so preemptions count as timeouts
        logger.warning("--time=%d min <= 10: every preemption counts against max_requeues as a timeout", launch.time)
