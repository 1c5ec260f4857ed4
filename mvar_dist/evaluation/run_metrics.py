"""An evaluation's metrics into the training run's MLflow run (``eval/<metric>`` at the step the
evaluated weights were trained to), so that ``mvar-dist compare`` shows them beside the
training curves."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvar_dist.run_dir import RunDir
from mvar_dist.tracking.run_record import read_run_record

logger = logging.getLogger(__name__)

PREFIX = "eval/"


def run_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint; ValueError when it has none."""
    point = RunDir(run_dir).read_latest()
    if point is None:
        raise ValueError(f"--run {run_dir}: no checkpoint, so no step to log the metrics at")
    return point.step


def log_to_run(run_dir: Path, metrics: Mapping[str, float], step: int, tags: Mapping[str, Any]) -> str:
    """Log ``eval/<name>`` for every metric at ``step`` and ``tags`` to the run's MLflow run;
    returns the run id. ValueError when the run never started tracking."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    record = read_run_record(run_dir)
    if record is None:
        raise ValueError(f"{run_dir} has no MLflow run ({RunDir(run_dir).mlflow_record} is missing)")
    now = int(time.time() * 1000)
    client = MlflowClient(record.tracking_uri)
    client.log_batch(
        record.run_id,
        metrics=[Metric(PREFIX + name, float(value), now, step) for name, value in metrics.items()],
        tags=[RunTag(f"mvar_dist.evaluation.{key}", str(value)[:5000]) for key, value in tags.items()],
    )
    logger.info("logged %s to MLflow run %s at step %d", ", ".join(PREFIX + m for m in metrics), record.run_id, step)
    return record.run_id
