"""How one optimizer step's global batch is split over a cluster: images per rank per forward
pass (the micro batch) x ranks x gradient-accumulation passes.

The global batch is the recipe (it sets the learning rate and the result); the micro batch is a
property of the cluster. ``micro_batch_size: auto`` derives it for whatever world size the job
has: the largest per-rank batch not above ``max_micro_batch_size`` (what one GPU holds) that
divides the rank's share of the global batch, with accumulation for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvar_dist.config.loading import ConfigError

AUTO = "auto"
MicroBatch = int | Literal["auto"]
# how many alternatives an error message lists on each side of the requested world size
_NEAREST = 3


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int

    def describe(self) -> str:
        return (f"micro batch {self.micro_batch} x {self.world_size} ranks x {self.accumulation} "
                f"accumulation = global batch {self.global_batch}")


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def split_for(global_batch: int, world_size: int, micro_batch: MicroBatch, max_micro_batch: int | None) -> BatchSplit | None:
    """The split, or None when ``world_size`` ranks cannot share the global batch this way."""
    if global_batch % world_size:
        return None
    per_rank = global_batch // world_size
    if micro_batch == AUTO:
        micro = _largest_divisor_at_most(per_rank, max_micro_batch or per_rank)
    elif per_rank % micro_batch:
        return None
    else:
        micro = micro_batch
    return BatchSplit(global_batch, world_size, micro, per_rank // micro)


def resolve_batch_split(global_batch: int, micro_batch: MicroBatch, world_size: int, max_micro_batch: int | None = None,
                        section: str = "train") -> BatchSplit:
    """The split of ``global_batch`` over ``world_size`` ranks; ConfigError listing the world sizes
    and micro batches that work when there is none (changing the global batch comes last: it
    changes the recipe)."""
    split = split_for(global_batch, world_size, micro_batch, max_micro_batch)
    if split is not None:
        return split
    if micro_batch != AUTO and global_batch % world_size == 0:
        per_rank = global_batch // world_size
        fits = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= micro_batch]
        raise ConfigError(
            f"{section}.micro_batch_size={micro_batch} does not divide the {per_rank} images each of "
            f"{world_size} ranks takes of {section}.global_batch_size={global_batch}; use "
            f"{section}.micro_batch_size=auto, or one of {fits[-_NEAREST:]} (with "
            f"{[per_rank // d for d in fits[-_NEAREST:]]} accumulation passes)"
        )
    options = _nearest_world_sizes(global_batch, world_size, micro_batch, max_micro_batch)
    listed = "; ".join(f"{s.world_size} ranks: {s.micro_batch} x {s.accumulation} accumulation" for s in options)
    raise ConfigError(
        f"{section}.global_batch_size={global_batch} cannot be split over {world_size} ranks"
        + (f" with {section}.micro_batch_size={micro_batch}" if micro_batch != AUTO else "")
        + f" ({global_batch} is not a multiple of {world_size}"
        + (f" x {micro_batch}" if micro_batch != AUTO else "") + "). "
        + (f"World sizes near {world_size} that work: {listed}" if listed else "No world size works")
        + (f"; with {section}.micro_batch_size=auto any world size dividing {global_batch} works"
           if micro_batch != AUTO else "")
        + f". Only if none of these suits the cluster, change {section}.global_batch_size (and with it the lr)."
    )


def _nearest_world_sizes(global_batch: int, world_size: int, micro_batch: MicroBatch,
                         max_micro_batch: int | None) -> list[BatchSplit]:
    below = [s for w in range(world_size - 1, 0, -1)
             if (s := split_for(global_batch, w, micro_batch, max_micro_batch)) is not None][:_NEAREST]
    above = [s for w in range(world_size + 1, global_batch + 1)
             if (s := split_for(global_batch, w, micro_batch, max_micro_batch)) is not None][:_NEAREST]
    return sorted(below + above, key=lambda s: s.world_size)


def check_micro_batch(section: str, micro_batch: object, max_micro_batch: object) -> None:
    """Field checks of ``micro_batch_size`` / ``max_micro_batch_size`` of a train section."""
    if micro_batch != AUTO and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1):
        raise ConfigError(f"{section}.micro_batch_size must be an integer >= 1 or 'auto', got {micro_batch!r}")
    if max_micro_batch is not None and (not isinstance(max_micro_batch, int) or max_micro_batch < 1):
        raise ConfigError(f"{section}.max_micro_batch_size must be an integer >= 1 or null, got {max_micro_batch!r}")
