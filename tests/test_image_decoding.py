"""One decoding for both image paths: ``mvar-dist prep`` (``data_prep.preprocess.load_image``) and
the tokenizer-training loader (``mvar_dist.images.batches.decode_view``) turn the same 8-bit,
16-bit, palette, CMYK, grayscale and EXIF-rotated files into the same 8-bit RGB pixels.

The comparison is one operation on both paths: 12 x 8 images at crop side 8 and (loader)
resize 8. Neither path resizes then (the shorter side is already 8; Pillow's resize to the same
size is a copy, and the loader skips it), and both take columns 2..10 ((12 - 8) // 2 for prep,
round((12 - 8) / 2) for the loader). So each path's output is exactly its decoder's 8-bit RGB
image, cropped: any difference is a difference in decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvar_dist import image_decoding
from mvar_dist.data_prep import preprocess, sources
from mvar_dist.images import sources as image_sources
from mvar_dist.images.batches import decode_view

SIZE, WIDTH, HEIGHT = 8, 12, 8
LEFT = (WIDTH - SIZE) // 2
ORIENTATION = 0x0112  # the EXIF Orientation tag; 6: "rotate 90 degrees clockwise to display"


def _rgb8(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _sixteen_bit_values() -> np.ndarray:
    """0, the rounding edges around 128/257 and 129/257 of a step, the top, and a spread."""
    edges = [0, 1, 128, 129, 257 + 128, 257 + 129, 32767, 32768, 65534, 65535]
    spread = np.linspace(300, 65000, HEIGHT * WIDTH - len(edges)).astype(int).tolist()
    return np.array(edges + spread, dtype=np.uint16).reshape(HEIGHT, WIDTH)


def _round_div_257(values: np.ndarray) -> np.ndarray:
    """The 16-bit rule in plain numpy: round(v / 257) of v clipped to [0, 65535], to all 3 channels."""
    scaled = np.floor(np.clip(values.astype(np.float64), 0, 65535) / 257 + 0.5).astype(np.uint8)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def write(folder: Path, name: str) -> tuple[Path, np.ndarray]:
    """Writes the image ``name``; returns its path and the (HEIGHT, WIDTH, 3) uint8 RGB pixels both
    paths must decode it to."""
    rng = np.random.default_rng(sum(map(ord, name)))
    path = folder / name
    if name == "rgb8.png":
        pixels = _rgb8(rng)
        Image.fromarray(pixels).save(path)
        return path, pixels
    if name in ("gray16.png", "gray16.tif"):
        values = _sixteen_bit_values()
        Image.fromarray(values).save(path)  # mode I;16: 16-bit grayscale
        assert Image.open(path).mode.startswith("I;16")
        return path, _round_div_257(values)
    if name == "int32.tif":  # mode I, as older Pillow reads 16-bit PNGs; out-of-range values clipped
        values = _sixteen_bit_values().astype(np.int32)
        values[0, :3] = (-5, 70000, 1 << 20)
        Image.fromarray(values).save(path)
        assert Image.open(path).mode == "I"
        return path, _round_div_257(values)
    if name == "gray8.png":
        gray = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
        Image.fromarray(gray).save(path)
        return path, np.repeat(gray[:, :, None], 3, axis=2)
    if name == "gray_alpha.png":
        gray = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
        alpha = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
        Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(path)
        return path, np.repeat(gray[:, :, None], 3, axis=2)  # alpha dropped, not composited
    if name in ("palette.png", "palette_transparent.png"):
        palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
        indices = rng.integers(0, 16, (HEIGHT, WIDTH), dtype=np.uint8)
        image = Image.fromarray(indices, mode="P")
        image.putpalette(palette.flatten().tolist())
        image.save(path, **({"transparency": 3} if "transparent" in name else {}))
        assert Image.open(path).mode == "P"
        return path, palette[indices]  # a transparent entry keeps its colour
    if name == "cmyk.jpg":
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8), mode="CMYK").save(path, quality=95)
        with Image.open(path) as image:
            assert image.mode == "CMYK"
            return path, np.asarray(image.convert("RGB"))
    if name in ("exif_rotated.jpg", "exif_rotated.png"):
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        Image.fromarray(_rgb8(rng)).save(path, exif=exif)
        with Image.open(path) as image:
            assert image.getexif()[ORIENTATION] == 6 and image.size == (WIDTH, HEIGHT)
            return path, np.asarray(image.convert("RGB"))  # as stored: the tag is not applied
    raise AssertionError(name)


NAMES = ["rgb8.png", "gray16.png", "gray16.tif", "int32.tif", "gray8.png", "gray_alpha.png", "palette.png",
         "palette_transparent.png", "cmyk.jpg", "exif_rotated.jpg", "exif_rotated.png"]


def prep_pixels(path: Path) -> np.ndarray:
    array, original = preprocess.load_image(str(path), SIZE)
    assert original == (WIDTH, HEIGHT)
    return array


def loader_pixels(path: Path) -> np.ndarray:
    return decode_view(path.read_bytes(), SIZE, SIZE, "bicubic", None, False, False).transpose(1, 2, 0)


@pytest.mark.parametrize("name", NAMES)
def test_prep_and_tokenizer_training_decode_alike(tmp_path, name):
    path, expected = write(tmp_path, name)
    prep, loader = prep_pixels(path), loader_pixels(path)
    assert prep.dtype == loader.dtype == np.uint8 and prep.shape == loader.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(prep, loader)
    np.testing.assert_array_equal(prep, expected[:, LEFT : LEFT + SIZE])


def test_the_16_bit_rule_is_round_v_over_257_not_pillows_clip():
    values = _sixteen_bit_values()
    expected = _round_div_257(values)
    np.testing.assert_array_equal(np.asarray(image_decoding.to_rgb(Image.fromarray(values))), expected)
    np.testing.assert_array_equal(np.asarray(image_decoding.to_rgb(Image.fromarray(values.astype(np.int32)))), expected)
    # the rule matters: Pillow's own conversion gives other pixels, so the test above can fail
    assert not np.array_equal(np.asarray(Image.fromarray(values).convert("RGB")), expected)


def test_exif_orientation_is_ignored_by_both_paths(tmp_path):
    """Rotating by the tag (what ImageOps.exif_transpose does) would turn the 12 x 8 image into
    8 x 12 and crop other pixels; neither path does it, like torchvision's and VAR's pil_loader."""
    path, stored = write(tmp_path, "exif_rotated.png")
    with Image.open(path) as image:
        rotated = np.asarray(image.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert rotated.shape == (WIDTH, HEIGHT, 3)
    top = (WIDTH - SIZE) // 2
    for pixels in (prep_pixels(path), loader_pixels(path)):
        np.testing.assert_array_equal(pixels, stored[:, LEFT : LEFT + SIZE])
        assert not np.array_equal(pixels, rotated[top : top + SIZE])


def test_one_extension_list_and_one_rgb_rule():
    assert sources.IMAGE_EXTENSIONS is image_sources.IMAGE_EXTENSIONS is image_decoding.IMAGE_EXTENSIONS
    assert preprocess.to_rgb is image_decoding.to_rgb
    assert image_decoding.is_image_name("a/B.JPEG") and not image_decoding.is_image_name(".hidden.png")
    assert not image_decoding.is_image_name("labels.txt")
