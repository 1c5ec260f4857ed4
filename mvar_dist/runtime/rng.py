"""The random generators training draws from (Python, numpy, torch, CUDA): their states for a
checkpoint, restored on resume, or seeded for a fresh run."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every generator training draws from (label drop and drop path use torch's global one)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value
