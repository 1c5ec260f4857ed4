"""Image preprocessing before tokenization: the published pre-tokenization recipe.

MVAR's code caches the tokenizer's codes of each ImageNet image and of its horizontal flip
(``main_cache.py``) after ADM's ``center_crop_arr`` (guided-diffusion, also used by DiT/MAR):

1. decode with PIL and convert to RGB;
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
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

RECIPE_NAME = "adm_center_crop"


def recipe(size: int) -> dict[str, Any]:
    """The preprocessing as recorded in the manifest."""
    return {
        "name": RECIPE_NAME,
        "size": size,
        "steps": [
            "PIL decode, convert('RGB')",
            "while min(w, h) >= 2*size: resize to (w//2, h//2) with Image.BOX",
            "resize shorter side to size with Image.BICUBIC (antialiased), sides rounded",
            "center crop size x size at ((w-size)//2, (h-size)//2)",
            "x/255*2-1 -> [-1, 1]",
            "views: [image, horizontal flip]",
        ],
        "reference": "ADM center_crop_arr as in MVAR main_cache.py",
    }


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> (size, size, 3) uint8 array, following :func:`recipe`."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, preprocess; returns the (size, size, 3) uint8 array and the original (w, h).
    Raises whatever PIL raises for unreadable or truncated files."""
    with Image.open(path) as image:
        original = image.size
        image.load()  # decode fully here, so truncated files fail now and not half-way
        return center_crop_resize(image, size), original
