"""Which code trains and exports each kind of experiment. The kind itself is decided in one place,
:mod:`mvar_dist.config.kinds`; this module maps it to the training task that the run skeleton
runs and to the export of a finished run, so that launchers and commands never import a
trainer for a kind they do not run."""

from __future__ import annotations

import json

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


EXPORT_FILE_SUFFIXES = (".safetensors", ".pth")


def check_export_target(out: Path, run_dir: Path, force: bool = False) -> list[Path]:
    """Refuse an ``out`` that holds another run's export (or an import of another released file:
    ``run_dir`` is then that file) or files that are no export's (unless
    ``force``); remove temp files an interrupted export left. Returns the earlier export's files,
    which :func:`export_run` removes once the new export is complete where it did not overwrite
    them: the files of two exports never sit side by side, and a failed export loses nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return []
    for leftover in out.glob(".*.tmp"):  # temporary_sibling's names: a killed export's partial file
        leftover.unlink()
    config = out / "config.json"
    exported = [p for p in out.iterdir() if p == config or (p.is_file() and p.suffix in EXPORT_FILE_SUFFIXES)]
    others = sorted(p.name for p in out.iterdir() if p not in exported)
    recorded = None
    if config.is_file():
        try:
            metadata = json.loads(config.read_text())
            # an export records its run directory; an import-released, the released file
            recorded = metadata["released"]["file"] if "released" in metadata else metadata["training"]["run_dir"]
        except (ValueError, KeyError, TypeError):
            recorded = "?"
    if not force:
        if recorded is not None and recorded != str(Path(run_dir).resolve()):
            raise ValueError(f"--out {out} holds an export of {recorded}; choose a new or empty directory, "
                             "or pass --force to replace it")
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(f"--out {out} holds {len(others)} other file{'s' if len(others) > 1 else ''} ({listed}); "
                             "choose a new or empty directory, or pass --force to write the export beside them")
    return exported


def _remove_stale(out: Path, earlier: list[Path]) -> None:
    metadata = json.loads((Path(out) / "config.json").read_text())
    current = {"config.json", *([metadata["weights"]] if "weights" in metadata else metadata.get("files", {}).values())}
    for path in earlier:
        if path.name not in current:
            path.unlink(missing_ok=True)


def export_run(run_dir: Path, out: Path, tag: str = "latest", dtype: str = "fp32", fmt: str = "safetensors",
               log_to_mlflow: bool = False, force: bool = False) -> list[str]:
    """Export checkpoint ``tag`` of a run of any kind into ``out``; returns what to tell the user.
    A tokenizer run writes both of its layouts (``dtype`` and ``fmt`` are the transformer's).
    ``out`` is checked first (:func:`check_export_target`)."""
    kind = run_kind(run_dir, tag)  # a tag that does not exist fails before anything in out is touched
    earlier = check_export_target(out, run_dir, force)
    if kind is TOKENIZER:
        from mvar_dist.tokenizer_training.export import export_tokenizer_run

        paths = export_tokenizer_run(run_dir, out, tag)
        _remove_stale(out, earlier)
        return [f"exported the tokenizer to {paths['safetensors']} and {paths['released']} (released layout)"]
    from mvar_dist.model.pretrained import read_export_metadata
    from mvar_dist.training import export

    weights = export.export_run(run_dir, out, tag, dtype, fmt)
    _remove_stale(out, earlier)
    summary = read_export_metadata(out)["training"]
    lines = [f"exported step {summary['steps']} ({summary['checkpoint_tag']}) to {weights}"]
    if log_to_mlflow:
        artifact = export.log_export_to_mlflow(run_dir, out)
        lines.append(f"logged to MLflow run {summary['mlflow_run_id']} at {artifact}")
    return lines


def import_released(checkpoint: Path, out: Path, tokenizer: Path, mode: str | None = None, depth: int | None = None,
                    tokenizer_kind: str = "vqvae", dtype: str = "fp32", fmt: str = "safetensors",
                    sample: dict | None = None, model_fields: dict | None = None, force: bool = False) -> list[str]:
    """A released VAR/MVAR checkpoint -> an export directory ``out`` (``mvar-dist import-released``);
    the file and the tokenizer are checked before ``out`` (:func:`check_export_target`, as export
    does, with the released file in place of a run directory). Returns what to tell the user."""
    from mvar_dist.training.export import write_export
    from mvar_dist.training.import_released import prepare_import

    if fmt not in ("safetensors", "official"):
        raise ValueError(f"format must be 'safetensors' or 'official', got {fmt!r}")
    prepared = prepare_import(checkpoint, tokenizer, mode, depth, tokenizer_kind, dtype, sample, model_fields)
    earlier = check_export_target(out, Path(checkpoint), force)
    weights = write_export(out, prepared.state, prepared.model_config, prepared.metadata, fmt, dtype)
    _remove_stale(out, earlier)
    config, settings = prepared.model_config, prepared.metadata["sample"]
    origin = prepared.metadata["released"]["sample_settings_from"]
    count = sum(v.numel() for v in prepared.state.values())
    imported = f"imported {checkpoint} ({config.mode}, depth {config.depth}, {count:,} parameters and buffers) to {weights}"
    recorded = f"sampling settings cfg {settings['cfg']} / top-p {settings['top_p']} / top-k {settings['top_k']} ({origin})"
    return [imported, recorded]
