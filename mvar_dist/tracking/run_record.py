"""Where a training run's MLflow data lives: the tracking URI rule and ``mlflow_run.json``,
read by every tool that follows a run (status, export, compare, the quickstart)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mvar_dist.atomic import write_json
from mvar_dist.run_dir import RunDir

LOGGED_THROUGH_TAG = "mvar_dist.metrics_logged_through"


@dataclass(frozen=True)
class RunRecord:
    """Where a run's MLflow data lives (``<run_dir>/mlflow_run.json``)."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def write_run_record(run_dir: str | Path, record: RunRecord) -> None:
    write_json(RunDir(run_dir).mlflow_record, asdict(record), indent=2)


def read_run_record(run_dir: str | Path) -> RunRecord | None:
    """The run's MLflow record, or None if the run never started tracking."""
    path = RunDir(run_dir).mlflow_record
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    try:
        return RunRecord(str(data["tracking_uri"]), str(data["experiment_id"]), str(data["run_id"]))
    except KeyError as missing:
        raise ValueError(f"{path} lacks the field {missing}; delete it or fix it by hand") from None


def resolve_tracking_uri(tracking_uri: str | None, run_dir: Path) -> str:
    """Argument, else $MLFLOW_TRACKING_URI, else a sqlite database inside the run dir."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A browser address of the run, or how to serve a local store and where to look."""
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{fragment}"
    # a local store has no web address of its own: serve it, then open the fragment
    return f"mlflow ui --backend-store-uri {tracking_uri}  then open http://127.0.0.1:5000/{fragment}"
