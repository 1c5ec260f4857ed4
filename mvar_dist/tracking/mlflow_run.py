"""The MLflow run of a training run, on the server's side: creating it (config as params and
``config.yaml``, who/where as tags), continuing it after a resume or a requeue, and the HTTP
time limits every call runs under."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

from mvar_dist import __version__

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_PARAMS_PER_BATCH = 100


def bound_http_calls(timeout_s: float) -> None:
    """Every MLflow HTTP request of this process gives up after ``timeout_s`` and is not retried
    by MLflow (the tracker retries on its own schedule): MLflow's defaults (120 s, 7 retries
    with backoff) can hold a training step for many minutes when the server hangs."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = json.dumps([plain_values(v) for v in value])
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {'a.b.c': 'value'} with values stringified and cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def plain_values(value: Any) -> Any:
    """Config values as YAML/JSON-friendly builtins (paths and tuples appear in resolved configs)."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _git_commit(directories: list[Path]) -> tuple[str, bool] | None:
    """(commit, dirty) of the first directory inside a git work tree; None if there is none."""
    for directory in directories:
        try:
            commit = subprocess.run(
                ["git", "-C", str(directory), "rev-parse", "HEAD"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            return commit, bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def environment_tags(run_dir: Path, requeue_only: bool = False) -> dict[str, str]:
    """Who/where is running: world size, hosts, SLURM job; plus git and version on creation."""
    tags = {
        "world_size": os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")),
        "hosts": os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()),
    }
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm_requeue_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    if requeue_only:
        return tags
    tags["mvar_dist_version"] = __version__
    package_dir = Path(__file__).resolve().parent
    git = _git_commit([Path(run_dir), Path.cwd(), package_dir])
    if git is not None:
        tags["mlflow.source.git.commit"] = git[0]
        tags["git_commit"] = git[0]
        tags["git_dirty"] = str(git[1]).lower()
    return tags


def run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise

def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a sqlite store (MLflow's
    default, ``./mlruns`` of whatever directory the command ran in, would mix unrelated runs and
    lose them when run elsewhere); a server's own artifact store otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    return (database.parent / "mlartifacts").resolve().as_uri()


def experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it or choose another experiment name"
            )
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
    except MlflowException:  # another job created it between our two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id

def start_new_run(client: Any, config: Mapping[str, Any], run_dir: Path, experiment: str,
                  extra_tags: dict[str, str]) -> Any:
    """A new run in ``experiment`` with the config as params (and as config.yaml) and the
    environment as tags; returns the run."""
    import yaml
    from mlflow.entities import Param

    tags = {**environment_tags(run_dir), **extra_tags}
    run = client.create_run(experiment_id(client, experiment), run_name=run_dir.name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_config(plain_values(dict(config))).items()]
    for begin in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[begin : begin + MAX_PARAMS_PER_BATCH])
    client.log_text(run_id, yaml.safe_dump(plain_values(dict(config)), sort_keys=False), "config.yaml")
    return client.get_run(run_id)

def continue_run(client: Any, config: Mapping[str, Any], run_dir: Path, run_id: str) -> Any:
    """Mark the run RUNNING again and record who continues it; returns the run."""
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    tags = environment_tags(run_dir, requeue_only=True)
    changed = sorted(
        k for k, v in flatten_config(plain_values(dict(config))).items()
        if k in run.data.params and run.data.params[k] != v
    )
    if changed:
        # MLflow params are immutable; keep the evidence instead of failing the resume.
        logger.warning("config changed on resume of MLflow run %s: %s", run_id, ", ".join(changed))
        tags["config_changed_on_resume"] = ",".join(changed)[:5000]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return client.get_run(run_id)
