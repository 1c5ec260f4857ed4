"""Which samples each rank reads, as a sequence of *windows*: contiguous ranges of the rank's
sample sequence, each read whole by one DataLoader worker.

Worker ``w`` of ``W`` reads windows ``w, w + W, ...`` and torch's DataLoader hands worker
outputs back round-robin, so the main process receives windows in order whatever ``W`` is. The
order of samples therefore depends on (seed, epoch, rank, world size, batch size, shuffle
window), never on the number of workers or their timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Chunk:
    shard: int
    start: int  # sample positions inside the shard, [start, stop)
    stop: int


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int  # within the rank's epoch
    chunks: tuple[Chunk, ...]
    shuffle: bool  # train: permute samples and pick a random view; validation: neither
    stream: int | None = None  # keys the window's RNG: the canonical stream, else (None) the rank

    @property
    def size(self) -> int:
        return sum(c.stop - c.start for c in self.chunks)


def chunks_of(counts: np.ndarray, order: np.ndarray, begin: int, end: int) -> tuple[Chunk, ...]:
    """Sample range [begin, end) of the sequence 'shards in ``order``, each in stored order'."""
    ends = np.cumsum(counts[order])
    chunks, position = [], begin
    slot = int(np.searchsorted(ends, position, side="right"))
    while position < end:
        shard_begin = int(ends[slot] - counts[order[slot]])
        stop = min(end, int(ends[slot]))
        if stop > position:  # shards with no samples give no chunk
            chunks.append(Chunk(int(order[slot]), position - shard_begin, stop - shard_begin))
        position, slot = stop, slot + 1
    return tuple(chunks)


@dataclass(frozen=True)
class TrainPlan:
    """Epoch e: shards in a seeded random order form one sequence of N samples; rank r takes the
    r-th of ``world_size`` equal contiguous pieces (N // world_size samples), keeps the first
    ``batches_per_epoch * batch_size`` of them and cuts them into windows of ``window_size``
    samples, each shuffled on its own. Every rank gets the same number of batches."""

    counts: tuple[int, ...]
    seed: int
    rank: int
    world_size: int
    batch_size: int
    window_size: int  # a multiple of batch_size

    @property
    def piece_size(self) -> int:
        return sum(self.counts) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.piece_size // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.samples_per_epoch // self.window_size)

    @lru_cache(maxsize=4)
    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def window(self, number: int) -> Window | None:
        """Window ``number`` of the rank's endless sequence (epoch-major)."""
        epoch, index = divmod(number, self.windows_per_epoch)
        begin = self.rank * self.piece_size + index * self.window_size
        end = self.rank * self.piece_size + min(self.samples_per_epoch, (index + 1) * self.window_size)
        return Window(epoch, index, chunks_of(np.asarray(self.counts), self.shard_order(epoch), begin, end), shuffle=True)


@dataclass(frozen=True)
class ValPlan:
    """Shards in manifest order, split into ``world_size`` contiguous pieces whose sizes differ
    by at most one sample; no shuffling, view 0 (no flip)."""

    counts: tuple[int, ...]
    rank: int
    world_size: int
    window_size: int

    def bounds(self, rank: int) -> tuple[int, int]:
        total = sum(self.counts)
        return rank * total // self.world_size, (rank + 1) * total // self.world_size

    @property
    def max_piece_size(self) -> int:
        return max(end - begin for begin, end in map(self.bounds, range(self.world_size)))

    def window(self, number: int) -> Window | None:
        begin, end = self.bounds(self.rank)
        start = begin + number * self.window_size
        if start >= end:
            return None
        order = np.arange(len(self.counts))
        return Window(0, number, chunks_of(np.asarray(self.counts), order, start, min(end, start + self.window_size)), shuffle=False)
