"""Writing generated images: uint8 conversion, grids as PNG, and the ADM evaluator's ``.npz``.

The ``.npz`` is streamed to disk batch by batch (``arr_0.npy`` stored uncompressed inside the
zip, as ``numpy.savez`` writes it), so 50,000 images at 256 px (9.8 GB) never sit in memory.
Every file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np
import torch

from mvar_dist.atomic import publish, temporary_sibling, write_via_temp


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded to the nearest level."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (batch, 3, height, width), got {tuple(images.shape)}")
    pixels = images.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def compose_grid(images: np.ndarray, rows: int, padding: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (rows * cols, H, W, 3) in row-major order -> one (rows*(H+p)+p, cols*(W+p)+p, 3) image
    with ``padding`` pixels of ``fill`` around every cell."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    count, height, width, _ = images.shape
    if rows < 1 or count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows evenly")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    cols = count // rows
    grid = np.full((rows * (height + padding) + padding, cols * (width + padding) + padding, 3), fill, np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // cols) * (height + padding)
        left = padding + (index % cols) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_via_temp(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return path


class NpzSampleWriter:
    """Streams uint8 (N, H, W, 3) images into ``path`` as the ``arr_0`` of an ``.npz``.

    ``write`` must be called with batches whose sizes add up to exactly ``num``; ``close``
    (or leaving the ``with`` block without an error) renames the finished file into place.
    """

    def __init__(self, path: str | Path, num: int, height: int, width: int) -> None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        self.path = Path(path)
        self.shape = (int(num), int(height), int(width), 3)
        self.written = 0
        self._tmp = temporary_sibling(self.path)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member: IO[bytes] = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"expected uint8 (n, {', '.join(map(str, self.shape[1:]))}), got {images.dtype} {images.shape}")
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"writing {len(images)} more images would exceed the declared {self.shape[0]}")
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def close(self) -> Path:
        self._member.close()
        self._zip.close()
        if self.written != self.shape[0]:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"only {self.written} of the declared {self.shape[0]} images were written")
        publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._member.close()
        self._zip.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "NpzSampleWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
