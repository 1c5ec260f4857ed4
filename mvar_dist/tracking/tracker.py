"""MLflow tracking for training runs: params, tags, per-step metrics, artifacts.

One MLflow run per training run, continued across resumes and SLURM requeues. Everything goes
through ``MlflowClient`` with an explicit run id, never the fluent active-run state.

Exactly one value per (metric, step), even across a resume: metrics are buffered and sent with
``log_batch``; every batch also sets the tag ``mvar_dist.metrics_logged_through`` to the last
step it completes, in the same request. A resumed tracker drops values for steps at or below that
tag, so steps logged after the last checkpoint and before a kill are neither duplicated nor lost
(the trainer re-runs them; with exact resume they produce the same values).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mvar_dist import __version__
from mvar_dist.tracking.run_record import LOGGED_THROUGH_TAG, RunRecord, resolve_tracking_uri, write_run_record

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_METRICS_PER_BATCH = 999  # MLflow allows 1000 entities per log_batch; one slot is the tag
MAX_PARAMS_PER_BATCH = 100


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = json.dumps([_plain(v) for v in value])
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


def _plain(value: Any) -> Any:
    """Config values as YAML/JSON-friendly builtins (paths and tuples appear in resolved configs)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
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


def _environment_tags(run_dir: Path, requeue_only: bool = False) -> dict[str, str]:
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


class NullTracker:
    """What ranks other than 0 get: every method accepted, nothing recorded."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def __exit__(self, exc_type, exc, tb) -> None: ...

    def __enter__(self) -> "NullTracker":
        return self


class RunTracker(NullTracker):
    """The rank-0 tracker of one training run; build it with :meth:`create`."""

    def __init__(self, client: Any, tracking_uri: str, run_id: str, logged_through: int | None,
                 flush_every: int | None, flush_seconds: float | None) -> None:
        self._client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._logged_through = logged_through
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._pending: dict[int, dict[str, float]] = {}
        self._last_flush_step: int | None = None
        self._last_flush_time = time.monotonic()
        self._skipped = 0
        self._system_monitor: Any = None
        self._finished = False

    @classmethod
    def create(
        cls,
        config_dict: Mapping[str, Any],
        run_dir: Path,
        tracking_uri: str | None = None,
        experiment: str = "mvar-dist",
        run_id: str | None = None,
        rank: int = 0,
        *,
        flush_every: int | None = 10,
        flush_seconds: float | None = 60.0,
        system_metrics: bool = True,
    ) -> "RunTracker | NullTracker":
        """Start (or, given ``run_id``, continue) the MLflow run of ``run_dir``.

        Ranks other than 0 get a :class:`NullTracker`. Metrics reach MLflow every
        ``flush_every`` steps or ``flush_seconds`` seconds, whichever comes first, and at
        :meth:`flush`; None disables that trigger.
        """
        if rank != 0:
            return NullTracker()
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = resolve_tracking_uri(tracking_uri, run_dir)
        client = MlflowClient(tracking_uri=uri)
        extra_tags = {"run_dir": str(run_dir.resolve())}
        if run_id is not None and not cls._run_exists(client, run_id):
            # e.g. the run dir moved to a cluster with another tracking server: keep training
            logger.error("MLflow run %s of the checkpoint is not at %s; starting a new run", run_id, uri)
            extra_tags["resumed_from_missing_run_id"], run_id = run_id, None
        if run_id is None:
            run = cls._start_new_run(client, config_dict, run_dir, experiment, extra_tags)
            logged_through = None
        else:
            run = cls._continue_run(client, config_dict, run_dir, run_id)
            value = run.data.tags.get(LOGGED_THROUGH_TAG)
            logged_through = int(value) if value is not None else None
        tracker = cls(client, uri, run.info.run_id, logged_through, flush_every, flush_seconds)
        write_run_record(run_dir, RunRecord(uri, run.info.experiment_id, run.info.run_id))
        if system_metrics:
            tracker._start_system_metrics(resumed=run_id is not None)
        logger.info("MLflow run %s (%s) at %s", run.info.run_id, "resumed" if run_id else "new", uri)
        return tracker

    @staticmethod
    def _run_exists(client: Any, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    @staticmethod
    def _experiment_id(client: Any, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {name!r} is deleted; restore it or choose another experiment name"
                )
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:  # another job created it between our two calls
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    @classmethod
    def _start_new_run(cls, client: Any, config: Mapping[str, Any], run_dir: Path, experiment: str,
                       extra_tags: dict[str, str]) -> Any:
        import yaml
        from mlflow.entities import Param

        tags = {**_environment_tags(run_dir), **extra_tags}
        run = client.create_run(cls._experiment_id(client, experiment), run_name=run_dir.name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten_config(_plain(dict(config))).items()]
        for begin in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[begin : begin + MAX_PARAMS_PER_BATCH])
        client.log_text(run_id, yaml.safe_dump(_plain(dict(config)), sort_keys=False), "config.yaml")
        return client.get_run(run_id)

    @classmethod
    def _continue_run(cls, client: Any, config: Mapping[str, Any], run_dir: Path, run_id: str) -> Any:
        from mlflow.entities import RunTag

        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        tags = _environment_tags(run_dir, requeue_only=True)
        changed = sorted(
            k for k, v in flatten_config(_plain(dict(config))).items()
            if k in run.data.params and run.data.params[k] != v
        )
        if changed:
            # MLflow params are immutable; keep the evidence instead of failing the resume.
            logger.warning("config changed on resume of MLflow run %s: %s", run_id, ", ".join(changed))
            tags["config_changed_on_resume"] = ",".join(changed)[:5000]
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return client.get_run(run_id)

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            import psutil  # noqa: F401  (the monitor needs it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri
            )
            self._system_monitor.start()
        except Exception as error:  # optional: never let it stop training
            logger.warning("MLflow system metrics are off: %s", error)
            self._system_monitor = None

    # -- metrics ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` for ``step``; sent in batches (see the module docstring)."""
        step = int(step)
        if self._logged_through is not None and step <= self._logged_through:
            self._skipped += 1
            if self._skipped == 1:
                logger.info(
                    "MLflow already holds metrics through step %d; dropping re-run steps up to it",
                    self._logged_through,
                )
            return
        if self._pending and step > max(self._pending) and self._flush_due(step):
            self._send(self._pending)  # every earlier step is complete once a new step starts
        bucket = self._pending.setdefault(step, {})
        for name, value in metrics.items():
            bucket[str(name)] = float(value)

    def _flush_due(self, step: int) -> bool:
        by_steps = self._flush_every is not None and (
            self._last_flush_step is None or step - self._last_flush_step >= self._flush_every
        )
        by_time = (
            self._flush_seconds is not None
            and time.monotonic() - self._last_flush_time >= self._flush_seconds
        )
        return by_steps or by_time

    def flush(self) -> None:
        """Send every queued metric now; the trainer calls this after each checkpoint and at the end."""
        self._send(self._pending)

    def _send(self, pending: dict[int, dict[str, float]]) -> None:
        from mlflow.entities import Metric, RunTag

        self._last_flush_time = time.monotonic()
        if not pending:
            return
        timestamp = int(time.time() * 1000)
        batch: list[Any] = []
        complete: list[int] = []  # steps whose last value is in `batch`

        def send() -> None:
            # The tag rides in the same request as the values of the steps it covers.
            tags = [RunTag(LOGGED_THROUGH_TAG, str(complete[-1]))] if complete else []
            self._client.log_batch(self.run_id, metrics=batch, tags=tags)
            for done in complete:
                del pending[done]
                self._last_flush_step = done
            batch.clear()
            complete.clear()

        try:
            for step in sorted(pending):
                values = [Metric(name, v, timestamp, step) for name, v in pending[step].items()]
                if batch and len(batch) + len(values) > MAX_METRICS_PER_BATCH:
                    send()
                while len(values) > MAX_METRICS_PER_BATCH:  # one step wider than a batch
                    chunk, values = values[:MAX_METRICS_PER_BATCH], values[MAX_METRICS_PER_BATCH:]
                    batch.extend(chunk)
                    send()
                    for metric in chunk:  # so that a retry does not send them twice
                        del pending[step][metric.key]
                batch.extend(values)
                complete.append(step)
            send()
        except Exception as error:  # tracking outages must not stop training; retried next flush
            logger.warning("MLflow log_batch failed (%s); %d steps stay queued", error, len(pending))

    # -- artifacts and tags ----------------------------------------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Store a uint8 (H, W), (H, W, 1|3|4) array as a PNG at ``artifact_file``."""
        from PIL import Image

        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"log_image needs a uint8 array, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"log_image needs (H, W) or (H, W, 1|3|4), got shape {image.shape}")
        artifact = Path(artifact_file)
        if artifact.suffix.lower() != ".png":
            raise ValueError(f"artifact_file must end in .png, got {artifact_file!r}")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / artifact.name
            Image.fromarray(image).save(local, format="PNG")
            parent = str(artifact.parent) if str(artifact.parent) not in ("", ".") else None
            self._client.log_artifact(self.run_id, str(local), parent)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, stop system metrics and mark the run FINISHED, FAILED or KILLED."""
        if self._finished:
            return
        self._finished = True
        self.flush()
        if self._pending:
            logger.error("MLflow run %s ends with %d steps never sent", self.run_id, len(self._pending))
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self._client.set_terminated(self.run_id, status)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
