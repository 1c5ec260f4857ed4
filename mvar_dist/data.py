"""Resumable distributed loading of pre-tokenized code shards (written by ``mvar-dist prep``).

Batches are ``(codes, labels)``: codes a flat (B, L) LongTensor of one view of each image (the
image or its horizontal flip, chosen by a seeded RNG), labels (B,). Turning codes into the
transformer's teacher input is the tokenizer's job on the training device
(``tokenizer.codes_to_teacher_input(codes)``), not the loader's: the codes are 16x smaller
than the float input and the conversion is a few cheap convolutions on the GPU.

Guarantees (see :mod:`mvar_dist.data_stream` for the layout):

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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mvar_dist.data_stream import BadDataError, TrainPlan, ValPlan, WindowData, WindowReader, WindowStream

logger = logging.getLogger(__name__)

__all__ = [
    "BadDataError", "DataConfig", "Manifest", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader",
    "check_manifest_matches",
    "load_manifest",
]


@dataclass
class DataConfig:
    """The ``data`` section of a training config. The per-rank batch size is the trainer's
    ``train.micro_batch_size``, passed to the loaders, so that it is set in one place."""

    train_manifest: str = ""  # path, directory or URL of the train split's manifest.json
    val_manifest: str | None = None  # same for validation; None: no validation
    shard_url_template: str | None = None  # e.g. "pipe:aws s3 cp s3://bucket/codes/{split}/{name} -"; default: beside the manifest
    num_workers: int = 4  # DataLoader workers per rank (changing it keeps the sample order)
    seed: int = 0
    shuffle_window: int = 8192  # samples shuffled together (rounded to whole batches); ~8 shards
    hflip: bool = True  # pick the image or its flip at random; False: always the image
    bad_data: Literal["skip", "fail"] = "skip"  # skip: replace, warn once per shard, count; fail: raise
    max_bad_fraction: float = 0.001  # with 'skip', raise once bad samples exceed this fraction of max(read, one epoch)
    prefetch_windows: int = 2  # windows each worker reads ahead

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.bad_data not in ("skip", "fail"):
            raise ValueError(f"data.bad_data must be 'skip' or 'fail', got {self.bad_data!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.prefetch_windows < 1:
            raise ValueError(f"data.prefetch_windows must be >= 1, got {self.prefetch_windows}")


@dataclass(frozen=True)
class Manifest:
    location: str
    data: Mapping[str, Any]  # the manifest.json content (format in mvar_dist.data_prep.manifest)
    shard_urls: tuple[str, ...]

    @property
    def shard_counts(self) -> tuple[int, ...]:
        return tuple(int(s["num_samples"]) for s in self.data["shards"])

    def __getattr__(self, name: str) -> Any:  # num_samples, patch_nums, vocab_size, tokenizer, ...
        if name.startswith("__") or name == "data":
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def _is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def load_manifest(location: str | Path, shard_url_template: str | None = None) -> Manifest:
    """Read a manifest from a path, a split directory, or a URL webdataset can open."""
    location = str(location)
    if not _is_url(location) and Path(location).is_dir():
        location = str(Path(location) / "manifest.json")
    if _is_url(location):
        import webdataset

        with webdataset.gopen(location, "rb") as stream:
            data = json.loads(stream.read())
    else:
        if not Path(location).is_file():
            raise FileNotFoundError(f"manifest {location} does not exist (run 'mvar-dist prep ... --merge' to write it)")
        data = json.loads(Path(location).read_text())
    if data.get("format") != "mvar-dist-codes":
        raise ValueError(f"{location} is not an mvar-dist code manifest (format={data.get('format')!r})")
    names = [s["name"] for s in data["shards"]]
    if shard_url_template:
        urls = [shard_url_template.format(name=n, split=data["split"]) for n in names]
    elif location.startswith("pipe:"):
        raise ValueError(f"manifest {location} is read through a pipe: set data.shard_url_template to locate its shards")
    elif _is_url(location):
        urls = [location.rsplit("/", 1)[0] + "/" + n for n in names]
    else:
        urls = [str(Path(location).parent / n) for n in names]
    return Manifest(location, data, tuple(urls))


def check_manifest_matches(
    manifest: Manifest | str | Path, patch_nums: Sequence[int], vocab_size: int, tokenizer_identity: Mapping[str, Any] | None
) -> Manifest:
    """Raise ValueError unless the shards were made for this model: same patch_nums, vocabulary
    and tokenizer (config and weights). ``tokenizer_identity`` None skips the tokenizer check."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    problems = []
    if list(manifest.patch_nums) != [int(p) for p in patch_nums]:
        problems.append(f"patch_nums: shards {tuple(manifest.patch_nums)}, model {tuple(patch_nums)}")
    if int(manifest.vocab_size) != int(vocab_size):
        problems.append(f"vocab_size: shards {manifest.vocab_size}, model {vocab_size}")
    ours = json.loads(json.dumps(tokenizer_identity)) if tokenizer_identity is not None else None
    if ours is not None and manifest.tokenizer != ours:
        theirs = manifest.tokenizer
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        details = ", ".join(f"{k}: shards {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in keys)
        problems.append(f"tokenizer differs ({details})")
    if problems:
        raise ValueError(
            f"the shards of {manifest.location} do not match the model config: " + "; ".join(problems)
            + ". Re-tokenize with 'mvar-dist prep' using this tokenizer, or point data.*_manifest at matching shards."
        )
    return manifest


def window_reader(manifest: Manifest, config: DataConfig, rank: int) -> WindowReader:
    """What one DataLoader worker runs: reads and shuffles windows of ``manifest``'s shards."""
    return WindowReader(
        manifest.shard_urls, int(manifest.num_tokens), int(manifest.vocab_size), int(manifest.num_classes),
        config.seed, rank, config.hflip, config.bad_data,
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
        self.epoch_size = 0  # samples this rank reads per epoch (set by the subclass)
        self._warned: set[str] = set()

    def _windows(self, plan: TrainPlan | ValPlan, first: int) -> Iterator[WindowData]:
        workers = self.config.num_workers
        stream = WindowStream(plan, window_reader(self.manifest, self.config, self.rank), first)
        extra = dict(prefetch_factor=self.config.prefetch_windows) if workers else {}
        return iter(DataLoader(stream, batch_size=None, num_workers=workers, **extra))

    def _account(self, window: WindowData) -> None:
        self.num_read += window.codes.shape[0]
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
    """Endless training batches for one rank; iterate it, checkpoint ``state_dict()``."""

    def __init__(self, manifest: Manifest, config: DataConfig, rank: int, world_size: int, batch_size: int) -> None:
        super().__init__(manifest, config, rank, world_size, batch_size)
        window = max(1, config.shuffle_window // batch_size) * batch_size
        self.plan = TrainPlan(manifest.shard_counts, config.seed, rank, world_size, batch_size, window)
        if self.plan.batches_per_epoch == 0:
            raise ValueError(
                f"{manifest.location} has {manifest.num_samples} samples: too few for {world_size} ranks x batch {batch_size}"
            )
        self.epoch, self.position = 0, 0  # position: samples of this rank's epoch consumed
        self.epoch_size = self.plan.samples_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
                yield _widen(window.codes[start : start + batch]), window.labels[start : start + batch]
            offset = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.config.seed, "world_size": self.world_size,
            "batch_size": self.batch_size, "window_size": self.plan.window_size, "num_samples": int(self.manifest.num_samples),
            "num_skipped": self.num_skipped, "num_read": self.num_read,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_samples"] != self.manifest.num_samples or state["seed"] != self.config.seed:
            raise ValueError(
                f"data state is for {state['num_samples']} samples with seed {state['seed']}, the loader has "
                f"{self.manifest.num_samples} samples ({self.manifest.location}) and seed {self.config.seed}"
            )
        self.epoch, self.num_skipped, self.num_read = int(state["epoch"]), int(state["num_skipped"]), int(state["num_read"])
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



def build_train_loader(config: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int | None = None) -> TrainLoader:
    """The training loader of one rank; ``seed`` (e.g. the run's seed) replaces ``config.seed``.
    Check the manifest against the model with :func:`check_manifest_matches` (``loader.manifest``)."""
    config.validate()
    if not config.train_manifest:
        raise ValueError("data.train_manifest is empty: set it to the manifest.json written by 'mvar-dist prep'")
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    return TrainLoader(load_manifest(config.train_manifest, config.shard_url_template), config, rank, world_size, batch_size)


def build_val_loader(config: DataConfig, *, rank: int, world_size: int, batch_size: int) -> ValLoader | None:
    """The validation loader of one rank, or None without ``config.val_manifest``."""
    config.validate()
    if not config.val_manifest:
        return None
    return ValLoader(load_manifest(config.val_manifest, config.shard_url_template), config, rank, world_size, batch_size)
