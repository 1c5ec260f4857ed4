"""Resumable distributed loading of images for tokenizer training: the train / validation
loaders over the ``data`` section (:mod:`mvar_dist.images.config`). Where images live is
:mod:`mvar_dist.images.sources`; what a worker does with a batch is
:mod:`mvar_dist.images.batches`.

Training batches are ``(images, labels)``: images float32 (B, 3, S, S) in [-1, 1], labels (B,)
int64. Validation batches add a ``mask`` (B,) bool. The guarantees are the code loader's
(:mod:`mvar_dist.data.loader`); the layout differs because images are read one by one at indexed
offsets rather than shard by shard, so the shuffle is a full permutation instead of a shard order
plus a window shuffle, and the unit a worker reads (the code loader's window) is one batch:

- Each epoch is a seeded permutation of all N images (an index built at start gives every image a
  global index); rank r takes the r-th of ``world_size`` equal contiguous pieces, in whole batches,
  so every rank yields ``batches_per_epoch`` batches and no image is seen twice in an epoch.
- Each batch is read whole by one DataLoader worker, worker w taking batches w, w + W, ..., and
  the DataLoader returns them round-robin: the order never depends on ``num_workers``. A sample's
  crop and flip come from a generator seeded by (seed, epoch, global index), so the pixels do not
  depend on the rank, the worker or the batch either.
- The loader's whole state is (epoch, batches consumed in it): ``state_dict()`` after k batches and
  ``load_state_dict()`` in a fresh loader continue bitwise with batch k + 1. A different world
  size or batch size keeps the fraction of the epoch consumed (the code loader's rule).

Random access per image is the design's cost: files or tar members are read in a random order
(``os.pread`` at the indexed offset), fine on local disks and parallel file systems, slow on
spinning disks, impossible on streams (hence the refusal of remote URLs).

Bad images (undecodable, unreadable, aspect ratio beyond 50:1, a shard sample without a valid
``.cls`` when others have one): under ``bad_data: fail`` the first raises BadDataError naming the
file, or the shard and key. Under ``skip`` a training slot takes another good image of the same
batch, a validation slot is masked; all are counted in ``num_skipped``, and once they exceed
``max_bad_fraction`` of max(images read, one epoch) the loader raises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from mvar_dist.images.batches import (
    BatchData,
    BatchReader,
    BatchStream,
    ImageTrainPlan,
    ImageValPlan,
)
from mvar_dist.images.config import ImageDataConfig
from mvar_dist.images.sources import BadDataError, ImageIndex, SampleReader, open_source

logger = logging.getLogger(__name__)

_MAX_LOGGED = 20  # bad images named in the log; the rest are only counted


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1 and 255 -> 1 exactly)."""
    return images.float().div_(127.5).sub_(1.0)


class _ImageLoader:
    """Shared part: the batch reader, a DataLoader over batches, bad-data accounting."""

    def __init__(self, index: ImageIndex, config: ImageDataConfig, rank: int, world_size: int, batch_size: int, train: bool) -> None:
        config.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.index, self.config = index, config
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.reader = BatchReader(SampleReader(index), config.seed, config.image_size, config.resize, config.resample,
                                  train and config.crop == "random", train and config.hflip, config.bad_data)
        self.num_skipped = 0  # bad images met so far (train: replaced; validation: masked)
        self.num_read = 0
        self.epoch_size = 0  # images this rank reads per epoch (set by the subclass)
        self._logged = 0

    def _batches(self, plan: ImageTrainPlan | ImageValPlan, first: int) -> Iterator[BatchData]:
        workers = self.config.num_workers
        extra = dict(prefetch_factor=self.config.prefetch) if workers else {}
        return iter(DataLoader(BatchStream(plan, self.reader, first), batch_size=None, num_workers=workers, **extra))

    def _account(self, data: BatchData) -> None:
        self.num_read += len(data.labels)
        self.num_skipped += data.num_bad
        for where, reason in data.bad:
            self._logged += 1
            if self._logged <= _MAX_LOGGED:
                logger.warning("bad image (%s): %s; skipped, counted in num_skipped%s", where, reason,
                               "; further bad images are only counted" if self._logged == _MAX_LOGGED else "")
        # against at least one epoch's worth, so that a few bad images early on do not trip it
        if self.num_skipped > self.config.max_bad_fraction * max(self.num_read, self.epoch_size):
            raise BadDataError(
                f"{self.num_skipped} of {self.num_read} images read from {self.index.location} were bad, more than "
                f"data.max_bad_fraction={self.config.max_bad_fraction} (the first are named in the log)"
            )


class ImageTrainLoader(_ImageLoader):
    """Endless training batches ``(images, labels)`` for one rank; iterate it, checkpoint ``state_dict()``."""

    def __init__(self, index: ImageIndex, config: ImageDataConfig, rank: int, world_size: int, batch_size: int) -> None:
        super().__init__(index, config, rank, world_size, batch_size, train=True)
        self.plan = ImageTrainPlan(len(index), config.seed, rank, world_size, batch_size)
        if self.plan.batches_per_epoch == 0:
            raise ValueError(f"{index.location} has {len(index)} images: too few for {world_size} ranks x batch {batch_size}")
        self.epoch, self.position = 0, 0  # position: images of this rank's epoch consumed
        self.epoch_size = self.plan.samples_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first = self.epoch * self.plan.batches_per_epoch + self.position // self.batch_size
        for data in self._batches(self.plan, first):
            self._account(data)
            self.position += self.batch_size
            if self.position == self.plan.samples_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield to_float(data.images), data.labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.config.seed, "world_size": self.world_size,
            "batch_size": self.batch_size, "num_samples": len(self.index), "fingerprint": self.index.fingerprint,
            "num_skipped": self.num_skipped, "num_read": self.num_read,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["num_samples"], state["seed"], state["fingerprint"]) != (len(self.index), self.config.seed, self.index.fingerprint):
            raise ValueError(
                f"data state is for {state['num_samples']} images (fingerprint {state['fingerprint']}) with seed "
                f"{state['seed']}; the loader has {len(self.index)} images (fingerprint {self.index.fingerprint}) "
                f"from {self.index.location} and seed {self.config.seed}"
            )
        self.epoch, self.num_skipped, self.num_read = int(state["epoch"]), int(state["num_skipped"]), int(state["num_read"])
        if (state["world_size"], state["batch_size"]) == (self.world_size, self.batch_size):
            self.position = int(state["position"])
            return
        consumed = int(state["position"]) * int(state["world_size"])  # images, all ranks together
        self.position = math.ceil(consumed / (self.batch_size * self.world_size)) * self.batch_size
        if self.position >= self.plan.samples_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        logger.warning(
            "image loader resumed with world_size x batch %s (was %s): epoch %d continues at %d/%d batches; this "
            "epoch may repeat or miss images", (self.world_size, self.batch_size), (state["world_size"], state["batch_size"]),
            self.epoch, self.position // self.batch_size, self.batches_per_epoch,
        )


class ImageValLoader(_ImageLoader):
    """One pass over the validation images: ``(images, labels, mask)``. Every rank yields
    ``len(loader)`` batches of ``batch_size`` rows (so collectives never hang); rows with ``mask``
    False are padding (ranks' shares differ by up to one image, the last batches are partial) or
    bad images. Centre crop, no flip. Sum ``metric * mask`` and ``mask`` over ranks."""

    def __init__(self, index: ImageIndex, config: ImageDataConfig, rank: int, world_size: int, batch_size: int) -> None:
        super().__init__(index, config, rank, world_size, batch_size, train=False)
        self.plan = ImageValPlan(len(index), rank, world_size, batch_size)
        self.epoch_size = self.plan.max_piece_size

    def __len__(self) -> int:
        return self.plan.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size = self.config.image_size
        for data in self._batches(self.plan, 0):
            self._account(data)
            pad = self.batch_size - len(data.labels)
            yield (
                to_float(torch.cat([data.images, torch.zeros(pad, 3, size, size, dtype=torch.uint8)])),
                torch.cat([data.labels, torch.zeros(pad, dtype=torch.long)]),
                torch.cat([data.valid, torch.zeros(pad, dtype=torch.bool)]),
            )


def build_image_train_loader(config: ImageDataConfig, *, rank: int, world_size: int, batch_size: int,
                             seed: int | None = None, index: ImageIndex | None = None) -> ImageTrainLoader:
    """The training loader of one rank; ``seed`` (e.g. the run's) replaces ``config.seed``. Each
    rank indexes ``data.train`` itself unless given ``index`` (e.g. built on rank 0 and broadcast);
    compare ``loader.index.fingerprint`` across ranks to catch a rank that sees other files."""
    config.validate()
    if not config.train:
        raise ValueError("data.train is empty: set it to an image folder or to .tar shards of images")
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    index = index if index is not None else open_source(config.train, "data.train", config.bad_data)
    return ImageTrainLoader(index, config, rank, world_size, batch_size)


def build_image_val_loader(config: ImageDataConfig, *, rank: int, world_size: int, batch_size: int,
                           classes: tuple[str, ...] | None = None) -> ImageValLoader | None:
    """The validation loader of one rank, or None without ``data.val``. Pass the training index's
    ``classes`` so that a class-per-folder validation split numbers its classes the same way."""
    config.validate()
    if not config.val:
        return None
    return ImageValLoader(open_source(config.val, "data.val", config.bad_data, classes or None), config, rank, world_size, batch_size)
