"""Progress lines while the quickstart's ranks train: the trainer reports per-step metrics to
MLflow only (flushed every 10 steps), so a thread reads the run's latest metrics from there."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from mvar_dist.tracking.run_record import LOGGED_THROUGH_TAG, read_run_record

logger = logging.getLogger(__name__)


class TrainingProgress:
    """Logs the ranks' progress from the run's MLflow metrics while they train."""

    def __init__(self, run_dir: Path, total_steps: int, every_s: float = 15.0) -> None:
        self.run_dir, self.total_steps, self.every_s = run_dir, total_steps, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="quickstart-progress", daemon=True)
        self._last_step = -1

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.report()
            except Exception as err:  # a progress line must never break training
                logger.debug("progress unavailable: %s", err)

    def report(self) -> None:
        from mlflow.tracking import MlflowClient

        record = read_run_record(self.run_dir)
        if record is None:
            return
        run = MlflowClient(record.tracking_uri).get_run(record.run_id)
        step = int(run.data.tags.get(LOGGED_THROUGH_TAG, -1))
        if step <= self._last_step:
            return
        self._last_step = step
        metrics = run.data.metrics
        logger.info("train step %d/%d  loss %.3f  last-scale acc %.1f%%  %.2f s/step", step, self.total_steps,
                    metrics.get("train/loss", float("nan")), metrics.get("train/acc/last", float("nan")),
                    metrics.get("step_time_s", float("nan")))
