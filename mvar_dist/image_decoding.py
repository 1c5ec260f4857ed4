"""Image files to 8-bit RGB: the one set of decoding rules that ``mvar-dist prep``
(:mod:`mvar_dist.data_prep.preprocess`, :mod:`mvar_dist.data_prep.sources`) and the
tokenizer-training loader (:mod:`mvar_dist.images`) share, so that the tokenizer trains on the
pixels it will later tokenize. Imports nothing from the package (numpy and Pillow only).

- Which files are images: :data:`IMAGE_EXTENSIONS` (any case), hidden files excluded
  (:func:`is_image_name`).
- Decoding (:func:`open_rgb`): Pillow opens the file or its bytes, the caller may refuse it from
  the header's size before any pixel is decoded (:data:`MAX_ASPECT_RATIO`), then it is decoded
  completely (``image.load()``), so a truncated file fails at once and not half-way through a
  resize.
- Colour (:func:`to_rgb`): 16-bit grayscale (modes ``I;16*``, and ``I``, which older Pillow gives
  16-bit PNGs, clipped to [0, 65535]) is scaled to 8 bits as ``round(v / 257)``, because Pillow's
  own conversion clips it at 255 and turns most of the image white. Every other mode (palette
  with or without transparency, CMYK, L, LA, RGBA, ...) goes through Pillow's
  ``convert("RGB")``; alpha is dropped, not composited. 16-bit RGB PNGs already open as 8-bit
  RGB (Pillow keeps the high byte).
- EXIF orientation is **not** applied: a file whose EXIF Orientation tag says "rotate 90" is
  used as stored. That is what torchvision's and VAR's ``pil_loader`` do, and the released
  tokenizer's codes were made with it; applying the tag in one path only would tokenize or train
  on rotated images. ``tests/test_image_decoding.py`` checks that both paths agree on such a file.
"""

from __future__ import annotations

import io
import os
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillow reads 16-bit PNGs
# Longer side / shorter side beyond which an image is refused (banners, strips): generous for
# photographs, and it bounds what resizing the shorter side to S can allocate (50 * S**2 pixels).
MAX_ASPECT_RATIO = 50


def is_image_name(name: str) -> bool:
    """A file name with an image extension (any case) that is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grayscale scaled as ``round(v / 257)`` (mode ``I`` clipped to [0, 65535]
    first), every other mode through Pillow's ``convert("RGB")``; an RGB image is returned as is."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # exact round(v / 257): 257 is odd, no ties
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(source: str | os.PathLike[str] | bytes,
             check_size: Callable[[int, int], None] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """A file (path) or its bytes, decoded completely, as 8-bit RGB (:func:`to_rgb`), and its
    (width, height). ``check_size(width, height)`` runs on the header's size before decoding and
    may raise to refuse the image. Raises whatever Pillow raises for unreadable or truncated data."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        size = image.size
        if check_size is not None:
            check_size(*size)
        image.load()
        return to_rgb(image), size
