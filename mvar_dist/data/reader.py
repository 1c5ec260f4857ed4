"""Reading one window of samples from the shards (in a DataLoader worker): the fast canonical
path or the general tar reader, bad samples replaced or masked, the flip view chosen, samples
shuffled. Which windows exist is :mod:`mvar_dist.data.plan`.

A shard that cannot be opened or read (an OSError: a network file system's hiccup, an object
store's failed request, a ``pipe:`` command's non-zero exit) is tried again after each delay of
``READ_RETRY_DELAYS_S`` before its samples count as bad. A shard that reads but does not parse is
bad at once: reading it again gives the same bytes.

A training window whose samples are all bad (under ``bad_data: skip``) is filled like any other
window's bad slots, with random samples, here from the next window of the plan that has readable
ones (read again when that window's turn comes): the window keeps its size, so every rank still
yields the same number of batches per epoch and stays in step with the others, its bad samples
count towards ``max_bad_fraction`` as usual, and the result depends only on the plan and the
shards, so resuming inside such a window is exact.
"""

from __future__ import annotations

import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mvar_dist.data.plan import Chunk, TrainPlan, ValPlan, Window
from mvar_dist.data.streams import StreamPlan
from mvar_dist.shards import read_errors
from mvar_dist.shards.format import (
    CLS_FIELD,
    CODES_DTYPE,
    CODES_FIELD,
    NUM_VIEWS,
    decode_label,
)
from mvar_dist.shards.read_errors import BadDataError
from mvar_dist.shards.tar_reader import CanonicalShard, ShardReadError, iter_samples, read_canonical

logger = logging.getLogger(__name__)

@dataclass
class WindowData:
    codes: torch.Tensor  # (K, L) int16 (int32 if V > 2**15), the chosen view of each sample
    labels: torch.Tensor  # (K,) int64
    valid: torch.Tensor  # (K,) bool; False for bad samples (validation keeps their slot)
    num_bad: int
    bad_shards: dict[str, str]  # shard name -> first reason seen
    ids: torch.Tensor | None = None  # (K,) int64 sample ids, shard index << 32 | position in the shard
    bytes_read: int = 0  # bytes this window fetched from storage (shards already held were not read again)


def sample_ids(window: Window) -> np.ndarray:
    """The window's samples in plan order as ids: shard index << 32 | position in the shard."""
    parts = [(chunk.shard << 32) + np.arange(chunk.start, chunk.stop, dtype=np.int64) for chunk in window.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class WindowReader:
    """Reads windows from shards; picklable, so it travels to DataLoader workers.

    The last ``held_shards`` shards read stay in memory: windows are often smaller than a shard
    (a canonical stream's window is ``shuffle_window / streams`` samples), and without them a
    1000-sample shard would come from storage once per window that touches it instead of once.
    """

    shard_urls: tuple[str, ...]
    num_tokens: int
    vocab_size: int
    num_classes: int
    seed: int
    rank: int
    hflip: bool
    bad_data: Literal["skip", "fail"]
    held_shards: int = 2
    # shard index -> its canonical parse, or its bytes; least recently used first
    _held: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)

    def _bad(self, shard: int, key: str, reason: str, bad: dict[str, str]) -> None:
        name = self.shard_urls[shard]
        if self.bad_data == "fail":
            raise BadDataError(f"bad data in shard {name}, sample {key}: {reason} (set data.bad_data='skip' to skip it)")
        bad.setdefault(name, f"sample {key}: {reason}")

    def _read_shard(self, shard: int) -> bytes:
        """The shard's bytes; an OSError is retried after each of read_errors.READ_RETRY_DELAYS_S, then raised
        with the number of tries in its message."""
        import webdataset  # opener for paths, file:, pipe:, http(s):, ... URLs

        url, delays, attempt = self.shard_urls[shard], read_errors.READ_RETRY_DELAYS_S, 0
        while True:
            try:
                with webdataset.gopen(url, "rb") as stream:
                    return stream.read()
            except OSError as error:
                if attempt == len(delays):
                    raise OSError(f"{error} (gave up after {attempt + 1} tries)") from error
                logger.warning("reading shard %s failed (%s); try %d of %d in %.1f s", url, error, attempt + 2,
                               len(delays) + 1, delays[attempt])
                time.sleep(delays[attempt])
                attempt += 1

    def _shard(self, shard: int, expected: int) -> tuple[bytes | None, CanonicalShard | None, int]:
        """(bytes, canonical parse, bytes fetched now) of a shard, from memory if held: the parse of
        a canonical shard (its codes and labels, about half the shard's bytes), else the bytes."""
        if shard in self._held:
            self._held.move_to_end(shard)
            held = self._held[shard]
            return (None, held, 0) if isinstance(held, CanonicalShard) else (held, None, 0)
        data = self._read_shard(shard)
        fast = read_canonical(data, expected)
        if self.held_shards > 0:
            self._held[shard] = fast if fast is not None else data
            while len(self._held) > self.held_shards:
                self._held.popitem(last=False)
        return data, fast, len(data)

    def _read_chunk(self, chunk: Chunk, bad: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(codes (m, 2, L) uint16, labels (m,), valid (m,), bytes fetched) of the chunk's m samples."""
        expected = NUM_VIEWS * self.num_tokens * CODES_DTYPE.itemsize
        size = chunk.stop - chunk.start
        codes = np.zeros((size, expected), dtype=np.uint8)
        labels = np.zeros(size, dtype=np.int64)
        valid = np.zeros(size, dtype=bool)
        keys: dict[int, str] = {}
        try:
            data, fast, fetched = self._shard(chunk.shard, expected)
        except OSError as error:
            self._bad(chunk.shard, "#0", f"cannot read shard: {error}", bad)
            return codes.view(CODES_DTYPE).reshape(size, NUM_VIEWS, -1), labels, valid, 0
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
        return codes, labels, valid, fetched

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

    def _read_samples(self, window: Window, bad: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(codes (K, 2, L), labels (K,), valid (K,), bytes fetched) of the window's samples in plan order."""
        parts = [self._read_chunk(chunk, bad) for chunk in window.chunks]
        if not parts:
            return np.zeros((0, NUM_VIEWS, self.num_tokens), CODES_DTYPE), np.zeros(0, np.int64), np.zeros(0, bool), 0
        codes, labels, valid, fetched = zip(*parts)
        return np.concatenate(codes), np.concatenate(labels), np.concatenate(valid), sum(fetched)

    def _fill_from(self, window: Window, following: Iterable[Window], bad: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes and labels of the good samples of the first of ``following`` that has any: what a
        training window with no readable sample is filled with (see the module docstring)."""
        for candidate in following:
            stacked, labels, valid, _ = self._read_samples(candidate, {})  # its bad shards are reported in its turn
            if valid.any():
                logger.warning(
                    "no readable sample in window %d of epoch %d (shards %s): filled with samples of window %d of epoch %d",
                    window.index, window.epoch, sorted(bad), candidate.index, candidate.epoch,
                )
                return stacked[valid], labels[valid], sample_ids(candidate)[valid]
        raise BadDataError(
            f"no readable sample in window {window.index} of epoch {window.epoch} nor in the windows after it "
            f"(shards {sorted(bad)}); run 'mvar-dist verify-shards'"
        )

    def read(self, window: Window, following: Iterable[Window] = ()) -> WindowData:
        """The window's samples; ``following`` (the plan's next windows, read lazily) fills a
        training window that has no readable sample."""
        bad: dict[str, str] = {}
        stacked, label_array, valid, fetched = self._read_samples(window, bad)
        num_bad, size = int((~valid).sum()), len(valid)
        ids = sample_ids(window)
        if window.shuffle:
            key = self.rank if window.stream is None else window.stream
            rng = np.random.default_rng([self.seed, window.epoch, key, window.index])
            good = np.flatnonzero(valid)
            if good.size == 0 and size:
                fill_codes, fill_labels, fill_ids = self._fill_from(window, following, bad)
                good = np.arange(size, size + len(fill_labels))
                stacked, label_array = np.concatenate([stacked, fill_codes]), np.concatenate([label_array, fill_labels])
                ids = np.concatenate([ids, fill_ids])
            # bad slots take random good samples (of the same window where it has any): the window
            # keeps its size, so every rank keeps the same number of batches
            source = np.arange(size)
            source[~valid] = rng.choice(good, size=num_bad)
            source = source[rng.permutation(size)]
            views = rng.integers(0, 2, size=size) if self.hflip else np.zeros(size, dtype=np.int64)
            selected, label_array, valid = stacked[source, views], label_array[source], np.ones(size, dtype=bool)
            ids = ids[source]
        else:
            selected = stacked[:, 0]
        # int16 halves the bytes sent from workers; the main process widens each batch to long
        wire = np.int16 if self.vocab_size <= 2**15 else np.int32
        return WindowData(
            torch.from_numpy(selected.astype(wire)), torch.from_numpy(label_array), torch.from_numpy(valid), num_bad, bad,
            torch.from_numpy(ids), fetched,
        )


def stack_windows(windows: list[WindowData]) -> WindowData:
    """Equal-sized windows as one (count, window, ...) item: one transfer from a worker, not one
    per window (each shared tensor costs the main process about a millisecond to receive)."""
    bad: dict[str, str] = {}
    for window in windows:
        bad.update({k: v for k, v in window.bad_shards.items() if k not in bad})
    stacked = {name: torch.stack([getattr(w, name) for w in windows]) for name in ("codes", "labels", "valid", "ids")}
    return WindowData(stacked["codes"], stacked["labels"], stacked["valid"], sum(w.num_bad for w in windows), bad,
                      stacked["ids"], sum(w.bytes_read for w in windows))


class StreamBlocks(IterableDataset):
    """For canonical streams: item ``i`` is window index ``first_index + i // workers`` of the
    rank's streams ``[w * s, (w + 1) * s)``, w = ``i % workers``, s = streams per worker, stacked.
    DataLoader deals items to workers in turn, so each worker always reads the same contiguous
    block of streams (neighbouring streams share shards, which the worker then holds), and the
    items of one window index arrive in stream order."""

    def __init__(self, plan: StreamPlan, reader: WindowReader, first_index: int, workers: int) -> None:
        if plan.streams_per_rank % max(1, workers):
            raise ValueError(f"{workers} workers cannot share {plan.streams_per_rank} streams")
        self.plan, self.reader, self.first_index, self.workers = plan, reader, first_index, max(1, workers)

    def __iter__(self) -> Iterator[WindowData]:
        info = get_worker_info()
        worker = info.id if info is not None else 0  # in-process: one block of every stream
        per_worker = self.plan.streams_per_rank // self.workers
        index = self.first_index
        while True:
            first = index * self.plan.streams_per_rank + worker * per_worker
            yield stack_windows([self.reader.read(self.plan.window(n), following(self.plan, n))
                                 for n in range(first, first + per_worker)])
            index += 1


def following(plan: TrainPlan | ValPlan | StreamPlan, number: int) -> Iterator[Window]:
    """The windows after ``number`` of the same stream, up to one epoch's worth (training plans
    are endless): what fills a window with no readable sample."""
    # a stream's next windows are streams_per_rank apart in the rank's sequence
    stride = getattr(plan, "streams_per_rank", 1)
    limit = getattr(plan, "windows_per_epoch", getattr(plan, "windows_per_stream", 0))
    for later in range(number + stride, number + stride * (limit + 1), stride):
        window = plan.window(later)
        if window is None:
            return
        yield window


class WindowStream(IterableDataset):
    """Windows ``first, first + 1, ...`` of a plan, dealt round-robin to DataLoader workers."""

    def __init__(self, plan: TrainPlan | ValPlan, reader: WindowReader, first: int) -> None:
        self.plan, self.reader, self.first = plan, reader, first

    def __iter__(self) -> Iterator[WindowData]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = self.first + worker
        while (window := self.plan.window(number)) is not None:
            yield self.reader.read(window, following(self.plan, number))
            number += workers
