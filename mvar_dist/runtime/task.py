"""What a kind of training supplies to the run skeleton, and nothing more.

The skeleton (:func:`mvar_dist.runtime.loop.run_training`) owns everything runs have in common:
checks before compute, the rank environment and process group, the run-directory lock, finding
and loading the checkpoint, RNG states, the loader's position, tracking, the step loop with its
policies (stop signals, non-finite steps, an evaluation a stop postponed), periodic checkpoints
and the end of the run. A task owns what differs: its data, its models and engines, one
optimizer step, its evaluation and any per-rank state of its own. Adding a third kind of
training means writing one more class that satisfies :class:`TrainingTask`; the skeleton does
not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from mvar_dist.config import Experiment
from mvar_dist.runtime.checkpoint import Engines
from mvar_dist.tracking import Tracker


@dataclass(frozen=True)
class RankContext:
    """Who this process is, once the process group exists."""

    rank: int
    world_size: int
    device: torch.device
    # the world size of the checkpoint this rank resumes from when it differs from this job's:
    # the engines are then built to load DeepSpeed's universal checkpoint layout
    resized_from: int | None = None


@dataclass(frozen=True)
class StepOutcome:
    metrics: dict[str, float]  # reduced over ranks; logged every train.log_every steps
    applied: bool  # False: the step was skipped for a non-finite loss or gradients


class Loader(Protocol):
    """A resumable loader: its position is a small state dict, restored exactly."""

    num_skipped: int

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingTask(Protocol):
    config: Experiment

    def build_loader(self, rank: int, world_size: int) -> Loader:
        """The train loader (the task keeps anything else it loads, e.g. validation data), built
        before the process group, so that bad data is one message; ConfigError for user errors."""
        ...

    def build_engines(self, context: RankContext, resuming: bool) -> Engines:
        """Models (identical on every rank), their optimizers and DeepSpeed engines; weights to
        start from only when not ``resuming`` (the checkpoint's are loaded next)."""
        ...

    def tags(self) -> dict[str, Any]:
        """MLflow tags of the task's own (the skeleton tags world size, ZeRO stage, kind, start step)."""
        ...

    def train_step(self, step: int, batches: Iterator[Any]) -> StepOutcome:
        """Optimizer step ``step`` (1-based) on the next global batch: the lr of the step, every
        engine's forward/backward/step, the metrics reduced over ranks."""
        ...

    def evaluation_due(self, step: int) -> bool:
        """Whether :meth:`evaluate` has anything to do at ``step``."""
        ...

    def evaluate(self, step: int, tracker: Tracker) -> None:
        """Collective: whatever evaluation is due at ``step`` (nothing if none), logged at
        ``step``; must not change the training stream (RNGs restored, the train loader not
        advanced)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's state of the task's own that later steps depend on ({} if none)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
