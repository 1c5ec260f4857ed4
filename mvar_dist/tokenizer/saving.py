"""A tokenizer as one ``.safetensors`` file: its weights, and its architecture as JSON in the
file's metadata, so that loading needs no other argument."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mvar_dist.atomic import write_via_temp


def save_with_config(module: nn.Module, path: str | Path, key: str, config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save the tokenizer to a .safetensors path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_via_temp(path, lambda tmp: save_file(tensors, str(tmp), metadata={key: json.dumps(config)}))
    return path


def read_saved_config(path: str | Path, key: str) -> dict[str, Any] | None:
    """The architecture :func:`save_with_config` recorded under ``key``; None for other files."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata[key]) if key in metadata else None
