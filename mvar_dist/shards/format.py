"""The on-disk format of one code sample: its fields, key derivation, encoding and decoding, and
``ShardWriter``, which writes samples to a tar shard byte-for-byte reproducibly.

A sample is three tar members sharing a key (WebDataset convention ``<key>.<field>``):

- ``<key>.cls``: the class index, ASCII decimal.
- ``<key>.codes.u16``: raw little-endian uint16, shape (2, L): row 0 the image, row 1 its
  horizontal flip; each row is all scales concatenated coarse to fine (ScaleLayout order).
- ``<key>.json``: ``{"path": <source path relative to the dataset root>, "size": [w, h]}``.

Raw bytes decode with one ``np.frombuffer`` (no header to parse). Reading is in
:mod:`mvar_dist.shards.tar_reader`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from typing import BinaryIO, Sequence

import numpy as np

CLS_FIELD = "cls"
CODES_FIELD = "codes.u16"
META_FIELD = "json"
FIELDS = (CLS_FIELD, CODES_FIELD, META_FIELD)
CODES_DTYPE = np.dtype("<u2")
NUM_VIEWS = 2  # the image and its horizontal flip

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]")
_MAX_KEY_CHARS = 80  # leaves room for the longest field suffix within ustar's 100-char name


def key_from_path(relative_path: str) -> str:
    """A WebDataset key for a source image: its relative path without extension, every
    character outside ``[A-Za-z0-9_-/]`` percent-encoded (WebDataset splits keys at the first
    dot). Keys too long for a tar name end in a hash of the full path instead."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    key = _UNSAFE_KEY_CHARS.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), stem)
    if len(key) > _MAX_KEY_CHARS:
        key = key[: _MAX_KEY_CHARS - 17].rstrip("%") + "_" + hashlib.sha1(relative_path.encode()).hexdigest()[:16]
    return key


def _with_extension(relative_path: str) -> str:
    """The key of a path whose stem other files share (``a.jpg`` next to ``a.png``): the
    extension becomes part of the key (``a_jpg``)."""
    return key_from_path(relative_path.replace(".", "_"))


def _hashed_key(relative_path: str, attempt: int) -> str:
    """A key that ends in a hash of the path (and of ``attempt``, to step past a name that is taken)."""
    digest = hashlib.sha1(f"{attempt}:{relative_path}".encode()).hexdigest()[:16]
    return _with_extension(relative_path)[: _MAX_KEY_CHARS - 17].rstrip("%") + "_" + digest


def unique_keys(relative_paths: Sequence[str]) -> list[str]:
    """One distinct key per path (the paths must be distinct), whatever the names:

    1. a path whose :func:`key_from_path` no other path shares keeps it;
    2. paths sharing one (``a.jpg``, ``a.png``) put the extension into the key (``a_jpg``,
       ``a_png``) where that key is still free and no other path of this step makes it too;
    3. the rest (``a.jpg`` next to a file ``a_jpg.png``, whose key is ``a_jpg``) get a key ending
       in a hash of the path, stepping on until it is free.

    Steps 1 and 2 are the rule of earlier versions, so names that never collided keep their keys.
    The result does not depend on the order of the paths (step 3 goes in sorted order).
    """
    if len(set(relative_paths)) != len(relative_paths):
        duplicates = sorted(p for p, n in Counter(relative_paths).items() if n > 1)
        raise ValueError(f"image paths listed more than once: {duplicates[:3]}")
    plain = [key_from_path(p) for p in relative_paths]
    shared = Counter(plain)
    keys: list[str | None] = [k if shared[k] == 1 else None for k in plain]
    taken = {k for k in keys if k is not None}
    pending = sorted((p, i) for i, p in enumerate(relative_paths) if keys[i] is None)
    second = Counter(_with_extension(p) for p, _ in pending)
    for path, index in pending:
        key = _with_extension(path)
        if second[key] == 1 and key not in taken:
            keys[index] = key
            taken.add(key)
    for path, index in pending:
        if keys[index] is None:
            attempt = 0
            while (key := _hashed_key(path, attempt)) in taken:
                attempt += 1
            keys[index] = key
            taken.add(key)
    return [k for k in keys if k is not None]


def encode_codes(codes: np.ndarray) -> bytes:
    """(2, L) integer codes -> the bytes of ``<key>.codes.u16``."""
    if codes.ndim != 2 or codes.shape[0] != NUM_VIEWS:
        raise ValueError(f"codes must have shape (2, L), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(CODES_DTYPE).max):
        raise ValueError("codes do not fit in uint16")
    return np.ascontiguousarray(codes, dtype=CODES_DTYPE).tobytes()


def decode_codes(data: bytes, num_tokens: int, vocab_size: int) -> np.ndarray:
    """Bytes of ``codes.u16`` -> (2, L) uint16 array; ValueError if the length or a code is wrong."""
    expected = NUM_VIEWS * num_tokens * CODES_DTYPE.itemsize
    if len(data) != expected:
        raise ValueError(f"codes have {len(data)} bytes, expected {expected} (2 x {num_tokens} uint16)")
    codes = np.frombuffer(data, dtype=CODES_DTYPE).reshape(NUM_VIEWS, num_tokens)
    high = int(codes.max()) if codes.size else 0
    if high >= vocab_size:
        raise ValueError(f"code {high} is out of range for vocab_size {vocab_size}")
    return codes


def decode_label(data: bytes, num_classes: int) -> int:
    label = int(data)
    if not 0 <= label < num_classes:
        raise ValueError(f"class index {label} is out of range for {num_classes} classes")
    return label


def encode_meta(relative_path: str, size: tuple[int, int]) -> bytes:
    return json.dumps({"path": relative_path, "size": list(size)}, separators=(",", ":")).encode()


class ShardWriter:
    """Writes samples to a tar file with fixed member metadata, so equal inputs give equal bytes."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, label: int, codes: np.ndarray, meta: bytes) -> None:
        for field, data in ((CLS_FIELD, str(int(label)).encode()), (CODES_FIELD, encode_codes(codes)), (META_FIELD, meta)):
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
