"""Runs of one MLflow experiment side by side (``mvar-dist compare``): a markdown table and plots.

For each chosen metric and run the table gives the final value, the best value and the value at
the equal step: the largest step every compared run (that logged the metric) reached, so runs of
different lengths are compared at the same point of training. The value at a step is the last one
logged at or before it (metrics may be logged every N steps). "Best" is the maximum for
accuracies and throughputs (names containing ``acc``, ending in ``per_s``, or ``throughput``)
and the minimum for everything else (losses, times, memory).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mvar_dist.tracking.plots import plot_panels

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("train/loss", "train/loss/last", "train/acc/mean", "val/loss", "eval/fid", "eval/sfid",
                   "eval/inception_score", "eval/precision", "eval/recall", "tokens_per_s", "images_per_s",
                   "peak_memory_mb")
# quality metrics where more is better (mvar-dist evaluate); FIDs, losses, times: less is better
HIGHER_IS_BETTER = ("inception_score", "precision", "recall")
# the trainer logs train/loss/scale_<s>; train/loss_s<s> is accepted too
SCALE_LOSS = re.compile(r"^train/loss(?:/scale_|_s)(\d+)$")
IMAGES_SEEN = "train/images_seen"
THROUGHPUT_METRICS = ("tokens_per_s", "images_per_s")
MEMORY_METRICS = ("peak_memory_mb",)


class CompareError(ValueError):
    """Bad input to ``compare``: the message lists what exists."""


def higher_is_better(metric: str) -> bool:
    name = metric.lower()
    return ("acc" in name or name.endswith("per_s") or "throughput" in name
            or any(name.endswith(metric) for metric in HIGHER_IS_BETTER))


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    label: str  # the run name, made unique with the id prefix when names repeat
    params: dict[str, str]
    metric_keys: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    metric: str
    run: str
    last_step: int | None
    final: float | None
    best: float | None
    rule: str
    equal_step: int | None
    at_equal_step: float | None


History = list[tuple[int, float]]  # (step, value), sorted by step


def value_at(history: History, step: int) -> float | None:
    """The last value logged at or before ``step``."""
    found = None
    for s, v in history:
        if s > step:
            break
        found = v
    return found


def summarize(metric: str, histories: dict[str, History]) -> list[Row]:
    """One row per run for ``metric``; ``histories`` maps run label -> history (may be empty)."""
    logged = {label: h for label, h in histories.items() if h}
    equal_step = min((h[-1][0] for h in logged.values()), default=None)
    better = max if higher_is_better(metric) else min
    rows = []
    for label, history in histories.items():
        finite = [v for _, v in history if math.isfinite(v)]
        rows.append(Row(
            metric=metric, run=label,
            last_step=history[-1][0] if history else None,
            final=history[-1][1] if history else None,
            best=better(finite) if finite else None,
            rule="max" if higher_is_better(metric) else "min",
            equal_step=equal_step if history else None,
            at_equal_step=value_at(history, equal_step) if history and equal_step is not None else None,
        ))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    header = ["metric", "run", "last step", "final", "best", "rule", "equal step", "at equal step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.metric, r.run, r.last_step, r.final, r.best, r.rule, r.equal_step, r.at_equal_step]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# ----- reading MLflow -----


class RunStore:
    """The runs of one experiment, and their metric histories (fetched once each)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in self.client.search_experiments())
            raise CompareError(f"experiment {experiment!r} does not exist at {tracking_uri}; experiments there: {names or 'none'}")
        self.experiment_id = found.experiment_id
        self._histories: dict[tuple[str, str], History] = {}

    def runs(self, wanted: Sequence[str] | None) -> list[RunInfo]:
        """All runs of the experiment (oldest first), or those named by id or run name, in that order."""
        runs = self.client.search_runs([self.experiment_id], order_by=["attributes.start_time ASC"], max_results=10_000)
        if not runs:
            raise CompareError("the experiment has no runs")
        if wanted:
            chosen = []
            for key in wanted:
                matches = [r for r in runs if key in (r.info.run_id, r.info.run_name)]
                if not matches:
                    known = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in runs)
                    raise CompareError(f"no run {key!r} in the experiment; runs: {known}")
                if len(matches) > 1:
                    raise CompareError(f"run name {key!r} matches runs {[r.info.run_id for r in matches]}; pass a run id")
                chosen.append(matches[0])
            runs = chosen
        names = [r.info.run_name or r.info.run_id[:8] for r in runs]
        return [
            RunInfo(
                run_id=r.info.run_id,
                label=name if names.count(name) == 1 else f"{name} ({r.info.run_id[:8]})",
                params=dict(r.data.params),
                metric_keys=tuple(sorted(r.data.metrics)),
            )
            for r, name in zip(runs, names)
        ]

    def history(self, run: RunInfo, key: str) -> History:
        if key not in run.metric_keys:
            return []
        if (run.run_id, key) not in self._histories:
            points = self.client.get_metric_history(run.run_id, key)
            # one value per step: the latest-timestamped one, should a step have been logged twice
            by_step = {m.step: m.value for m in sorted(points, key=lambda m: (m.step, m.timestamp))}
            self._histories[(run.run_id, key)] = sorted(by_step.items())
        return self._histories[(run.run_id, key)]


def resolve_tracking_uri(tracking_uri: str | None, run_dir: Path) -> str:
    """As training resolves it; a sqlite store that does not exist is an error, not a new database."""
    from mvar_dist.tracking.run_record import resolve_tracking_uri as resolve

    uri = resolve(tracking_uri, run_dir)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(
                f"no MLflow database at {path}; pass --tracking-uri, set MLFLOW_TRACKING_URI, or --run-dir a run directory"
            )
    return uri


def choose_metrics(runs: Sequence[RunInfo], requested: Sequence[str] | None) -> list[str]:
    existing = sorted({k for r in runs for k in r.metric_keys})
    if requested:
        missing = [m for m in requested if m not in existing]
        if missing:
            raise CompareError(f"metric(s) {missing} were not logged by the chosen runs; metrics that exist: {existing}")
        return list(requested)
    chosen = [m for m in DEFAULT_METRICS if m in existing]
    chosen += [m for m in existing if m.startswith("eval/fid_")]  # FID during training, eval.fid_samples images
    if not chosen:
        raise CompareError(f"none of the default metrics {list(DEFAULT_METRICS)} exist; pick some with --metrics from {existing}")
    return chosen


# ----- plots -----


def images_seen(store: RunStore, run: RunInfo, steps: Sequence[int]) -> list[float] | None:
    """Images seen at ``steps``: the images_seen metric, else step x train.global_batch_size."""
    logged = store.history(run, IMAGES_SEEN)
    if logged:
        return [value_at(logged, s) or 0.0 for s in steps]
    batch = run.params.get("train.global_batch_size")
    if batch is None or not batch.isdigit():
        return None
    return [s * int(batch) for s in steps]


def _series(store: RunStore, runs: Sequence[RunInfo], keys: Sequence[str], by_images: bool = False
            ) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{metric: {run label: (x, values)}}; x is the step, or the images seen at that step."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for key in keys:
        lines = {}
        for run in runs:
            history = store.history(run, key)
            if history:
                steps = [s for s, _ in history]
                x = images_seen(store, run, steps) if by_images else steps
                lines[run.label] = (x, [v for _, v in history])
        panels[key] = lines
    return panels


def write_plots(store: RunStore, runs: Sequence[RunInfo], metrics: Sequence[str], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    all_keys = sorted({k for r in runs for k in r.metric_keys})
    scale_keys = sorted((k for k in all_keys if SCALE_LOSS.match(k)), key=lambda k: int(SCALE_LOSS.match(k).group(1)))
    memory = [k for k in all_keys if k in MEMORY_METRICS or (k.startswith("system/") and "memory" in k)]
    written = [
        plot_panels(_series(store, runs, metrics), out_dir / "metrics.png", "step"),
        plot_panels(_series(store, runs, scale_keys), out_dir / "loss_per_scale_vs_step.png", "step"),
        plot_panels(_series(store, runs, [k for k in THROUGHPUT_METRICS if k in all_keys]), out_dir / "throughput.png", "step"),
        plot_panels(_series(store, runs, memory), out_dir / "memory.png", "step"),
    ]
    if scale_keys and all(images_seen(store, r, [1]) is not None for r in runs):
        series = _series(store, runs, scale_keys, by_images=True)
        written.append(plot_panels(series, out_dir / "loss_per_scale_vs_images.png", "images seen"))
    elif scale_keys:
        logger.info("no %s metric or train.global_batch_size param: loss against images seen not plotted", IMAGES_SEEN)
    return [p for p in written if p is not None]


# ----- the comparison -----


def compare(experiment: str, runs: Sequence[str] | None, metrics: Sequence[str] | None, tracking_uri: str,
            out_dir: Path | None) -> tuple[str, list[Row], list[Path]]:
    """The table, its rows and the plot files."""

    store = RunStore(tracking_uri, experiment)
    chosen = store.runs(runs)
    names = choose_metrics(chosen, metrics)
    rows = [row for m in names for row in summarize(m, {r.label: store.history(r, m) for r in chosen})]
    table = markdown_table(rows)
    plots: list[Path] = []
    if out_dir is not None:
        plots = write_plots(store, chosen, names, out_dir)
        (out_dir / "table.md").write_text(table + "\n")
    return table, rows, plots
