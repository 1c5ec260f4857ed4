"""What a DataLoader worker of the image loader does: which samples each batch holds (the
plans), decoding and augmenting one image, and reading one batch with its bad images replaced
(training) or masked (validation). The loaders around it are :mod:`mvar_dist.images.loader`;
decoding to 8-bit RGB is :mod:`mvar_dist.image_decoding`, shared with ``mvar-dist prep``.

Every random choice comes from a numpy generator seeded by the values it may depend on, with a
domain tag first so that the streams never coincide (SeedSequence treats ``[a, b]`` and
``[a, b, 0]`` alike, so the tag is not left to trailing values):

- ``[ORDER, seed, epoch]``: the epoch's permutation of all N samples;
- ``[VIEW, seed, epoch, i]``: sample ``i``'s crop position (top, then left) and flip, in that order;
- ``[FILL, seed, epoch, p]``: which good samples replace the bad ones of the batch that starts at
  position ``p`` of the epoch's permutation.

None of them involves the rank, the worker or the number of workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from mvar_dist.image_decoding import MAX_ASPECT_RATIO, open_rgb
from mvar_dist.images.sources import BadDataError, SampleReader

logger = logging.getLogger(__name__)

ORDER, VIEW, FILL = 0x0DE5, 0x71E4, 0xF111  # SeedSequence domain tags (see the module docstring)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class BadImage(Exception):
    """An image that does not decode, or whose aspect ratio is beyond MAX_ASPECT_RATIO."""


def _check_size(width: int, height: int) -> None:
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImage(f"size {width}x{height}: aspect ratio beyond {MAX_ASPECT_RATIO:g}:1")


def decode_view(data: bytes, size: int, resize: int, resample: str, rng: np.random.Generator | None,
                random_crop: bool, flip: bool) -> np.ndarray:
    """(3, size, size) uint8 of one image: shorter side resized to ``resize`` (the longer one to
    ``int(resize * long / short)``, torchvision's Resize rule; Pillow's resize is antialiased),
    then a crop, random when ``random_crop`` (else centred as torchvision's CenterCrop), then a
    horizontal flip with probability 1/2 when ``flip``. ``rng`` draws top, left, flip in that
    order; None means centre crop, no flip. Raises BadImage."""
    try:
        rgb = open_rgb(data, _check_size)[0]
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image format Pillow can identify") from None
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ... on bad bytes
        raise BadImage(f"cannot decode: {type(error).__name__}: {error}") from None
    short, long = sorted(rgb.size)
    long = int(resize * long / short)
    target = (resize, long) if rgb.size[0] <= rgb.size[1] else (long, resize)
    if rgb.size != target:
        rgb = rgb.resize(target, RESAMPLE[resample])
    width, height = rgb.size
    if rng is not None and random_crop:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    pixels = np.asarray(rgb.crop((left, top, left + size, top + size)))
    if rng is not None and flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class Batch:
    """The samples of one batch, read whole by one worker."""

    epoch: int
    number: int  # within the rank's epoch (training) or pass (validation)
    indices: np.ndarray  # global sample indices, in batch order
    position: int  # of the first sample in the epoch's permutation (training); seeds the fill choice
    train: bool


@dataclass(frozen=True)
class ImageTrainPlan:
    """Epoch e: a seeded permutation of all N samples; rank r takes the r-th of ``world_size``
    equal contiguous pieces (N // world_size samples) and cuts the first ``batches_per_epoch``
    whole batches of it. Every rank has the same number of batches; the N mod world_size and
    (N // world_size) mod batch_size leftovers are a different random set each epoch."""

    num_samples: int
    seed: int
    rank: int
    world_size: int
    batch_size: int

    @property
    def piece_size(self) -> int:
        return self.num_samples // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.piece_size // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size

    @lru_cache(maxsize=2)
    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([ORDER, self.seed, epoch]).permutation(self.num_samples)

    def rank_sequence(self, epoch: int) -> np.ndarray:
        begin = self.rank * self.piece_size
        return self.order(epoch)[begin : begin + self.samples_per_epoch]

    def batch(self, number: int) -> Batch | None:
        """Batch ``number`` of the rank's endless sequence (epoch-major)."""
        epoch, index = divmod(number, self.batches_per_epoch)
        start = self.rank * self.piece_size + index * self.batch_size
        return Batch(epoch, index, self.order(epoch)[start : start + self.batch_size], start, True)


@dataclass(frozen=True)
class ImageValPlan:
    """Samples in index order, split into ``world_size`` contiguous pieces whose sizes differ by at
    most one; every rank has ``num_batches`` batches, the last ones partial or empty (padded by
    the loader)."""

    num_samples: int
    rank: int
    world_size: int
    batch_size: int

    def bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.num_samples // self.world_size, (rank + 1) * self.num_samples // self.world_size

    @property
    def max_piece_size(self) -> int:
        return max(end - begin for begin, end in map(self.bounds, range(self.world_size)))

    @property
    def num_batches(self) -> int:
        return -(-self.max_piece_size // self.batch_size)

    def batch(self, number: int) -> Batch | None:
        if number >= self.num_batches:
            return None
        begin, end = self.bounds(self.rank)
        start = min(end, begin + number * self.batch_size)
        return Batch(0, number, np.arange(start, min(end, start + self.batch_size)), start, False)


@dataclass
class BatchData:
    images: torch.Tensor  # (K, 3, S, S) uint8: a quarter of float32's bytes between processes
    labels: torch.Tensor  # (K,) int64
    valid: torch.Tensor  # (K,) bool; False for bad validation samples
    num_bad: int
    bad: list[tuple[str, str]]  # (where, reason) of each bad sample


@dataclass(frozen=True)
class BatchReader:
    """Reads and augments batches; picklable, so it travels to DataLoader workers."""

    source: SampleReader
    seed: int
    image_size: int
    resize: int  # the shorter side before the crop: round(resize_ratio * image_size)
    resample: str
    random_crop: bool
    hflip: bool
    bad_data: Literal["skip", "fail"]

    def view(self, data: bytes, epoch: int, index: int, train: bool) -> np.ndarray:
        """Sample ``index``'s pixels; training draws from the generator of (seed, epoch, index)."""
        rng = np.random.default_rng([VIEW, self.seed, epoch, index]) if train else None
        return decode_view(data, self.image_size, self.resize, self.resample, rng, self.random_crop, self.hflip)

    def _sample(self, index: int, epoch: int, train: bool) -> tuple[bytes, np.ndarray] | str:
        """(bytes, pixels) of a good sample, or why it is bad (raised under 'fail')."""
        labels = self.source.index.labels
        try:
            if labels[index] < 0:
                raise BadImage("its .cls member is missing or not a non-negative integer")
            data = self.source.read(index)
            return data, self.view(data, epoch, index, train)
        except (BadImage, OSError) as error:
            reason = str(error) if isinstance(error, BadImage) else f"cannot read: {error}"
        if self.bad_data == "fail":
            raise BadDataError(f"bad image ({self.source.index.describe(index)}): {reason} (set data.bad_data='skip' to skip it)")
        return reason

    def _fallback(self, batch: Batch, plan: ImageTrainPlan) -> tuple[bytes, int]:
        """Bytes and label of the first good sample after the batch in the rank's epoch sequence (wrapping
        round): what fills a training batch with no good sample, so that it keeps its size and
        the rank stays in step with the others."""
        sequence = plan.rank_sequence(batch.epoch)
        after = batch.position - plan.rank * plan.piece_size + len(batch.indices)
        for step in range(len(sequence) - len(batch.indices)):
            index = int(sequence[(after + step) % len(sequence)])
            found = self._sample(index, batch.epoch, True)
            if not isinstance(found, str):
                logger.warning("no good image in batch %d of epoch %d: filled with %s",
                               batch.number, batch.epoch, self.source.index.describe(index))
                return found[0], int(self.source.index.labels[index])
        raise BadDataError(f"no readable image in batch {batch.number} of epoch {batch.epoch} nor in the rest of the epoch")

    def read(self, batch: Batch, plan: ImageTrainPlan | None = None) -> BatchData:
        """The batch's pixels and labels. A bad training sample's slot takes a good sample of the
        same batch (chosen by the FILL generator) with the bad sample's own crop and flip, so the
        copy differs from the original; a bad validation sample is zeros with ``valid`` False."""
        size, indices = self.image_size, [int(i) for i in batch.indices]
        images = np.zeros((len(indices), 3, size, size), dtype=np.uint8)
        labels = np.zeros(len(indices), dtype=np.int64)
        valid = np.zeros(len(indices), dtype=bool)
        raw: dict[int, bytes] = {}
        bad: list[tuple[str, str]] = []
        for slot, index in enumerate(indices):
            found = self._sample(index, batch.epoch, batch.train)
            if isinstance(found, str):
                bad.append((self.source.index.describe(index), found))
            else:
                raw[slot], images[slot] = found
                labels[slot], valid[slot] = self.source.index.labels[index], True
        if batch.train and bad:
            rng = np.random.default_rng([FILL, self.seed, batch.epoch, batch.position])
            good = np.flatnonzero(valid)
            if good.size:
                pick = {int(s): int(rng.choice(good)) for s in np.flatnonzero(~valid)}
                sources = {s: (raw[g], labels[g]) for s, g in pick.items()}
            else:
                assert plan is not None, "a training batch needs its plan to be filled"
                fill = self._fallback(batch, plan)
                sources = {s: fill for s in range(len(indices))}
            for slot, (data, label) in sources.items():
                images[slot], labels[slot] = self.view(data, batch.epoch, indices[slot], True), label
            valid[:] = True
        return BatchData(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(valid), len(bad), bad)


class BatchStream(IterableDataset):
    """Batches ``first, first + 1, ...`` of a plan; worker ``w`` of ``W`` reads ``first + w, first
    + w + W, ...`` and the DataLoader hands worker outputs back round-robin, so the main process
    receives them in plan order whatever ``W`` is."""

    def __init__(self, plan: ImageTrainPlan | ImageValPlan, reader: BatchReader, first: int) -> None:
        self.plan, self.reader, self.first = plan, reader, first

    def __iter__(self) -> Iterator[BatchData]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = self.first + worker
        train_plan = self.plan if isinstance(self.plan, ImageTrainPlan) else None
        while (batch := self.plan.batch(number)) is not None:
            yield self.reader.read(batch, train_plan)
            number += workers
