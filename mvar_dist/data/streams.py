"""Canonical streams: a sample order that does not depend on the number of ranks.

An epoch's sequence (shards in a seeded order, each in stored order) is cut into ``streams``
equal contiguous pieces. Every global batch takes the next ``per_stream`` samples of every
stream (``streams x per_stream = global batch``), so which samples form global step ``t`` is a
function of (seed, epoch, ``t``, global batch, streams) alone. A rank of ``world_size`` reads the
``streams / world_size`` streams assigned to it, contiguous ones, so it still reads only its
share of the shards; each stream is cut into windows of ``window_size`` samples, shuffled (and
its views drawn) by an RNG keyed by the stream, never by the rank. Resuming with another world
size that divides ``streams`` therefore continues with exactly the samples, views and order the
uninterrupted run would have used. Compare :class:`mvar_dist.data.plan.TrainPlan`, the
per-rank layout of runs started before canonical streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mvar_dist.data.plan import Window, chunks_of

# world sizes that a run started on any of these can move to: 1, 2, 4, ... 128 ranks
POWERS_OF_TWO_UP_TO = 128


def auto_streams(global_batch: int, world_size: int) -> int:
    """The default number of streams: every power of two up to 128 that divides the global batch,
    times whatever the starting world size needs, and a divisor of the global batch."""
    return math.gcd(global_batch, math.lcm(POWERS_OF_TWO_UP_TO, world_size))


def world_sizes_for(streams: int, near: int, count: int = 3) -> list[int]:
    """World sizes that divide ``streams``, the ``count`` nearest below and above ``near``."""
    sizes = [w for w in range(1, streams + 1) if streams % w == 0]
    below = [w for w in sizes if w < near][-count:]
    above = [w for w in sizes if w > near][:count]
    return below + above


@dataclass(frozen=True)
class StreamPlan:
    counts: tuple[int, ...]
    seed: int
    streams: int
    per_stream: int  # samples each stream gives every global batch
    window_size: int  # a multiple of per_stream
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.streams % self.world_size:
            raise ValueError(f"{self.world_size} ranks cannot share {self.streams} canonical streams")

    @property
    def stream_size(self) -> int:
        return sum(self.counts) // self.streams

    @property
    def steps_per_epoch(self) -> int:
        return self.stream_size // self.per_stream

    @property
    def stream_samples(self) -> int:
        """Samples of a stream used per epoch (the rest of its piece is skipped that epoch)."""
        return self.steps_per_epoch * self.per_stream

    @property
    def windows_per_stream(self) -> int:
        return -(-self.stream_samples // self.window_size)

    @property
    def streams_per_rank(self) -> int:
        return self.streams // self.world_size

    @property
    def first_stream(self) -> int:
        return self.rank * self.streams_per_rank

    @lru_cache(maxsize=4)
    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def window(self, number: int) -> Window:
        """Window ``number`` of this rank's endless sequence: epoch-major, then window index, then
        the rank's streams in order (so the k windows of one index arrive together)."""
        per_epoch = self.windows_per_stream * self.streams_per_rank
        epoch, rest = divmod(number, per_epoch)
        index, local = divmod(rest, self.streams_per_rank)
        stream = self.first_stream + local
        begin = stream * self.stream_size + index * self.window_size
        end = stream * self.stream_size + min(self.stream_samples, (index + 1) * self.window_size)
        chunks = chunks_of(np.asarray(self.counts), self.shard_order(epoch), begin, end)
        return Window(epoch, index, chunks, shuffle=True, stream=stream)

    def first_window(self, epoch: int, step: int) -> tuple[int, int]:
        """(window number, samples into each stream's window) where global step ``step`` of
        ``epoch`` starts."""
        index, offset = divmod(step * self.per_stream, self.window_size)
        per_epoch = self.windows_per_stream * self.streams_per_rank
        return epoch * per_epoch + index * self.streams_per_rank, offset
