"""Inception features of many images, split over ranks.

Images are cut into fixed batches (batch ``b`` is images ``b*B .. b*B+B-1``) and rank ``r`` of
``W`` takes the batches with ``b % W == r``: every batch is computed the same way whatever the
number of ranks, so the features (and the metrics) do not depend on it. Each finished batch is
written as a part file (atomically) into a work folder shared by the ranks; a rerun after a
preemption skips the parts that exist. The ranks then meet once (a barrier) and the caller
reads the parts back in order (:func:`read_parts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mvar_dist.atomic import write_via_temp

logger = logging.getLogger(__name__)

FEATURE_KEYS = ("pool", "spatial", "probabilities")


@dataclass(frozen=True)
class Features:
    """Per-image Inception outputs, float32, in image order."""

    pool: np.ndarray  # (N, 2048)
    spatial: np.ndarray  # (N, 2023)
    probabilities: np.ndarray  # (N, 1008)

    def __len__(self) -> int:
        return len(self.pool)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that share the work."""

    rank: int = 0
    world_size: int = 1

    def batches(self, total: int) -> range:
        return range(self.rank, total, self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()


def part_path(work_dir: Path, name: str, index: int) -> Path:
    return work_dir / f"{name}_{index:06d}.npz"


def save_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    write_via_temp(path, write)


@torch.no_grad()
def batch_features(network: torch.nn.Module, images: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """The network's outputs for one uint8 (b, H, W, 3) batch, as float32 numpy arrays."""
    outputs = network(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    return {key: getattr(outputs, key).float().cpu().numpy() for key in FEATURE_KEYS}


def extract_parts(
    network: torch.nn.Module, num_images: int, batch_size: int, load: Callable[[int, int], np.ndarray],
    work_dir: Path, name: str, ranks: Ranks, device: torch.device, progress: bool = True,
) -> int:
    """Write this rank's feature parts of images ``load(begin, end)``; returns the number of
    batches (all ranks). Existing parts are kept: they were written whole."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"the feature batch size must be >= 1, got {batch_size}")
    total = -(-num_images // batch_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    mine = [b for b in ranks.batches(total) if not part_path(work_dir, name, b).exists()]
    with tqdm(total=len(mine), unit="batch", desc=f"features {name}", disable=not progress or ranks.rank != 0) as bar:
        for index in mine:
            begin = index * batch_size
            images = np.asarray(load(begin, min(begin + batch_size, num_images)))
            save_part(part_path(work_dir, name, index), batch_features(network, images, device))
            bar.update(1)
    return total


def read_parts(work_dir: Path, name: str, total: int, keys: tuple[str, ...] = FEATURE_KEYS) -> dict[str, np.ndarray]:
    """The parts ``0 .. total-1`` of ``name`` concatenated in order; FileNotFoundError naming
    the first missing part (a rank that failed)."""
    collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for index in range(total):
        path = part_path(work_dir, name, index)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the rank that owns batch {index} did not finish")
        with np.load(path, allow_pickle=False) as part:
            for key in keys:
                collected[key].append(part[key])
    return {key: np.concatenate(values) for key, values in collected.items()}


def features_of(parts: dict[str, np.ndarray]) -> Features:
    return Features(*(parts[key] for key in FEATURE_KEYS))
