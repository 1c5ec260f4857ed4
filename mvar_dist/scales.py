"""The multi-scale token layout shared by the tokenizer, the transformer and the data pipeline.

Scale ``s`` is a ``pn_s x pn_s`` grid of tokens in raster order; the flat sequence is the
concatenation of all scales, so scale ``s`` occupies ``[begin_s, end_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import torch

DEFAULT_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class ScaleLayout:
    """Token ranges of every scale for one ``patch_nums`` tuple."""

    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.patch_nums:
            raise ValueError("patch_nums must name at least one scale")
        if any(p <= 0 for p in self.patch_nums):
            raise ValueError(f"patch_nums must be positive, got {self.patch_nums}")
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @cached_property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        ranges, begin = [], 0
        for pn in self.patch_nums:
            ranges.append((begin, begin + pn * pn))
            begin += pn * pn
        return tuple(ranges)

    @property
    def num_tokens(self) -> int:
        """L, the length of the full sequence (680 for the 256 px layout)."""
        return self.begin_ends[-1][1]

    @property
    def final_size(self) -> int:
        """Side of the largest grid, which is also the tokenizer's latent resolution."""
        return self.patch_nums[-1]

    def grid(self, scale: int) -> tuple[int, int]:
        pn = self.patch_nums[scale]
        return pn, pn

    def scale_len(self, scale: int) -> int:
        return self.patch_nums[scale] ** 2

    @cached_property
    def scale_ids(self) -> torch.Tensor:
        """(L,) long tensor: the scale index of every token."""
        return torch.cat(
            [torch.full((self.scale_len(s),), s, dtype=torch.long) for s in range(self.num_scales)]
        )

    def check_scales(self, scales: Iterable[int]) -> tuple[int, ...]:
        """Validate a selection of scales; returns them sorted and de-duplicated."""
        chosen = sorted(set(int(s) for s in scales))
        if not chosen:
            raise ValueError("at least one scale must be selected")
        bad = [s for s in chosen if not 0 <= s < self.num_scales]
        if bad:
            raise ValueError(
                f"scale indices {bad} are out of range for {self.num_scales} scales "
                f"(patch_nums={self.patch_nums}); valid indices are 0..{self.num_scales - 1}"
            )
        return tuple(chosen)

    def token_index(self, scales: Sequence[int]) -> torch.Tensor:
        """Flat positions of the tokens of ``scales`` (sorted), in sequence order."""
        scales = self.check_scales(scales)
        return torch.cat([torch.arange(*self.begin_ends[s]) for s in scales])

    def split(self, flat: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """Split a tensor holding all L tokens along ``dim`` into one tensor per scale."""
        if flat.shape[dim] != self.num_tokens:
            raise ValueError(
                f"expected {self.num_tokens} tokens along dim {dim} for patch_nums="
                f"{self.patch_nums}, got shape {tuple(flat.shape)}"
            )
        return list(torch.split(flat, [self.scale_len(s) for s in range(self.num_scales)], dim=dim))


def phi_index(scale: int, num_scales: int, num_convs: int = 4) -> int:
    """Which of the ``num_convs`` shared phi convolutions scale ``scale`` uses.

    The convs sit at evenly spaced ticks in (0, 1); a scale takes the conv whose tick is nearest
    to its relative depth s/(S-1). Ties go to the lower index, as argmin does.
    """
    if num_convs == 1:
        return 0
    relative = scale / (num_scales - 1) if num_scales > 1 else 0.0
    # numpy's linspace, so that floating-point ties resolve exactly as in the released code,
    # which uses 1/(3K) margins for its K=4 shared convs and 1/(2K) for any other K.
    margin = 1 / (3 * num_convs) if num_convs == 4 else 1 / (2 * num_convs)
    ticks = np.linspace(margin, 1 - margin, num_convs)
    return int(np.argmin(np.abs(ticks - relative)))


def scale_groups(num_scales: int, refine_step: int) -> list[tuple[int, ...]]:
    """The published grouping: every scale below ``refine_step`` in one block-diagonal pass,
    then each refine scale (neighbourhood attention) on its own."""
    if not 0 < refine_step <= num_scales:
        raise ValueError(f"refine_step must be in 1..{num_scales}, got {refine_step}")
    return [tuple(range(refine_step))] + [(s,) for s in range(refine_step, num_scales)]
