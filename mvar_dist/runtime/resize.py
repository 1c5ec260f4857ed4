"""Resuming a checkpoint on another number of ranks, through DeepSpeed's universal checkpoints.

ZeRO partitions the optimizer state (and at stage 3 the weights) by rank, and DeepSpeed refuses
to load a partitioned checkpoint into another world size. Its public route is the universal
checkpoint: ``python -m deepspeed.checkpoint.ds_to_universal`` rewrites a tag as one file per
parameter (fp32 weights, Adam moments, step) and an engine configured with
``checkpoint.load_universal`` loads that on any world size, ZeRO 1, 2 or 3, fp32 or bf16. The
converter needs ``universal_checkpoint_info`` in the saved client state, which every checkpoint
this code writes carries (:func:`universal_info`); checkpoints written before it resume on
their own world size only.

Rank 0 converts each engine's part of the tag into ``checkpoints/universal/<tag>`` (the other
ranks wait), every rank loads from there, and rank 0 removes it once all have loaded: the run's
own checkpoints are never modified.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mvar_dist.run_dir import RunDir

logger = logging.getLogger(__name__)


def universal_info() -> dict[str, Any]:
    """The client state the converter requires (no tensor-parallel patterns: we have none)."""
    from deepspeed.checkpoint import constants

    return {constants.UNIVERSAL_CHECKPOINT_INFO: {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def universal_root(run_dir: RunDir) -> Path:
    return run_dir.checkpoints / "universal"


def convert_to_universal(source: Path, target: Path) -> None:
    """Rewrite one engine's checkpoint directory ``source`` as a universal checkpoint ``target``."""
    if target.exists():  # a conversion a killed job left half done
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    logger.info("converting %s to a universal checkpoint for a new world size", source)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"converting {source} to DeepSpeed's universal layout failed (exit {result.returncode}): "
            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no message'}"
        )


def prepare_universal(run_dir: RunDir, tag: str, others: list[str]) -> Path:
    """Rank 0: the universal copy of ``tag`` (the main engine at its top, each of ``others`` in a
    sub-directory of that name, as in the tag itself); returns the directory holding it."""
    root = universal_root(run_dir)
    source = run_dir.tag_dir(tag)
    if others:  # the converter counts model-state files recursively: show it the main engine's only
        staging = root / f".{tag}.main"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in source.iterdir():
            if path.is_file():
                (staging / path.name).symlink_to(path.resolve())
        source = staging
    convert_to_universal(source, root / tag)
    for name in others:
        convert_to_universal(run_dir.tag_dir(tag) / name, root / tag / name)
    return root


def remove_universal(run_dir: RunDir) -> None:
    shutil.rmtree(universal_root(run_dir), ignore_errors=True)
