"""The ``data`` section of a tokenizer-training experiment: where the images are, the crop and
its augmentation, the loader's workers and the bad-image policy. The loaders that read it are
:mod:`mvar_dist.images.loader`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvar_dist.images.batches import RESAMPLE
from mvar_dist.images.sources import check_local


@dataclass
class ImageDataConfig:
    """The ``data`` section of a tokenizer-training config. The per-rank batch size is the
    trainer's, passed to the loaders."""

    train: str | list[str] = ""  # image folder (class-per-folder or flat), or .tar shard path / brace pattern / list
    val: str | list[str] | None = None  # same for validation; None: no validation
    image_size: int = 256  # side of the square crops
    crop: Literal["random", "center"] = "random"  # training crop; validation always crops the centre
    hflip: bool = True  # training: flip each image with probability 1/2; validation never flips
    resize_ratio: float = 1.125  # shorter side -> round(ratio * image_size) before the crop (VAR: 1.125)
    resample: Literal["bicubic", "lanczos"] = "bicubic"  # resize filter, antialiased; VAR's loader used lanczos
    num_workers: int = 4  # DataLoader workers per rank (changing it keeps order and pixels)
    prefetch: int = 2  # batches each worker reads ahead
    seed: int = 0  # epoch permutations and augmentations; build_image_train_loader(seed=...) replaces it
    bad_data: Literal["skip", "fail"] = "skip"  # skip: replace (train) or mask (val), count; fail: raise
    max_bad_fraction: float = 0.001  # with 'skip', raise once bad images exceed this fraction of max(read, one epoch)

    def validate(self) -> None:
        for name in ("train", "val"):
            value = getattr(self, name)
            if value is None and name == "val":
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"data.{name} must be a path, a .tar pattern or a list of them, got {value!r}")
            for entry in value:
                check_local(f"data.{name}", entry)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"data.image_size must be a positive integer, got {self.image_size!r}")
        if self.crop not in ("random", "center"):
            raise ValueError(f"data.crop must be 'random' or 'center', got {self.crop!r}")
        if isinstance(self.resize_ratio, bool) or not isinstance(self.resize_ratio, (int, float)) or not self.resize_ratio >= 1.0:
            raise ValueError(f"data.resize_ratio must be >= 1 (the crop must fit in the resized image), got {self.resize_ratio!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"data.resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0 (it seeds numpy generators), got {self.seed}")
        if self.bad_data not in ("skip", "fail"):
            raise ValueError(f"data.bad_data must be 'skip' or 'fail', got {self.bad_data!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    @property
    def resize(self) -> int:
        """The shorter side before the crop."""
        return max(self.image_size, round(self.resize_ratio * self.image_size))
