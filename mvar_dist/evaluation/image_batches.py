"""Image batches of the ADM evaluator's ``.npz`` files (``arr_0``: uint8 (N, H, W, 3)), read
without loading 50,000 images at once: an uncompressed member (what ``mvar-dist sample --npz``
and ``numpy.savez`` write) is memory-mapped in place; a compressed one is read whole.

Also the reference batch (``VIRTUAL_imagenet256_labeled.npz``): its images and, used as they
are, its precomputed ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mvar_dist.evaluation.statistics import FeatureStatistics

IMAGES_KEY = "arr_0"


def _member_array(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    info = archive.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            shape, fortran, dtype = _header(member, version)
            header_end = member.tell()
        # the member's data starts after the local file header, whose extra field may differ
        # from the central directory's: read its lengths from the file itself
        with open(path, "rb") as raw:
            raw.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(raw.read(4), dtype="<u2")
        offset = info.header_offset + 30 + int(name_length) + int(extra_length) + header_end
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _header(member: object, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"npy format version {version} is not supported")


def read_npz_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of ``path`` as uint8 (N, H, W, 3), memory-mapped when stored uncompressed;
    ValueError naming the file when it is not such an array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{IMAGES_KEY}.npy" not in archive.namelist():
                raise ValueError(f"{path} has no {IMAGES_KEY} (it holds {sorted(archive.namelist())})")
            images = _member_array(path, archive, f"{IMAGES_KEY}.npy")
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file (a zip archive of .npy arrays)") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"{path}: {IMAGES_KEY} must be uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    return images


@dataclass(frozen=True)
class ReferenceBatch:
    """The reference batch: its images and, when it has them, its precomputed statistics."""

    path: Path
    images: np.ndarray
    pool: FeatureStatistics | None
    spatial: FeatureStatistics | None


def _statistics(arrays: np.lib.npyio.NpzFile, mu: str, sigma: str, dim: int, path: Path) -> FeatureStatistics | None:
    if mu not in arrays.files and sigma not in arrays.files:
        return None
    if mu not in arrays.files or sigma not in arrays.files:
        raise ValueError(f"reference batch {path} has only one of {mu}/{sigma}")
    stats = FeatureStatistics(np.asarray(arrays[mu], dtype=np.float64), np.asarray(arrays[sigma], dtype=np.float64))
    if stats.mu.shape != (dim,) or stats.sigma.shape != (dim, dim):
        raise ValueError(f"reference batch {path}: {mu} {stats.mu.shape} / {sigma} {stats.sigma.shape} are not "
                         f"({dim},) / ({dim}, {dim}), the Inception features' size")
    return stats


def read_reference(path: str | Path, pool_dim: int = 2048, spatial_dim: int = 2023) -> ReferenceBatch:
    """The reference batch ``path``: ``arr_0`` images, ``mu``/``sigma`` and ``mu_s``/``sigma_s``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} does not exist (e.g. VIRTUAL_imagenet256_labeled.npz "
                                f"from the ADM evaluator's page; nothing is downloaded)")
    images = read_npz_images(path)
    with np.load(path, allow_pickle=False) as arrays:
        pool = _statistics(arrays, "mu", "sigma", pool_dim, path)
        spatial = _statistics(arrays, "mu_s", "sigma_s", spatial_dim, path)
    return ReferenceBatch(path, images, pool, spatial)
