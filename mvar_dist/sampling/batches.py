"""Sampling an exported model in batches: the settings (flags over what the export records),
per-batch seeds, class lists, and the batch loop that yields uint8 images.

Seeds: images are generated in batches of ``batch_size`` in class order, and batch ``b`` is
sampled with a seed derived from ``(seed, b)``. The same seed, batch size and device give the
same images; another batch size gives other (equally valid) samples, because the sampler draws
a whole batch from one random stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mvar_dist.model.transformer import MVAR
from mvar_dist.sampling.images import to_uint8_hwc
from mvar_dist.tokenizer.base import Tokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SamplingSettings:
    """None leaves the setting to ``MVAR.generate``'s default (:func:`mvar_dist.model.generate.generate`)."""

    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in (("cfg", self.cfg), ("top_k", self.top_k), ("top_p", self.top_p)) if v is not None}


def resolve_settings(recorded: dict[str, Any] | None, cfg: float | None, top_k: int | None, top_p: float | None) -> SamplingSettings:
    """Flags override the export's recorded ``sample`` section."""
    recorded = recorded or {}
    flags = {"cfg": cfg, "top_k": top_k, "top_p": top_p}
    return SamplingSettings(**{name: recorded.get(name) if flag is None else flag for name, flag in flags.items()})


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch ``batch_index``, independent across (seed, batch) pairs."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    low, high = np.random.SeedSequence([seed, batch_index]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``"0,1,207"`` or ranges ``"0-9,207"`` -> class ids, checked against the model."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise ValueError(f"--classes: {part!r} is not a class id or a range like 0-9") from None
        classes.extend(span)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"--classes must name classes in 0..{num_classes - 1} (the model's num_classes), got {text!r}")
    return classes


def sample_batch(
    model: MVAR, tokenizer: Tokenizer, labels: Sequence[int], batch_size: int, index: int, seed: int,
    settings: SamplingSettings, device: torch.device, precision: str = "fp32",
) -> np.ndarray:
    """uint8 (b, H, W, 3) images of batch ``index``: ``labels[index * batch_size:][:batch_size]``
    drawn with the batch's own seed, so any process can draw any batch (ranks split them)."""
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    start = index * batch_size
    batch = torch.tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
    with autocast:
        _, images = model.generate(batch, tokenizer, seed=batch_seed(seed, index), **settings.kwargs())
    return to_uint8_hwc(images)


def sample_batches(
    model: MVAR, tokenizer: Tokenizer, labels: Sequence[int], batch_size: int, seed: int, settings: SamplingSettings,
    device: torch.device, precision: str = "fp32", progress: bool = True,
) -> Iterator[np.ndarray]:
    """uint8 (b, H, W, 3) images for ``labels`` in order, ``batch_size`` at a time."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    with tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress) as bar:
        for index in range(num_batches(len(labels), batch_size)):
            images = sample_batch(model, tokenizer, labels, batch_size, index, seed, settings, device, precision)
            yield images
            bar.update(len(images))


def num_batches(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)
