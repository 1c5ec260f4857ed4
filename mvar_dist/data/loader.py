"""Resumable distributed loading of pre-tokenized code shards (written by ``mvar-dist prep``).

Batches are ``(codes, labels)``: codes a flat (B, L) LongTensor of one view of each image (the
image or its horizontal flip, chosen by a seeded RNG), labels (B,). Turning codes into the
transformer's teacher input is the tokenizer's job on the training device
(``tokenizer.codes_to_teacher_input(codes)``), not the loader's: the codes are 16x smaller
than the float input and the conversion is a few cheap convolutions on the GPU.

Guarantees (see :mod:`mvar_dist.data.plan` for the layout):

- Training is an endless stream; every rank yields ``batches_per_epoch`` batches per epoch, the
  same on all ranks. Per epoch, every sample is seen at most once across ranks; the
  ``N mod world_size`` and ``(N // world_size) mod batch_size`` leftover samples of each rank
  are skipped in that epoch (a different random set each epoch).
- The order is a function of (seed, epoch, position, world_size, batch_size, shuffle_window),
  not of num_workers or worker timing. ``state_dict()`` after k batches plus
  ``load_state_dict()`` in a fresh loader continues with exactly batch k+1.
- Resuming with another world size, batch size or shuffle window keeps the epoch and the
  fraction of it already consumed (global samples consumed / new global batch, rounded up);
  within that one epoch the new layout may then repeat or miss samples. Later epochs are exact.
- Validation visits every sample exactly once across ranks and workers; see :class:`ValLoader`.

Bad data (``data.bad_data``): with ``fail`` the first bad sample raises :class:`BadDataError`.
With ``skip``, a bad training sample's slot takes a random good sample of its window, a bad
validation sample is masked; a shard that raises OSError is tried again first (see
:mod:`mvar_dist.data.reader`). A training window with no readable sample at all takes random
samples of the next window that has some, rather than yielding nothing: skipping it would leave
this rank with fewer batches in the epoch than the others, its epoch would end early, and the
ranks would drift apart in their epochs and sample sets. Either way the window's bad samples are
counted, and once they exceed ``max_bad_fraction`` of max(samples read, one epoch) the loader
raises BadDataError naming the shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from mvar_dist.data.config import DataConfig
from mvar_dist.data.plan import TrainPlan, ValPlan
from mvar_dist.data.reader import BadDataError, StreamBlocks, WindowData, WindowReader, WindowStream
from mvar_dist.data.streams import StreamPlan, auto_streams, world_sizes_for
from mvar_dist.shards.manifest import Manifest, load_manifest

logger = logging.getLogger(__name__)


def window_reader(manifest: Manifest, config: DataConfig, rank: int, held_shards: int = 2) -> WindowReader:
    """What one DataLoader worker runs: reads and shuffles windows of ``manifest``'s shards,
    keeping the last ``held_shards`` shards in memory."""
    return WindowReader(
        manifest.shard_urls, int(manifest.num_tokens), int(manifest.vocab_size), int(manifest.num_classes),
        config.seed, rank, config.hflip, config.bad_data, held_shards,
    )


def _widen(codes: torch.Tensor) -> torch.Tensor:
    """int16/int32 -> int64 through numpy: torch's threaded cast is 10-20x slower on a busy CPU."""
    return torch.from_numpy(codes.numpy().astype(np.int64))


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class _Loader:
    """Shared part: a DataLoader over windows, bad-data accounting in the main process."""

    def __init__(self, manifest: Manifest, config: DataConfig, rank: int, world_size: int, batch_size: int) -> None:
        config.validate()
        _check_rank(rank, world_size, batch_size)
        self.manifest, self.config = manifest, config
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_skipped = 0  # bad samples met so far (train: replaced; validation: masked)
        self.num_read = 0
        self.bytes_read = 0  # shard bytes fetched from storage by this loader (not saved in state_dict)
        self.epoch_size = 0  # samples this rank reads per epoch (set by the subclass)
        self._warned: set[str] = set()

    def _windows(self, plan: TrainPlan | ValPlan, first: int) -> Iterator[WindowData]:
        return self._items(WindowStream(plan, window_reader(self.manifest, self.config, self.rank), first),
                           self.config.num_workers)

    def _items(self, dataset: WindowStream | StreamBlocks, workers: int) -> Iterator[WindowData]:
        extra = dict(prefetch_factor=self.config.prefetch_windows) if workers else {}
        return iter(DataLoader(dataset, batch_size=None, num_workers=workers, **extra))

    def _stream_blocks(self, plan: StreamPlan, first_index: int) -> tuple[Iterator[WindowData], int]:
        """(items, items per window index): the stacked windows of blocks of this rank's streams,
        each block always from one worker. Workers take items in turn, so their count must divide
        the rank's streams: a worker count that does not is lowered to their greatest common divisor."""
        workers = self.config.num_workers
        if workers and plan.streams_per_rank % workers:
            fewer = math.gcd(workers, plan.streams_per_rank)
            logger.info("data.num_workers=%d does not divide the %d canonical streams of this rank: using %d worker(s)",
                        workers, plan.streams_per_rank, fewer)
            workers = fewer
        # each worker holds the current shard of each of its streams and the one a window straddles into
        held = plan.streams_per_rank // max(1, workers) + 1
        blocks = StreamBlocks(plan, window_reader(self.manifest, self.config, self.rank, held), first_index, workers)
        return self._items(blocks, workers), max(1, workers)

    def _account(self, window: WindowData) -> None:
        self.num_read += window.labels.numel()  # a window, or a block of stacked windows
        self.bytes_read += window.bytes_read
        self.num_skipped += window.num_bad
        for shard, reason in window.bad_shards.items():
            if shard not in self._warned:
                self._warned.add(shard)
                logger.warning("bad data in shard %s (skipped, counted in num_skipped): %s", shard, reason)
        # against at least one epoch's worth, so that one bad shard early on does not trip it
        if self.num_skipped > self.config.max_bad_fraction * max(self.num_read, self.epoch_size):
            raise BadDataError(
                f"{self.num_skipped} of {self.num_read} samples read were bad, more than data.max_bad_fraction="
                f"{self.config.max_bad_fraction}; bad shards: {sorted(self._warned)} (run 'mvar-dist verify-shards')"
            )


class TrainLoader(_Loader):
    """Endless training batches ``(codes, labels, ids)`` for one rank; iterate it, checkpoint
    ``state_dict()``. With ``global_batch`` (and ``data.canonical_ranks`` not null) the order
    is that of canonical streams (:mod:`mvar_dist.data.streams`): the same samples in every global
    step whatever the world size; without, the per-rank order of :class:`TrainPlan`."""

    def __init__(self, manifest: Manifest, config: DataConfig, rank: int, world_size: int, batch_size: int,
                 global_batch: int | None = None) -> None:
        super().__init__(manifest, config, rank, world_size, batch_size)
        self.global_batch = global_batch
        self.epoch, self.position = 0, 0  # position: samples of this rank's epoch consumed
        if global_batch is not None and config.canonical_ranks is not None:
            streams = auto_streams(global_batch, world_size) if config.canonical_ranks == "auto" else config.canonical_ranks
            self._use_streams(streams)
        else:
            self._use_rank_order(world_size, batch_size)

    def _use_rank_order(self, world_size: int, batch_size: int) -> None:
        window = max(1, self.config.shuffle_window // batch_size) * batch_size
        self.plan: TrainPlan | StreamPlan = TrainPlan(self.manifest.shard_counts, self.config.seed, self.rank,
                                                      world_size, batch_size, window)
        if self.plan.batches_per_epoch == 0:
            raise ValueError(f"{self.manifest.location} has {self.manifest.num_samples} samples: too few for "
                             f"{world_size} ranks x batch {batch_size}")
        self.epoch_size = self.plan.samples_per_epoch

    def _use_streams(self, streams: int) -> None:
        assert self.global_batch is not None
        if self.global_batch % streams or streams % self.world_size:
            raise ValueError(
                f"data.canonical_ranks={streams} must divide the global batch ({self.global_batch}) and be a multiple "
                f"of the world size ({self.world_size}); world sizes that divide it: {world_sizes_for(streams, self.world_size)}"
            )
        per_stream = self.global_batch // streams
        window = max(1, self.config.shuffle_window // (streams * per_stream)) * per_stream
        self.plan = StreamPlan(self.manifest.shard_counts, self.config.seed, streams, per_stream, window,
                               self.rank, self.world_size)
        if self.plan.steps_per_epoch == 0:
            raise ValueError(f"{self.manifest.location} has {self.manifest.num_samples} samples: too few for "
                             f"{streams} streams of {per_stream} per global batch")
        self.epoch_size = self.plan.steps_per_epoch * self.global_batch // self.world_size

    @property
    def per_sample_noise(self) -> bool:
        """Whether the trainer should draw label drop and drop-path per sample (canonical order)."""
        return isinstance(self.plan, StreamPlan)

    @property
    def batches_per_epoch(self) -> int:
        if isinstance(self.plan, StreamPlan):
            return self.plan.steps_per_epoch * self.global_batch // (self.world_size * self.batch_size)
        return self.plan.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if isinstance(self.plan, StreamPlan):
            yield from self._iter_streams(self.plan)
            return
        size, batch = self.plan.window_size, self.batch_size
        first = self.epoch * self.plan.windows_per_epoch + self.position // size
        offset = self.position % size  # resuming inside a window: its bad samples were counted already
        for window in self._windows(self.plan, first):
            if offset == 0:
                self._account(window)
            for start in range(offset, window.codes.shape[0], batch):
                self.position += batch
                if self.position == self.plan.samples_per_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                rows = slice(start, start + batch)
                yield _widen(window.codes[rows]), window.labels[rows], window.ids[rows]
            offset = 0

    def _iter_streams(self, plan: StreamPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each global step: ``per_stream`` samples of each of this rank's streams, in stream order,
        cut into micro batches. ``position`` counts this rank's samples of the epoch."""
        per_rank = plan.per_stream * plan.streams_per_rank
        step, into_step = divmod(self.position, per_rank)
        number, offset = plan.first_window(self.epoch, step)
        blocks, per_index = self._stream_blocks(plan, number // plan.streams_per_rank)
        while True:
            # (streams, window, ...): the blocks of one window index arrive in stream order
            group = [next(blocks) for _ in range(per_index)]
            if offset == 0:
                for block in group:
                    self._account(block)
            all_codes, all_labels, all_ids = (torch.cat([getattr(b, name) for b in group]) for name in ("codes", "labels", "ids"))
            for start in range(offset, all_codes.shape[1], plan.per_stream):
                rows = slice(start, start + plan.per_stream)
                codes = all_codes[:, rows].reshape(-1, all_codes.shape[-1])
                labels, ids = all_labels[:, rows].reshape(-1), all_ids[:, rows].reshape(-1)
                for begin in range(into_step, per_rank, self.batch_size):
                    self.position += self.batch_size
                    if self.position == plan.steps_per_epoch * per_rank:
                        self.epoch, self.position = self.epoch + 1, 0
                    part = slice(begin, begin + self.batch_size)
                    yield _widen(codes[part]), labels[part], ids[part]
                into_step = 0
            offset = 0

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch, "position": self.position, "seed": self.config.seed, "world_size": self.world_size,
            "batch_size": self.batch_size, "window_size": self.plan.window_size, "num_samples": int(self.manifest.num_samples),
            "num_skipped": self.num_skipped, "num_read": self.num_read,
        }
        if isinstance(self.plan, StreamPlan):
            state.update(streams=self.plan.streams, per_stream=self.plan.per_stream)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_samples"] != self.manifest.num_samples or state["seed"] != self.config.seed:
            raise ValueError(
                f"data state is for {state['num_samples']} samples with seed {state['seed']}, the loader has "
                f"{self.manifest.num_samples} samples ({self.manifest.location}) and seed {self.config.seed}"
            )
        self.epoch, self.num_skipped, self.num_read = int(state["epoch"]), int(state["num_skipped"]), int(state["num_read"])
        if "streams" in state:
            self._load_streams(state)
            return
        if isinstance(self.plan, StreamPlan):  # a run started before canonical streams keeps its order
            self._use_rank_order(self.world_size, self.batch_size)
        self._load_rank_order(state)

    def _load_streams(self, state: Mapping[str, Any]) -> None:
        streams, saved_world = int(state["streams"]), int(state["world_size"])
        consumed = int(state["position"]) * saved_world  # samples of the epoch, all ranks together
        if streams % self.world_size == 0 and self.global_batch == streams * int(state["per_stream"]):
            if saved_world != self.world_size and consumed % self.global_batch:
                raise ValueError(f"the data position ({consumed} samples into epoch {self.epoch}) is not at a global "
                                 f"step boundary; resume with {saved_world} ranks")
            self._use_streams(streams)
            self.position = consumed // self.world_size
            return
        if self.config.resize != "approximate":
            raise ValueError(
                f"the run's sample order has {streams} canonical streams, which {self.world_size} ranks cannot share "
                f"exactly; use a world size that divides {streams} (e.g. {world_sizes_for(streams, self.world_size)}), "
                f"or data.resize=approximate to re-split the epoch per rank"
            )
        self._use_rank_order(self.world_size, self.batch_size)
        self._load_rank_order({**state, "position": consumed // saved_world, "world_size": saved_world})

    def _load_rank_order(self, state: Mapping[str, Any]) -> None:
        assert isinstance(self.plan, TrainPlan)
        layout = (self.world_size, self.batch_size, self.plan.window_size)
        if (state["world_size"], state["batch_size"], state.get("window_size", layout[2])) == layout:
            self.position = int(state["position"])
            return
        consumed = int(state["position"]) * int(state["world_size"])  # samples, all ranks together
        global_batch = self.batch_size * self.world_size
        self.position = math.ceil(consumed / global_batch) * self.batch_size
        if self.position >= self.plan.samples_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        logger.warning(
            "data loader resumed with world_size x batch x shuffle window %s (was %s): epoch %d continues at %d/%d "
            "batches; this epoch may repeat or miss samples", layout,
            (state["world_size"], state["batch_size"], state.get("window_size")), self.epoch,
            self.position // self.batch_size, self.batches_per_epoch,
        )


class ValLoader(_Loader):
    """One pass over the validation split: yields ``(codes, labels, mask)``. Every rank yields
    ``len(loader)`` batches of ``batch_size`` rows (so collectives never hang); rows with
    ``mask`` False are padding (ranks' shares differ by up to one sample, the last batch is
    partial) or unreadable samples. The trainer sums ``loss * mask`` and ``mask`` over ranks."""

    def __init__(self, manifest: Manifest, config: DataConfig, rank: int, world_size: int, batch_size: int) -> None:
        super().__init__(manifest, config, rank, world_size, batch_size)
        self.plan = ValPlan(manifest.shard_counts, rank, world_size, max(batch_size, config.shuffle_window))
        self.epoch_size = self.plan.max_piece_size

    def __len__(self) -> int:
        return -(-self.plan.max_piece_size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        length, batch = int(self.manifest.num_tokens), self.batch_size
        pending: list[WindowData] = []
        emitted = 0

        def take(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            codes = torch.cat([w.codes for w in pending]) if pending else torch.zeros(0, length, dtype=torch.int32)
            labels = torch.cat([w.labels for w in pending]) if pending else torch.zeros(0, dtype=torch.long)
            valid = torch.cat([w.valid for w in pending]) if pending else torch.zeros(0, dtype=torch.bool)
            pending.clear()
            if codes.shape[0] > rows:
                pending.append(WindowData(codes[rows:], labels[rows:], valid[rows:], 0, {}))
                codes, labels, valid = codes[:rows], labels[:rows], valid[:rows]
            pad = rows - codes.shape[0]
            codes = torch.cat([codes, torch.zeros(pad, length, dtype=codes.dtype)])
            labels = torch.cat([labels, torch.zeros(pad, dtype=labels.dtype)])
            valid = torch.cat([valid, torch.zeros(pad, dtype=torch.bool)])
            return _widen(codes), labels, valid

        for window in self._windows(self.plan, 0):
            self._account(window)
            pending.append(window)
            while sum(w.codes.shape[0] for w in pending) >= batch:
                emitted += 1
                yield take(batch)
        while emitted < len(self):
            emitted += 1
            yield take(batch)


def build_train_loader(config: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int | None = None,
                       global_batch: int | None = None) -> TrainLoader:
    """The training loader of one rank; ``seed`` (e.g. the run's seed) replaces ``config.seed``.
    Check the manifest against the model with :func:`check_manifest_matches` (``loader.manifest``)."""
    config.validate()
    if not config.train_manifest:
        raise ValueError("data.train_manifest is empty: set it to the manifest.json written by 'mvar-dist prep'")
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    return TrainLoader(load_manifest(config.train_manifest, config.shard_url_template), config, rank, world_size, batch_size,
                       global_batch)


def build_val_loader(config: DataConfig, *, rank: int, world_size: int, batch_size: int) -> ValLoader | None:
    """The validation loader of one rank, or None without ``config.val_manifest``."""
    config.validate()
    if not config.val_manifest:
        return None
    return ValLoader(load_manifest(config.val_manifest, config.shard_url_template), config, rank, world_size, batch_size)
