"""``mvar-dist export``: a DeepSpeed ZeRO checkpoint of a run -> a self-contained model directory.

``--format safetensors`` (default) writes ``model.safetensors`` + ``config.json`` (model config,
tokenizer identity, sampling settings, training summary); :func:`load_pretrained` reads it back.
``--format official`` writes a ``.pth`` state dict with the released VAR/MVAR key names, including
the buffers the paper's code derives from the config (``lvl_1L``, ``attn_bias_for_masking``,
``zero_k_bias``), so that its ``load_state_dict`` accepts the file strictly.
Runs on CPU, without torch.distributed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mvar_dist.atomic import write_json, write_via_temp
from mvar_dist import __version__

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
EXPORT_FORMAT = "mvar-dist-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Wrappers that prefix parameter names: DeepSpeed/DDP, torch.compile, activation checkpointing.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "_checkpoint_wrapped_module.")


# ----- reading a run -----


def resolve_tag(checkpoint_dir: Path, tag: str) -> str:
    """``latest`` -> the tag the trainer last completed; other names must exist."""
    from mvar_dist.engine import read_latest

    if tag == "latest":
        point = read_latest(checkpoint_dir)
        if point is None:
            raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file: the run never completed a checkpoint")
        return point.tag
    if not (checkpoint_dir / tag).is_dir():
        known = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir()) if checkpoint_dir.is_dir() else []
        raise FileNotFoundError(f"no checkpoint {tag!r} in {checkpoint_dir}; available tags: {known}")
    return tag


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def consolidate(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO 1/2/3 checkpoint, merged from every rank's partition by DeepSpeed."""
    tag_dir = checkpoint_dir / tag
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(
            f"{tag_dir} holds no ZeRO optimizer partitions (*optim_states.pt); export reads "
            f"DeepSpeed ZeRO stage 1-3 checkpoints"
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed probes for an accelerator on import
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints its progress
    with contextlib.redirect_stdout(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    logger.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    return strip_wrapper_prefixes({k: v.detach().cpu() for k, v in state.items()})


def _final_metrics(run_dir: Path, run_id: str | None, step: int) -> dict[str, float]:
    """Metric values at ``step`` from the run's MLflow run; empty when it cannot be reached."""
    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    if record is None or run_id is None:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record.tracking_uri)
        metrics: dict[str, float] = {}
        # RunData keeps each key's latest value with its step (MLflow's own system-metrics
        # resume reads it the same way); full histories are fetched only when needed.
        for metric in client.get_run(run_id).data._metric_objs:
            if metric.key.startswith("system/"):
                continue
            if metric.step == step:
                metrics[metric.key] = metric.value
            elif metric.step > step:  # exporting an older tag: look the step up
                at_step = [m.value for m in client.get_metric_history(run_id, metric.key) if m.step == step]
                if at_step:
                    metrics[metric.key] = at_step[-1]
        return dict(sorted(metrics.items()))
    except Exception as error:  # the export must not depend on the tracking server being up
        logger.warning("final metrics not recorded: MLflow run %s unreadable (%s)", run_id, error)
        return {}


def _tokenizer_identity(config: Any) -> dict[str, Any] | None:
    """The identity a shard manifest records; None when the tokenizer weights are not at hand."""
    section = config.tokenizer
    if section.checkpoint is None:
        logger.warning("the run's config names no tokenizer.checkpoint: config.json records no tokenizer identity")
        return None
    if not Path(section.checkpoint).is_file():
        logger.warning("tokenizer checkpoint %s not found: config.json records no tokenizer identity", section.checkpoint)
        return None
    from mvar_dist.trainer import build_tokenizer

    return build_tokenizer(config, torch.device("cpu")).identity()


def export_metadata(run_dir: Path, tag: str, dtype: str) -> dict[str, Any]:
    """config.json content: the model, tokenizer, sampling settings and training summary."""
    from mvar_dist.config import config_from_dict
    from mvar_dist.engine import RUN_STATE_FILE
    from mvar_dist.trainer import CHECKPOINT_SUBDIR

    state_file = run_dir / CHECKPOINT_SUBDIR / tag / RUN_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {tag} is not a complete mvar-dist checkpoint")
    run_state = json.loads(state_file.read_text())
    config = config_from_dict(run_state["config"])  # the config the weights were trained with
    step = int(run_state["step"])
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
            "run_dir": str(run_dir.resolve()),
            "checkpoint_tag": tag,
            "steps": step,
            "images_seen": step * config.train.global_batch_size,
            "world_size": run_state.get("world_size"),
            "config_hash": run_state.get("config_hash"),
            "mlflow_run_id": run_state.get("mlflow_run_id"),
            "final_metrics": _final_metrics(run_dir, run_state.get("mlflow_run_id"), step),
        },
    }


# ----- the released key layout -----


def derived_buffers(model_config: Any) -> dict[str, torch.Tensor]:
    """The buffers VAR/MVAR register at construction (not learned), as the released code builds them."""
    layout = model_config.layout
    scale_of = layout.scale_ids
    if model_config.mode == "mvar":  # each token sees its own scale (token 0: itself)
        allowed = scale_of[:, None] == scale_of[None, :]
    else:  # VAR: block-causal over scales
        allowed = scale_of[None, :] <= scale_of[:, None]
    bias = torch.zeros(layout.num_tokens, layout.num_tokens).masked_fill_(~allowed, float("-inf"))
    return {"lvl_1L": scale_of[None, :].clone(), "attn_bias_for_masking": bias[None, None]}


def official_state_dict(state: dict[str, torch.Tensor], model_config: Any) -> dict[str, torch.Tensor]:
    """Our state dict with the released derived buffers inserted where the paper's modules have them."""
    buffers = derived_buffers(model_config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[key] = value
        if key == "pos_1LC":
            out.update(buffers)
        elif key.endswith(".attn.v_bias"):  # SelfAttention registers zero_k_bias after v_bias
            out[key.removesuffix("v_bias") + "zero_k_bias"] = torch.zeros_like(value)
    return out


# ----- writing -----


def _match_model(state: dict[str, torch.Tensor], model_config: Any, source: str) -> dict[str, torch.Tensor]:
    """``state`` in the model's own key order (DeepSpeed returns optimizer-group order), after
    checking that every key and shape matches the model config."""
    from mvar_dist.model import MVAR

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
    from safetensors.torch import save_file

    from mvar_dist.model import MVARConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if fmt not in ("safetensors", "official"):
        raise ValueError(f"format must be 'safetensors' or 'official', got {fmt!r}")
    from mvar_dist.trainer import CHECKPOINT_SUBDIR

    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / CHECKPOINT_SUBDIR
    tag = resolve_tag(checkpoint_dir, tag)
    metadata = export_metadata(run_dir, tag, dtype)
    model_config = MVARConfig.from_dict(metadata["model"])
    state = consolidate(checkpoint_dir, tag)
    state = _match_model(state, model_config, f"{checkpoint_dir / tag}")
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
    metadata["weights"] = weights.name
    # config.json last: its presence marks a complete export
    write_json(out_dir / CONFIG_FILE, metadata, indent=2)
    logger.info("exported %s (%s, %s) to %s", checkpoint_dir / tag, fmt, dtype, weights)
    return weights


def log_export_to_mlflow(run_dir: Path, out_dir: Path) -> str:
    """Attach the exported directory to the run's MLflow run under ``model/<tag>``."""
    from mlflow.tracking import MlflowClient

    from mvar_dist.tracking import read_run_record

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


# ----- reading an export -----


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """An :class:`~mvar_dist.model.MVAR` in eval mode from an ``mvar-dist export`` directory."""
    from mvar_dist.model import MVAR, MVARConfig

    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {directory} is not an mvar-dist export (or is incomplete)")
    metadata = json.loads(config_file.read_text())
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: format {metadata.get('format')!r} is not {EXPORT_FORMAT!r}")
    weights = directory / metadata["weights"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights), device=str(device))
    else:
        state = torch.load(weights, map_location=device, weights_only=True)
    model_config = MVARConfig.from_dict(metadata["model"])
    with torch.device("meta"):
        model = MVAR(model_config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # derived buffers of .pth files are dropped
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{weights} left tensors uninitialised: {left_on_meta[:5]}")
    return model.eval()


# ----- command line -----


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist export",
        description="Consolidate a run's DeepSpeed ZeRO checkpoint into a self-contained model directory.",
    )
    parser.add_argument("run_dir", type=Path, help="run directory (holds checkpoints/ and config.yaml)")
    parser.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step_00001000 (default: latest)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "official"), default="safetensors")
    parser.add_argument("--log-to-mlflow", action="store_true", help="also attach the export to the run's MLflow run")
    args = parser.parse_args(argv)
    try:
        weights = export_run(args.run_dir, args.out, args.tag, args.dtype, args.fmt)
        artifact = log_export_to_mlflow(args.run_dir, args.out) if args.log_to_mlflow else None
    except (FileNotFoundError, ValueError) as error:
        print(f"mvar-dist export: {error}", file=sys.stderr)
        return 1
    summary = json.loads((args.out / CONFIG_FILE).read_text())["training"]
    print(f"exported step {summary['steps']} ({summary['checkpoint_tag']}) to {weights}")
    if artifact:
        print(f"logged to MLflow run {summary['mlflow_run_id']} at {artifact}")
    return 0
