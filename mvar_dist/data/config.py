"""The ``data`` section of a training config; the loader owns its fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """The ``data`` section of a training config. The per-rank batch size is the trainer's
    ``train.micro_batch_size`` (resolved for the world size), passed to the loaders."""

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
    # canonical streams of the sample order (mvar_dist.data.streams): auto (a divisor of the global
    # batch that 1, 2, 4, ... 128 ranks and the starting world size divide), a number, or null for
    # the per-rank order of runs started before them (resuming on another world size is then approximate)
    canonical_ranks: int | Literal["auto"] | None = "auto"
    # resuming on a world size that does not divide the streams: refuse (exact), or re-split the
    # epoch's remaining samples per rank with a warning (approximate)
    resize: Literal["exact", "approximate"] = "exact"

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.bad_data not in ("skip", "fail"):
            raise ValueError(f"data.bad_data must be 'skip' or 'fail', got {self.bad_data!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.canonical_ranks is not None and self.canonical_ranks != "auto" and (
                isinstance(self.canonical_ranks, bool) or self.canonical_ranks < 1):
            raise ValueError(f"data.canonical_ranks must be auto, null or an integer >= 1, got {self.canonical_ranks!r}")
        if self.resize not in ("exact", "approximate"):
            raise ValueError(f"data.resize must be 'exact' or 'approximate', got {self.resize!r}")
        if self.prefetch_windows < 1:
            raise ValueError(f"data.prefetch_windows must be >= 1, got {self.prefetch_windows}")
