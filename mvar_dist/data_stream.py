"""The loader's machinery: which samples each rank reads (windows), and reading one window.

A *window* is a contiguous range of a rank's sample sequence, read by one DataLoader worker and
returned whole; worker ``w`` of ``W`` reads windows ``w, w + W, ...``, and torch's DataLoader
hands worker outputs back round-robin, so the main process receives windows in order whatever
``W`` is. The order of samples therefore depends on (seed, epoch, rank, world size, batch size,
shuffle window), never on the number of workers or their timing.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mvar_dist.data_prep.sample_format import CLS_FIELD, CODES_DTYPE, CODES_FIELD, NUM_VIEWS, decode_label
from mvar_dist.data_prep.tar_reader import ShardReadError, iter_samples, read_canonical

logger = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """A shard or sample is unreadable and the policy is ``fail`` (or too much data is bad)."""


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

    @property
    def size(self) -> int:
        return sum(c.stop - c.start for c in self.chunks)


@dataclass
class WindowData:
    codes: torch.Tensor  # (K, L) int16 (int32 if V > 2**15), the chosen view of each sample
    labels: torch.Tensor  # (K,) int64
    valid: torch.Tensor  # (K,) bool; False for bad samples (validation keeps their slot)
    num_bad: int
    bad_shards: dict[str, str]  # shard name -> first reason seen


def _chunks(counts: np.ndarray, order: np.ndarray, begin: int, end: int) -> tuple[Chunk, ...]:
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
        return Window(epoch, index, _chunks(np.asarray(self.counts), self.shard_order(epoch), begin, end), shuffle=True)


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
        return Window(0, number, _chunks(np.asarray(self.counts), order, start, min(end, start + self.window_size)), shuffle=False)


@dataclass(frozen=True)
class WindowReader:
    """Reads windows from shards; picklable, so it travels to DataLoader workers."""

    shard_urls: tuple[str, ...]
    num_tokens: int
    vocab_size: int
    num_classes: int
    seed: int
    rank: int
    hflip: bool
    bad_data: Literal["skip", "fail"]

    def _bad(self, shard: int, key: str, reason: str, bad: dict[str, str]) -> None:
        name = self.shard_urls[shard]
        if self.bad_data == "fail":
            raise BadDataError(f"bad data in shard {name}, sample {key}: {reason} (set data.bad_data='skip' to skip it)")
        bad.setdefault(name, f"sample {key}: {reason}")

    def _read_chunk(self, chunk: Chunk, bad: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes (m, 2, L) uint16, labels (m,), valid (m,)) of the chunk's m samples."""
        import webdataset  # opener for paths, file:, pipe:, http(s):, ... URLs

        expected = NUM_VIEWS * self.num_tokens * CODES_DTYPE.itemsize
        size = chunk.stop - chunk.start
        codes = np.zeros((size, expected), dtype=np.uint8)
        labels = np.zeros(size, dtype=np.int64)
        valid = np.zeros(size, dtype=bool)
        keys: dict[int, str] = {}
        try:
            with webdataset.gopen(self.shard_urls[chunk.shard], "rb") as stream:
                data = stream.read()
        except OSError as error:
            self._bad(chunk.shard, "#0", f"cannot read shard: {error}", bad)
            return codes.view(CODES_DTYPE).reshape(size, NUM_VIEWS, -1), labels, valid
        fast = read_canonical(data, expected)
        if fast is not None:
            rows = slice(chunk.start, min(chunk.stop, len(fast.labels)))
            count = max(0, rows.stop - rows.start)
            codes[:count], labels[:count], valid[:count] = fast.codes[rows], fast.labels[rows], True
            key_of = lambda i: fast.key(chunk.start + i)  # noqa: E731
            read = len(fast.labels)
        else:
            read = self._read_slow(chunk, data, expected, codes, labels, valid, keys, bad)
            key_of = lambda i: keys.get(i, f"#{chunk.start + i}")  # noqa: E731
        if read < chunk.stop:
            self._bad(chunk.shard, f"#{read}", f"shard has {read} readable samples, the manifest more", bad)
        out_of_range = valid & ~(labels < self.num_classes)
        codes = codes.view(CODES_DTYPE).reshape(size, NUM_VIEWS, -1)
        high = codes.reshape(size, -1).max(axis=1) if size else np.zeros(0, dtype=np.int64)
        for row in np.flatnonzero(out_of_range | (valid & (high >= self.vocab_size))):
            if out_of_range[row]:
                problem = f"class {labels[row]} >= {self.num_classes}"
            else:
                problem = f"code {int(high[row])} >= vocab_size {self.vocab_size}"
            self._bad(chunk.shard, key_of(row), problem, bad)
            valid[row] = False
        labels[~valid] = 0
        return codes, labels, valid

    def _read_slow(self, chunk: Chunk, data: bytes, expected: int, codes: np.ndarray, labels: np.ndarray,
                   valid: np.ndarray, keys: dict[int, str], bad: dict[str, str]) -> int:
        """The general tar reader, for shards not in the canonical layout; returns samples read."""
        position = 0
        try:
            for sample in iter_samples(io.BytesIO(data)):
                if position >= chunk.stop:
                    break
                if position >= chunk.start:
                    row = position - chunk.start
                    keys[row] = sample.key
                    raw, label, problem = sample.fields.get(CODES_FIELD), sample.fields.get(CLS_FIELD), None
                    if raw is None or label is None:
                        problem = f"missing field(s) {[f for f in (CLS_FIELD, CODES_FIELD) if f not in sample.fields]}"
                    elif len(raw) != expected:
                        problem = f"codes have {len(raw)} bytes, expected {expected} (2 x {self.num_tokens} uint16)"
                    else:
                        try:
                            labels[row] = decode_label(label, self.num_classes)
                            codes[row], valid[row] = np.frombuffer(raw, np.uint8), True
                        except ValueError as error:
                            problem = str(error)
                    if problem:
                        self._bad(chunk.shard, sample.key, problem, bad)
                position += 1
        except ShardReadError as error:
            self._bad(chunk.shard, f"#{position}", f"shard unreadable from sample {position} on: {error}", bad)
        return position

    def read(self, window: Window) -> WindowData:
        bad: dict[str, str] = {}
        parts = [self._read_chunk(chunk, bad) for chunk in window.chunks]
        if parts:
            stacked, label_array, valid = (np.concatenate(p) for p in zip(*parts))
        else:
            stacked = np.zeros((0, NUM_VIEWS, self.num_tokens), CODES_DTYPE)
            label_array, valid = np.zeros(0, np.int64), np.zeros(0, bool)
        num_bad, size = int((~valid).sum()), len(valid)
        if window.shuffle:
            rng = np.random.default_rng([self.seed, window.epoch, self.rank, window.index])
            good = np.flatnonzero(valid)
            if good.size == 0:
                raise BadDataError(f"every sample of a training window is bad (shards {sorted(bad)})")
            # bad slots take random good samples of the same window: the window keeps its size,
            # so every rank keeps the same number of batches
            source = np.arange(size)
            source[~valid] = rng.choice(good, size=num_bad)
            source = source[rng.permutation(size)]
            views = rng.integers(0, 2, size=size) if self.hflip else np.zeros(size, dtype=np.int64)
            selected, label_array, valid = stacked[source, views], label_array[source], np.ones(size, dtype=bool)
        else:
            selected = stacked[:, 0]
        # int16 halves the bytes sent from workers; the main process widens each batch to long
        wire = np.int16 if self.vocab_size <= 2**15 else np.int32
        return WindowData(
            torch.from_numpy(selected.astype(wire)), torch.from_numpy(label_array), torch.from_numpy(valid), num_bad, bad
        )


class WindowStream(IterableDataset):
    """Windows ``first, first + 1, ...`` of a plan, dealt round-robin to DataLoader workers."""

    def __init__(self, plan: TrainPlan | ValPlan, reader: WindowReader, first: int) -> None:
        self.plan, self.reader, self.first = plan, reader, first

    def __iter__(self) -> Iterator[WindowData]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = self.first + worker
        while (window := self.plan.window(number)) is not None:
            yield self.reader.read(window)
            number += workers
