"""Image preprocessing before tokenization: the published pre-tokenization recipe.

MVAR's code caches the tokenizer's codes of each ImageNet image and of its horizontal flip
(``main_cache.py``) after ADM's ``center_crop_arr`` (guided-diffusion, also used by DiT/MAR):

1. decode with PIL and convert to 8-bit RGB by :mod:`mvar_dist.image_decoding`, the rules the
   tokenizer-training loader uses too (16-bit grayscale, PIL modes ``I;16*`` and ``I``, is first
   scaled to 8 bits as ``round(v / 257)``: PIL's own conversion clips it, turning most of it white;
   EXIF orientation is not applied, as in torchvision's and VAR's loaders);
2. while the shorter side is >= 2 * size: halve both sides with ``Image.BOX`` (exact 2x2 area
   averaging, i.e. antialiased; integer division of odd sides);
3. resize so that the shorter side is ``size`` with ``Image.BICUBIC`` (PIL's resize filters
   are antialiased: the kernel is widened by the downscale factor); both sides
   ``round(side * size / shorter)``;
4. crop the central ``size x size`` square (offsets ``(side - size) // 2``);
5. map uint8 [0, 255] to [-1, 1] as ``x / 255 * 2 - 1``.

VAR's own ImageNet loader (``utils/data.py``) instead resizes the shorter side to
``round(1.125 * size)`` with LANCZOS and takes a *random* crop per epoch; a random crop cannot
be pre-tokenized once, which is why MVAR's cache uses the centered ADM crop with the flip as
the only augmentation. We follow MVAR's cache (the recipe our loader reproduces).

Images whose aspect ratio exceeds ``MAX_ASPECT_RATIO`` are refused (ValueError; prep skips them
and lists them in the manifest): step 3 would blow a 1 x 100000 line up to 256 x 25.6M pixels, and
the crop would keep a meaningless sliver of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mvar_dist.image_decoding import MAX_ASPECT_RATIO, open_rgb, to_rgb

RECIPE_NAME = "adm_center_crop"


def recipe(size: int) -> dict[str, Any]:
    """The preprocessing as recorded in the manifest."""
    return {
        "name": RECIPE_NAME,
        "size": size,
        "steps": [
            f"refuse (skip) images with aspect ratio > {MAX_ASPECT_RATIO}:1",
            "PIL decode; 16-bit grayscale (modes I;16*, I) to 8 bits as round(v/257); convert('RGB')",
            "while min(w, h) >= 2*size: resize to (w//2, h//2) with Image.BOX",
            "resize shorter side to size with Image.BICUBIC (antialiased), sides rounded",
            "center crop size x size at ((w-size)//2, (h-size)//2)",
            "x/255*2-1 -> [-1, 1]",
            "views: [image, horizontal flip]",
        ],
        "reference": "ADM center_crop_arr as in MVAR main_cache.py",
    }


def check_shape(width: int, height: int, size: int) -> None:
    """ValueError for an image :func:`center_crop_resize` must not process (see MAX_ASPECT_RATIO)."""
    shorter, longer = min(width, height), max(width, height)
    if shorter < 1:
        raise ValueError(f"the image is {width}x{height}: it has no pixels")
    if longer > MAX_ASPECT_RATIO * shorter:
        scale = size / shorter
        raise ValueError(
            f"aspect ratio of the {width}x{height} image is beyond {MAX_ASPECT_RATIO}:1 (resizing its shorter side "
            f"to {size} would make it {round(width * scale)}x{round(height * scale)} pixels)"
        )


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8 RGB array, following :func:`recipe`; ValueError for
    images beyond MAX_ASPECT_RATIO."""
    check_shape(*image.size, size)
    image = to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, preprocess; returns the (size, size, 3) uint8 array and the original (w, h).
    Raises whatever PIL raises for unreadable or truncated files, and ValueError for images
    beyond MAX_ASPECT_RATIO (checked from the header, before decoding)."""
    rgb, original = open_rgb(path, lambda width, height: check_shape(width, height, size))
    return center_crop_resize(rgb, size), original
