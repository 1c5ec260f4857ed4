"""Which code trains and exports each kind of experiment. The kind itself is decided in one place,
:mod:`mvar_dist.config.kinds`; this module maps it to the training task that the run skeleton
runs and to the export of a finished run, so that launchers and commands never import a
trainer for a kind they do not run."""

from __future__ import annotations

from pathlib import Path

from mvar_dist.config import TOKENIZER, Experiment, ExperimentKind, kind_named_by, kind_of
from mvar_dist.run_dir import RunDir
from mvar_dist.runtime.task import TrainingTask


def training_task(config: Experiment) -> TrainingTask:
    if kind_of(config) is TOKENIZER:
        from mvar_dist.tokenizer_training.task import TokenizerTask

        return TokenizerTask(config)  # type: ignore[arg-type]
    from mvar_dist.training.task import TransformerTask

    return TransformerTask(config)  # type: ignore[arg-type]


def run_kind(run_dir: Path, tag: str = "latest") -> ExperimentKind:
    """The kind of the run that wrote checkpoint ``tag`` of ``run_dir``."""
    run = RunDir(Path(run_dir))
    return kind_named_by(run.read_resume_point(run.resolve_tag(tag)).run_state.config)


def export_run(run_dir: Path, out: Path, tag: str = "latest", dtype: str = "fp32", fmt: str = "safetensors",
               log_to_mlflow: bool = False) -> list[str]:
    """Export checkpoint ``tag`` of a run of any kind into ``out``; returns what to tell the user.
    A tokenizer run writes both of its layouts (``dtype`` and ``fmt`` are the transformer's)."""
    if run_kind(run_dir, tag) is TOKENIZER:
        from mvar_dist.tokenizer_training.export import export_tokenizer_run

        paths = export_tokenizer_run(run_dir, out, tag)
        return [f"exported the tokenizer to {paths['safetensors']} and {paths['released']} (released layout)"]
    from mvar_dist.model.pretrained import read_export_metadata
    from mvar_dist.training import export

    weights = export.export_run(run_dir, out, tag, dtype, fmt)
    summary = read_export_metadata(out)["training"]
    lines = [f"exported step {summary['steps']} ({summary['checkpoint_tag']}) to {weights}"]
    if log_to_mlflow:
        artifact = export.log_export_to_mlflow(run_dir, out)
        lines.append(f"logged to MLflow run {summary['mlflow_run_id']} at {artifact}")
    return lines
