"""Loading checkpoint files without running code from them.

A DeepSpeed checkpoint is a set of pickles; DeepSpeed and ``zero_to_fp32`` read them with
``torch.load(weights_only=False)``, so a run directory received from someone else could execute
anything on resume or export. Here every file is first inspected (``torch`` lists the globals a
pickle would import, without importing them) and refused unless it needs only tensors and the
few DeepSpeed types below; the load itself then runs with torch's weights-only unpickler forced
on (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) and those types allowed, so even a file swapped after the
inspection cannot run code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

# What DeepSpeed's ZeRO 1-3 checkpoints pickle besides tensors and builtins (found by listing
# the globals of bf16/fp16/fp32 checkpoints of every stage).
ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would import something other than tensors and the allowed types."""


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint file (truncated, not a zip...), or None."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # the zip or the pickle is broken: a damaged file, not an attack
        return f"{path.name} is unreadable ({type(error).__name__}: {error})"
    disallowed = sorted(set(unsafe) - set(ALLOWED_GLOBALS))
    if disallowed:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it would import {disallowed}, which a checkpoint written "
            f"by mvar-dist never contains; only tensors and {list(ALLOWED_GLOBALS)} are loaded. Do not resume "
            f"or export a run directory from a source you do not trust"
        )
    return None


def _allowed_types() -> list[type]:
    import importlib

    types = []
    for dotted in ALLOWED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:  # an older or newer DeepSpeed may lack one: nothing to allow then
            types.append(found)
    return types


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Inside: every ``torch.load`` of this process uses the weights-only unpickler, whatever its
    caller asks, with :data:`ALLOWED_GLOBALS` allowed."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def inspect_files(directory: Path) -> str | None:
    """Check every ``*.pt`` file of a checkpoint tag (sub-directories included): the first damage
    found, or None; raises :class:`UnsafeCheckpointError` for a file that would run code."""
    for path in sorted(directory.rglob("*.pt")):
        reason = unreadable_reason(path)
        if reason is not None:
            return reason
    return None
