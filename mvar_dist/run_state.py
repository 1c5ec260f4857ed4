"""What a checkpoint remembers about its run besides the engines' weights: the one owner of the
run state's keys and of their on-disk form.

Two records per checkpoint tag (paths from :class:`mvar_dist.run_dir.RunDir`):

- :class:`RunState` (``run_state.json``, written by rank 0): the step, the resolved config and
  its compatibility hash, the world size that wrote the tag, the MLflow run, the loop's state
  (consecutive non-finite steps, an evaluation a stop postponed) and the metrics MLflow has not
  accepted yet;
- :class:`RankState` (``rank_<r>.pt``, one per rank): the rank's data-loader position, its RNG
  states and the task's own per-rank state (e.g. codebook usage statistics of tokenizer runs).

Both are versioned. Version 1 is what mvar-dist wrote before this module existed (no
``version`` key; the task's state at the top level of the rank file); it is read as version 2
with the defaults of fields it did not have, so those checkpoints keep resuming. Version 3 adds
``resizable`` and ``world_sizes`` (checkpoints that may resume on another number of ranks).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from mvar_dist.atomic import write_json, write_via_temp

RUN_STATE_VERSION = 3
_RANK_KEYS = ("loader", "rng")  # a version-1 rank file held these, the rest was the task's


@dataclass(frozen=True)
class RunState:
    """The run as rank 0 saw it at a checkpoint."""

    step: int
    config: dict[str, Any]  # the resolved experiment, every default spelled out
    world_size: int  # ranks that wrote the checkpoint
    config_hash: str | None = None  # of the keys a resumed run must keep (mvar_dist.config)
    mlflow_run_id: str | None = None
    consecutive_nonfinite: int = 0
    evaluation_pending: bool = False  # the evaluation due at ``step`` was postponed by a stop
    undelivered_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> metrics
    # the engines' files can be converted to DeepSpeed's universal layout, so the run can resume
    # on another number of ranks (version 3 on; earlier checkpoints resume on their own world size)
    resizable: bool = False
    # (first step, world size) of every stretch of the run, oldest first: its cluster history
    world_sizes: tuple[tuple[int, int], ...] = ()
    version: int = RUN_STATE_VERSION

    def with_world_size(self, step: int, world_size: int) -> tuple[tuple[int, int], ...]:
        """The history with a stretch starting at ``step`` on ``world_size`` ranks."""
        history = self.world_sizes or ((0, self.world_size),)
        return history if history[-1][1] == world_size else (*history, (step, world_size))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["undelivered_metrics"] = {str(s): dict(m) for s, m in self.undelivered_metrics.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "run state") -> "RunState":
        """Any version this code wrote; a missing or malformed required field is a ValueError."""
        version = int(data.get("version", 1))
        if version > RUN_STATE_VERSION:
            raise ValueError(f"{source} has version {version}; this mvar-dist reads up to {RUN_STATE_VERSION}: upgrade it")
        try:
            step, config = int(data["step"]), data["config"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} has no valid step and config ({error!r})") from None
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: config is not a mapping")
        undelivered = data.get("undelivered_metrics") or {}
        return cls(
            step=step,
            config=dict(config),
            world_size=int(data.get("world_size") or 1),
            config_hash=data.get("config_hash"),
            mlflow_run_id=data.get("mlflow_run_id"),
            consecutive_nonfinite=int(data.get("consecutive_nonfinite", 0)),
            evaluation_pending=bool(data.get("evaluation_pending", False)),
            undelivered_metrics={int(s): {str(k): float(v) for k, v in m.items()} for s, m in undelivered.items()},
            resizable=bool(data.get("resizable", False)),
            world_sizes=tuple((int(s), int(w)) for s, w in data.get("world_sizes") or ()),
        )


@dataclass(frozen=True)
class RankState:
    """One rank's part of a checkpoint."""

    loader: dict[str, Any]  # the data loader's state_dict()
    rng: dict[str, Any]  # mvar_dist.runtime.rng.rng_states()
    task: dict[str, Any] = field(default_factory=dict)  # the training task's own per-rank state
    version: int = RUN_STATE_VERSION


def write_run_state(path: Path, state: RunState) -> None:
    write_json(path, state.to_json())


def read_run_state(path: Path) -> RunState:
    """FileNotFoundError when the file is missing; ValueError when it is not a run state."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} does not hold a run state")
    return RunState.from_json(data, str(path))


def write_rank_state(path: Path, state: RankState) -> None:
    payload = {"version": state.version, "loader": state.loader, "rng": state.rng, "task": state.task}
    write_via_temp(path, lambda tmp: torch.save(payload, tmp))


def read_rank_state(path: Path) -> RankState:
    """Tensors and plain values only (``weights_only``): a rank file cannot run code."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping) or any(key not in data for key in _RANK_KEYS):
        raise ValueError(f"{path} is not an mvar-dist rank state (no loader and rng states)")
    version = int(data.get("version", 1))
    if version > RUN_STATE_VERSION:
        raise ValueError(f"{path} has version {version}; this mvar-dist reads up to {RUN_STATE_VERSION}: upgrade it")
    task = data["task"] if version >= 2 else {k: v for k, v in data.items() if k not in _RANK_KEYS}
    return RankState(loader=data["loader"], rng=data["rng"], task=dict(task))
