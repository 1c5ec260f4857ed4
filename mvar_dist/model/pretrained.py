"""The directory ``mvar-dist export`` writes, read back: ``config.json`` (model config, tokenizer
identity, sampling settings, training summary) beside ``model.safetensors`` or a released-layout
``.pth``. Only what :meth:`mvar_dist.model.MVAR.from_pretrained` and ``mvar-dist sample`` need;
the writer is :mod:`mvar_dist.training.export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mvar_dist.state_files import load_state_dict_file, verify_file_sha256

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
EXPORT_FORMAT = "mvar-dist-export/1"


def read_export_metadata(directory: str | Path) -> dict[str, Any]:
    """config.json of an export, after checking that it is one (and complete: it is written last)."""
    config_file = Path(directory) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {directory} is not an mvar-dist export (or is incomplete)")
    metadata = json.loads(config_file.read_text())
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: format {metadata.get('format')!r} is not {EXPORT_FORMAT!r}")
    return metadata


def verify_weights(weights: Path, expected: str | None, config_file: Path) -> None:
    """ValueError unless ``weights`` has the sha256 ``config.json`` recorded (exports written before
    checksums were recorded have none: nothing to check)."""
    if expected is not None:
        verify_file_sha256(weights, expected, config_file)


def read_export_weights(directory: str | Path, device: str | torch.device = "cpu",
                        verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(model config dict, state dict, weights path) of an export directory; ``verify`` checks the
    weights against the sha256 ``config.json`` records."""
    metadata = read_export_metadata(directory)
    weights = Path(directory) / metadata["weights"]
    if verify:
        verify_weights(weights, metadata.get("weights_sha256"), Path(directory) / CONFIG_FILE)
    return metadata["model"], load_state_dict_file(weights, device, what="exported weights"), weights
