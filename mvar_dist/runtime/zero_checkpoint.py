"""The fp32 weights of a DeepSpeed ZeRO 1/2/3 checkpoint tag, merged from every rank's partition
on CPU without torch.distributed (exports of both kinds of run read them), after the tag's files
were inspected for pickles that would run code."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch

from mvar_dist.runtime.safe_loading import inspect_files, weights_only_loading

logger = logging.getLogger(__name__)

# Wrappers that prefix parameter names: DeepSpeed/DDP, torch.compile, activation checkpointing.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "_checkpoint_wrapped_module.")


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

    problem = inspect_files(tag_dir)  # raises for a file that would run code when unpickled
    if problem is not None:
        raise ValueError(f"{tag_dir} is damaged: {problem}")
    chatter = io.StringIO()  # zero_to_fp32 prints its progress
    with contextlib.redirect_stdout(chatter), weights_only_loading():
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    logger.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    return strip_wrapper_prefixes({k: v.detach().cpu() for k, v in state.items()})
