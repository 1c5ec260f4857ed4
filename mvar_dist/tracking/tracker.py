"""MLflow tracking for training runs: params, tags, per-step metrics, artifacts (rank 0 only).

One MLflow run per training run, continued across resumes and SLURM requeues. Everything goes
through ``MlflowClient`` with an explicit run id, never the fluent active-run state.

Exactly one value per (metric, step), even across a resume: metrics are buffered and sent with
``log_batch``; every batch also sets the tag ``mvar_dist.metrics_logged_through`` to the last
step it completes, in the same request. A resumed tracker drops values for steps at or below that
tag, so steps logged after the last checkpoint and before a kill are neither duplicated nor lost
(the trainer re-runs them; with exact resume they produce the same values).

Tracking never takes training down. Every call is bounded by ``timeout_s``
(:func:`mvar_dist.tracking.mlflow_run.bound_http_calls`); a failed call starts an outage during
which no call is tried for ``retry_interval_s``, so a dead or hung server costs at most one
timeout per interval. Metrics that could not be sent stay queued (:meth:`RunTracker.undelivered`
goes into every checkpoint) and are sent when the server answers again, in this run or after a
resume (:meth:`RunTracker.create` takes them back). A server that is down when training starts
is connected to later; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from mvar_dist.tracking import mlflow_run
from mvar_dist.tracking.mlflow_run import flatten_config
from mvar_dist.tracking.run_record import LOGGED_THROUGH_TAG, RunRecord, resolve_tracking_uri, write_run_record

logger = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 999  # MLflow allows 1000 entities per log_batch; one slot is the tag
CONFIG_HASH_TAG = "mvar_dist.config_hash"
Metrics = dict[int, dict[str, float]]

__all__ = ["CONFIG_HASH_TAG", "NullTracker", "RunTracker", "Tracker", "flatten_config"]


class Tracker(Protocol):
    """What the trainer logs through; :class:`RunTracker` on rank 0, :class:`NullTracker` elsewhere."""

    run_id: str | None
    tracking_uri: str | None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> bool: ...
    def hold_from(self, step: int | None) -> None: ...
    def undelivered(self) -> Metrics: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What ranks other than 0 get: every method accepted, nothing recorded."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> bool: return True
    def hold_from(self, step: int | None) -> None: ...
    def undelivered(self) -> Metrics: return {}
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: np.ndarray, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def __exit__(self, exc_type, exc, tb) -> None: ...

    def __enter__(self) -> "NullTracker":
        return self


class RunTracker(NullTracker):
    """The rank-0 tracker of one training run; build it with :meth:`create`."""

    def __init__(self, client: Any, tracking_uri: str, run_dir: Path, connect: Callable[[], Any],
                 flush_every: int | None, flush_seconds: float | None, retry_interval_s: float,
                 system_metrics: bool) -> None:
        self._client = client
        self._run_dir = run_dir
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self._connect_run = connect
        self._logged_through: int | None = None
        self._flush_every, self._flush_seconds = flush_every, flush_seconds
        self._retry_interval_s = retry_interval_s
        self._system_metrics = system_metrics
        self._pending: Metrics = {}
        self._pending_tags: dict[str, str] = {}
        self._held_from: int | None = None  # steps from here on are complete only after a resume
        self._last_flush_step: int | None = None
        self._last_flush_time = time.monotonic()
        self._outage_until: float | None = None  # no call is tried before this monotonic time
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
        timeout_s: float | None = None,
        retry_interval_s: float = 0.0,
        undelivered: Mapping[int | str, Mapping[str, float]] | None = None,
        config_hash: str | None = None,
        same_config_only: bool = False,
    ) -> "RunTracker | NullTracker":
        """Start (or, given ``run_id``, continue) the MLflow run of ``run_dir``.

        Ranks other than 0 get a :class:`NullTracker`. Metrics reach MLflow every
        ``flush_every`` steps or ``flush_seconds`` seconds, whichever comes first, and at
        :meth:`flush`; None disables that trigger. ``timeout_s`` bounds every HTTP call;
        after a failure no call is tried for ``retry_interval_s``. ``undelivered`` are the
        metrics a checkpoint kept because they could not be sent. New runs are tagged with
        ``config_hash``; with ``same_config_only`` (no checkpoint vouches for ``run_id``) a run
        whose tag differs is not continued (a new run starts).
        """
        if rank != 0:
            return NullTracker()
        from mlflow.tracking import MlflowClient

        if timeout_s is not None:
            mlflow_run.bound_http_calls(timeout_s)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = resolve_tracking_uri(tracking_uri, run_dir)
        client = MlflowClient(tracking_uri=uri)

        def connect() -> Any:
            return _start_or_continue(client, config_dict, run_dir, experiment, run_id, config_hash, same_config_only)

        tracker = cls(client, uri, run_dir, connect, flush_every, flush_seconds, retry_interval_s, system_metrics)
        for step, metrics in (undelivered or {}).items():
            tracker._pending[int(step)] = dict(metrics)
        if config_hash is not None:
            tracker._pending_tags[CONFIG_HASH_TAG] = config_hash
        tracker._ensure_run()
        return tracker

    # -- reaching the server ----------------------------------------------------------------

    def _ensure_run(self) -> bool:
        """Create or continue the MLflow run if that has not happened yet; False while down."""
        if self.run_id is not None:
            return True
        run = self._call("start the MLflow run", self._connect_run)
        if run is None:
            return False
        self.run_id = run.info.run_id
        value = run.data.tags.get(LOGGED_THROUGH_TAG)
        self._logged_through = int(value) if value is not None else None
        resumed = run.data.tags.get("mvar_dist.resumed_run") == "true"
        write_run_record(self._run_dir, RunRecord(self.tracking_uri, run.info.experiment_id, run.info.run_id))
        if self._system_metrics:
            self._start_system_metrics(resumed)
        logger.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if resumed else "new", self.tracking_uri)
        return True

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None when the server is in an outage or ``fn`` fails (which starts one)."""
        now = time.monotonic()
        if self._outage_until is not None and now < self._outage_until:
            return None
        try:
            result = fn()
        except Exception as error:  # any failure of the tracking side: training goes on
            if self._outage_until is None:
                logger.warning(
                    "MLflow at %s failed to %s (%s: %s); training continues, metrics are kept and sent when "
                    "it answers again", self.tracking_uri, what, type(error).__name__, error,
                )
            self._outage_until = time.monotonic() + self._retry_interval_s
            return None
        if self._outage_until is not None:
            logger.info("MLflow at %s answers again", self.tracking_uri)
            self._outage_until = None
        return True if result is None else result

    # -- metrics ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` for ``step``; sent in batches (see the module docstring)."""
        step = int(step)
        if self._logged_through is not None and step <= self._logged_through:
            self._note_skipped()
            return
        if self._pending and step > max(self._pending) and self._flush_due(step):
            self._send()  # every earlier step is complete once a new step starts
        bucket = self._pending.setdefault(step, {})
        for name, value in metrics.items():
            bucket[str(name)] = float(value)

    def _note_skipped(self) -> None:
        self._skipped += 1
        if self._skipped == 1:
            logger.info("MLflow already holds metrics through step %d; dropping re-run steps up to it",
                        self._logged_through)

    def _flush_due(self, step: int) -> bool:
        by_steps = self._flush_every is not None and (
            self._last_flush_step is None or step - self._last_flush_step >= self._flush_every
        )
        by_time = (
            self._flush_seconds is not None
            and time.monotonic() - self._last_flush_time >= self._flush_seconds
        )
        return by_steps or by_time

    def flush(self) -> bool:
        """Send every queued metric now; True when nothing is left undelivered."""
        self._send()
        return not self._pending

    def hold_from(self, step: int | None) -> None:
        """Send nothing of ``step`` and later (None: send everything again): more values for it
        come after a resume, when a stop postponed its evaluation. Held metrics go into the
        checkpoint with the undelivered ones."""
        self._held_from = step

    def undelivered(self) -> Metrics:
        """The queued metrics (step -> name -> value) that have not reached MLflow yet."""
        return {step: dict(values) for step, values in sorted(self._pending.items())}

    def _send(self) -> None:
        self._last_flush_time = time.monotonic()
        if not self._ensure_run():
            return
        if self._logged_through is not None:  # known only once connected: drop what MLflow holds
            for step in [s for s in self._pending if s <= self._logged_through]:
                del self._pending[step]
                self._note_skipped()
        if not self._pending and not self._pending_tags:
            return
        self._call("log metrics", self._send_batches)

    def _send_batches(self) -> None:
        from mlflow.entities import Metric, RunTag

        timestamp = int(time.time() * 1000)
        batch: list[Any] = []
        complete: list[int] = []  # steps whose last value is in `batch`

        def send() -> None:
            # The tag rides in the same request as the values of the steps it covers.
            tags = [RunTag(k, v) for k, v in self._pending_tags.items()]
            if complete:
                tags.append(RunTag(LOGGED_THROUGH_TAG, str(complete[-1])))
            self._client.log_batch(self.run_id, metrics=batch, tags=tags)
            self._pending_tags.clear()
            for done in complete:
                del self._pending[done]
                self._last_flush_step = done
                self._logged_through = done
            batch.clear()
            complete.clear()

        for step in sorted(s for s in self._pending if self._held_from is None or s < self._held_from):
            values = [Metric(name, v, timestamp, step) for name, v in self._pending[step].items()]
            if batch and len(batch) + len(values) > MAX_METRICS_PER_BATCH:
                send()
            while len(values) > MAX_METRICS_PER_BATCH:  # one step wider than a batch
                chunk, values = values[:MAX_METRICS_PER_BATCH], values[MAX_METRICS_PER_BATCH:]
                batch.extend(chunk)
                send()
                for metric in chunk:  # so that a retry does not send them twice
                    del self._pending[step][metric.key]
            batch.extend(values)
            complete.append(step)
        send()

    # -- artifacts and tags ----------------------------------------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        uploaded = self._ensure_run() and self._call(
            f"upload {path}", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)) is not None
        if not uploaded:
            logger.warning("artifact %s was not uploaded to MLflow (the server does not answer)", Path(path).name)

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
            self.log_artifact(local, parent)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set now if the server answers, else with the next batch of metrics that gets through."""
        self._pending_tags.update({str(k): str(v) for k, v in tags.items()})
        self._send()

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

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, stop system metrics and mark the run FINISHED, FAILED or KILLED. Never raises:
        what could not be sent is reported (and is in the last checkpoint)."""
        if self._finished:
            return
        self._finished = True
        self.flush()
        if self._system_monitor is not None:
            try:
                self._system_monitor.finish()
            except Exception as error:
                logger.warning("MLflow system metrics did not stop cleanly: %s", error)
        if self.run_id is not None:
            self._call(f"mark the run {status}", lambda: self._client.set_terminated(self.run_id, status))
        held = sorted(s for s in self._pending if self._held_from is not None and s >= self._held_from)
        if held:
            logger.info("metrics of step(s) %s wait for their postponed evaluation; the checkpoint keeps them", held)
        steps = sorted(set(self._pending) - set(held))
        if steps:
            logger.error(
                "metrics of %d steps (%d..%d) could not be sent to MLflow at %s; the last checkpoint keeps them "
                "and they are sent when the run resumes (run the same command again once the server is back)",
                len(steps), steps[0], steps[-1], self.tracking_uri,
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _start_or_continue(client: Any, config: Mapping[str, Any], run_dir: Path, experiment: str,
                       run_id: str | None, config_hash: str | None, same_config_only: bool) -> Any:
    """The run to log into: ``run_id`` continued when it exists (and was started for the same
    experiment config), else a new run. Network errors propagate (the caller retries later)."""
    extra_tags = {"run_dir": str(run_dir.resolve())}
    if run_id is not None and not mlflow_run.run_exists(client, run_id):
        # e.g. the run dir moved to a cluster with another tracking server: keep training
        logger.error("MLflow run %s of this run directory is not at its store; starting a new run", run_id)
        extra_tags["resumed_from_missing_run_id"], run_id = run_id, None
    if run_id is not None and config_hash is not None and same_config_only:
        recorded = client.get_run(run_id).data.tags.get(CONFIG_HASH_TAG)
        if recorded is not None and recorded != config_hash:
            logger.warning("MLflow run %s was started for another experiment config; starting a new run", run_id)
            extra_tags["previous_run_id"], run_id = run_id, None
    if run_id is None:
        if config_hash is not None:
            extra_tags[CONFIG_HASH_TAG] = config_hash
        return mlflow_run.start_new_run(client, config, run_dir, experiment, extra_tags)
    mlflow_run.continue_run(client, config, run_dir, run_id)
    client.set_tag(run_id, "mvar_dist.resumed_run", "true")
    client.set_tag(run_id, "run_dir", str(run_dir.resolve()))
    return client.get_run(run_id)
