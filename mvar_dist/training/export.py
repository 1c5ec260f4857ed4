"""A DeepSpeed ZeRO checkpoint of a run -> a self-contained model directory (``mvar-dist export``).

``safetensors`` (default) writes ``model.safetensors`` + ``config.json`` (model config, tokenizer
identity, sampling settings, training summary); :meth:`mvar_dist.model.MVAR.from_pretrained`
reads it back (format: :mod:`mvar_dist.model.pretrained`). ``official`` writes a ``.pth`` in the
released VAR/MVAR layout (:mod:`mvar_dist.model.released`). Runs on CPU, without
torch.distributed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mvar_dist import __version__
from mvar_dist.atomic import write_json, write_via_temp
from mvar_dist.config import ExperimentConfig, config_from_dict
from mvar_dist.model.config import MVARConfig
from mvar_dist.model.pretrained import CONFIG_FILE, EXPORT_FORMAT, SAFETENSORS_FILE
from mvar_dist.model.released import official_state_dict
from mvar_dist.model.transformer import MVAR
from mvar_dist.run_dir import RunDir
from mvar_dist.runtime.zero_checkpoint import consolidate
from mvar_dist.state_files import file_sha256
from mvar_dist.tokenizer import load_tokenizer
from mvar_dist.tracking.run_record import read_run_record

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _final_metrics(run_dir: RunDir, run_id: str | None, step: int) -> dict[str, float]:
    """Metric values at ``step`` from the run's MLflow run; empty when it cannot be reached."""
    record = read_run_record(run_dir.path)
    if record is None or run_id is None:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record.tracking_uri)
        metrics: dict[str, float] = {}
        for key in client.get_run(run_id).data.metrics:
            if key.startswith("system/"):
                continue
            at_step = [m for m in client.get_metric_history(run_id, key) if m.step == step]
            if at_step:
                metrics[key] = max(at_step, key=lambda m: m.timestamp).value
        return dict(sorted(metrics.items()))
    except Exception as error:  # the export must not depend on the tracking server being up
        logger.warning("final metrics not recorded: MLflow run %s unreadable (%s)", run_id, error)
        return {}


def _tokenizer_identity(config: ExperimentConfig) -> dict[str, Any] | None:
    """The identity a shard manifest records; None when the tokenizer weights are not at hand."""
    section = config.tokenizer
    if section.checkpoint is None:
        logger.warning("the run's config names no tokenizer.checkpoint: config.json records no tokenizer identity")
        return None
    if not Path(section.checkpoint).is_file():
        logger.warning("tokenizer checkpoint %s not found: config.json records no tokenizer identity", section.checkpoint)
        return None
    return load_tokenizer(section.checkpoint, section.kind, section.options).identity()


def export_metadata(run_dir: RunDir, tag: str, dtype: str) -> dict[str, Any]:
    """config.json content: the model, tokenizer, sampling settings and training summary."""
    run_state = run_dir.read_resume_point(tag).run_state
    config = config_from_dict(run_state.config)  # the config the weights were trained with
    step = run_state.step
    tokenizer = {
        "kind": config.tokenizer.kind,
        "checkpoint": config.tokenizer.checkpoint,
        "options": config.tokenizer.options,
        "identity": _tokenizer_identity(config),
    }
    return {
        "format": EXPORT_FORMAT,
        "mvar_dist_version": __version__,
        "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "model": config.model.to_dict(),
        "patch_nums": list(config.model.patch_nums),
        "tokenizer": tokenizer,
        "sample": {"cfg": config.sample.cfg, "top_p": config.sample.top_p, "top_k": config.sample.top_k},
        "training": {
            "run_dir": str(run_dir.path.resolve()),
            "checkpoint_tag": tag,
            "steps": step,
            "images_seen": step * config.train.global_batch_size,
            "world_size": run_state.world_size,
            "config_hash": run_state.config_hash,
            "mlflow_run_id": run_state.mlflow_run_id,
            "final_metrics": _final_metrics(run_dir, run_state.mlflow_run_id, step),
        },
    }


# ----- writing -----


def _match_model(state: dict[str, torch.Tensor], model_config: MVARConfig, source: str) -> dict[str, torch.Tensor]:
    """``state`` in the model's own key order (DeepSpeed returns optimizer-group order), after
    checking that every key and shape matches the model config."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MVAR(model_config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not match model config depth={model_config.depth}, "
            f"embed_dim={model_config.embed_dim}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )
    return {key: state[key] for key in expected}


def export_run(
    run_dir: Path, out_dir: Path, tag: str = "latest", dtype: str = "fp32", fmt: str = "safetensors",
) -> Path:
    """Export one checkpoint of ``run_dir`` into ``out_dir``; returns the weights file."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if fmt not in ("safetensors", "official"):
        raise ValueError(f"format must be 'safetensors' or 'official', got {fmt!r}")
    run = RunDir(Path(run_dir))
    tag = run.resolve_tag(tag)
    metadata = export_metadata(run, tag, dtype)
    model_config = MVARConfig.from_dict(metadata["model"])
    state = consolidate(run.checkpoints, tag)
    state = _match_model(state, model_config, f"{run.tag_dir(tag)}")
    weights = write_export(out_dir, state, model_config, metadata, fmt, dtype)
    logger.info("exported %s (%s, %s) to %s", run.tag_dir(tag), fmt, dtype, weights)
    return weights


def write_export(
    out_dir: Path, state: dict[str, torch.Tensor], model_config: MVARConfig, metadata: dict[str, Any],
    fmt: str = "safetensors", dtype: str = "fp32",
) -> Path:
    """Write an export directory: ``state`` (our layout, checked against ``model_config``) cast to
    ``dtype`` as ``model.safetensors`` or, with ``fmt`` "official", the released ``.pth`` layout;
    then ``config.json`` (``metadata`` plus ``weights`` and ``weights_sha256``), last, so that its
    presence marks a complete export. Shared by ``export`` and ``import-released``."""
    from safetensors.torch import save_file

    cast = DTYPES[dtype]
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)  # an interrupted re-export must not look complete
    if fmt == "safetensors":
        weights = out_dir / SAFETENSORS_FILE
        write_via_temp(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    else:
        official = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in official_state_dict(state, model_config).items()}
        weights = out_dir / f"{model_config.mode}_d{model_config.depth}.pth"
        write_via_temp(weights, lambda tmp: torch.save(official, tmp))
    metadata = {**metadata, "weights": weights.name}
    metadata["weights_sha256"] = file_sha256(weights)  # checked by from_pretrained and sample
    # config.json last: its presence marks a complete export
    write_json(out_dir / CONFIG_FILE, metadata, indent=2)
    return weights


def log_export_to_mlflow(run_dir: Path, out_dir: Path) -> str:
    """Attach the exported directory to the run's MLflow run under ``model/<tag>``."""
    from mlflow.tracking import MlflowClient

    record = read_run_record(run_dir)
    metadata = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    run_id = metadata["training"]["mlflow_run_id"] or (record.run_id if record else None)
    if record is None or run_id is None:
        raise ValueError(f"{run_dir} has no MLflow run ({run_dir}/mlflow_run.json missing)")
    artifact_path = f"model/{metadata['training']['checkpoint_tag']}"
    client = MlflowClient(record.tracking_uri)
    client.log_artifacts(run_id, str(out_dir), artifact_path)
    client.set_tag(run_id, "exported_model", artifact_path)
    return artifact_path
