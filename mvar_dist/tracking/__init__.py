"""Experiment tracking with MLflow: the rank-0 run tracker, the run record that ties a run
directory to its MLflow run, and the comparison of runs (``mvar-dist compare``)."""

from mvar_dist.tracking.run_record import (
    LOGGED_THROUGH_TAG,
    RunRecord,
    mlflow_link,
    read_run_record,
    resolve_tracking_uri,
    write_run_record,
)
from mvar_dist.tracking.tracker import NullTracker, RunTracker, Tracker, flatten_config

__all__ = [
    "LOGGED_THROUGH_TAG", "NullTracker", "RunRecord", "RunTracker", "Tracker", "flatten_config", "mlflow_link", "read_run_record",
    "resolve_tracking_uri", "write_run_record",
]
