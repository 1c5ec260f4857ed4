"""Where the images of a tokenizer-training split live: an index with one entry per image, built
once when the loader starts, and reading one image's bytes by its global index.

Two kinds of source (the ``data.train`` / ``data.val`` value decides which):

- An image folder. With class sub-folders, class ``i`` is the ``i``-th sorted sub-folder name
  (torchvision's ImageFolder rule, the rule ``mvar-dist prep`` uses too) and its images are found
  recursively; images at the top level beside class folders are ignored (logged). A folder with no
  sub-folder is flat: all of its images are class 0. Files are those with an image extension
  (hidden files ignored), in sorted path order.
- Local WebDataset tar shards of images: a ``.tar`` path, a brace pattern such as
  ``/data/train-{000000..000099}.tar``, or a list of those. A sample is the members sharing a key:
  one image (``{key}.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...) and optionally ``{key}.cls``, a
  decimal class index; other members (``.json``, ``.txt``) are ignored. Only tar headers are
  read (memory-mapped), never image bytes, so indexing costs a few pages per sample.

Why remote URLs (``s3://``, ``https://``, ``pipe:``) are refused: training draws samples in a
random global order (a permutation of all images each epoch, see :mod:`mvar_dist.images.loader`),
which needs random access to any sample by byte offset. Streams can only be read front to back;
the code loader copes by reading whole shards in a shuffle window, but an image shard is 100x
larger than a code shard. Copy the shards to local disk or a shared file system.

The index is numpy arrays plus one bytes blob of names, not Python lists: DataLoader workers
forked from the main process then share it without copy-on-write page faults, and it pickles
fast where workers are spawned.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from mvar_dist.image_decoding import IMAGE_EXTENSIONS, is_image_name
from mvar_dist.shards import read_errors
from mvar_dist.shards.read_errors import BadDataError
from mvar_dist.shards.tar_reader import member_offsets

logger = logging.getLogger(__name__)

_IMAGE_FIELDS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_REMOTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|pipe:)")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` alternatives; several and
    nested groups. Zero-padded ranges keep the wider end's width (WebDataset's braceexpand rule).
    Unmatched braces or a group that is neither a range nor a list stay literal."""
    depth, start = 0, -1
    for position, char in enumerate(pattern):
        if char == "{":
            depth, start = depth + 1, position if depth == 0 else start
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : position], pattern[position + 1 :]
                if match := _RANGE.match(body):
                    low, high = match.groups()
                    padded = any(len(e.lstrip("-")) > 1 and e.lstrip("-")[0] == "0" for e in (low, high))
                    width = max(len(low), len(high)) if padded else 0
                    step = 1 if int(high) >= int(low) else -1
                    options = [str(n).zfill(width) for n in range(int(low), int(high) + step, step)]
                else:
                    options, level, part = [], 0, ""
                    for c in body:  # split at top-level commas only
                        level += (c == "{") - (c == "}")
                        if c == "," and level == 0:
                            options.append(part)
                            part = ""
                        else:
                            part += c
                    options.append(part)
                    if len(options) == 1:  # "{abc}": literal, expand what follows
                        return [head + "{" + e for e in expand_braces(body + "}" + tail)]
                return [e for option in options for e in expand_braces(head + option + tail)]
    return [pattern]


def check_local(field_name: str, value: str) -> str:
    """``value`` without a ``file://`` prefix; ValueError for remote URLs (see the module docstring)."""
    if value.startswith("file://"):
        return value[len("file://") :]
    if _REMOTE.match(value):
        raise ValueError(
            f"{field_name}={value!r}: remote shards are not supported by the image loader; it reads samples in a "
            "random global order by byte offset, which a stream cannot give. Copy the shards to a local or shared "
            "file system and give their path"
        )
    return value


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """One entry per image: where its bytes are and its class. Entry ``i`` is global sample ``i``."""

    location: str  # the config value, for messages
    kind: Literal["folder", "shards"]
    containers: tuple[str, ...]  # folder: (root,); shards: the shard paths
    container: np.ndarray  # (N,) int32 index into containers
    offsets: np.ndarray  # (N,) int64 first payload byte in the shard (folder: 0)
    sizes: np.ndarray  # (N,) int64 payload bytes (folder: -1, the whole file)
    labels: np.ndarray  # (N,) int64; -1: the shard sample's .cls is missing or not a number (bad when read)
    names: bytes  # utf-8 names end to end: path relative to the root (folder) or key (shards)
    name_ends: np.ndarray  # (N,) int64 end of name i in ``names``
    classes: tuple[str, ...] = ()  # class-folder names; () for flat folders and shards

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) or int(max(self.labels.max(initial=0), 0)) + 1

    def name(self, i: int) -> str:
        begin = int(self.name_ends[i - 1]) if i else 0
        return self.names[begin : int(self.name_ends[i])].decode()

    def describe(self, i: int) -> str:
        """Where sample ``i`` is, for error messages: the file, or the shard and key."""
        if self.kind == "folder":
            return f"file {os.path.join(self.containers[0], self.name(i))}"
        return f"shard {self.containers[int(self.container[i])]}, key {self.name(i)}"

    @cached_property
    def fingerprint(self) -> str:
        """A hash of names, labels and (shards) member sizes: equal on every rank that sees the same
        data. Stored in the loader state, so resuming on other data is refused. File contents are
        not hashed (a folder's sizes are not even read: one stat per image is slow on shared file
        systems), so an image rewritten in place goes unnoticed."""
        digest = hashlib.sha256(self.names)
        for array in (self.sizes, self.labels):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


def _index(location: str, kind: Literal["folder", "shards"], containers: tuple[str, ...], rows: list[tuple[int, int, int, int, str]],
           classes: tuple[str, ...] = ()) -> ImageIndex:
    encoded = [r[4].encode() for r in rows]
    column = lambda j, dtype: np.array([r[j] for r in rows], dtype=dtype)  # noqa: E731
    return ImageIndex(location, kind, containers, column(0, np.int32), column(1, np.int64), column(2, np.int64),
                      column(3, np.int64), b"".join(encoded), np.cumsum([len(e) for e in encoded], dtype=np.int64), classes)


def _walk_images(root: str, relative: str) -> list[str]:
    """Image paths under ``root/relative`` relative to ``root``, sorted, recursively."""
    found, folders = [], []
    with os.scandir(os.path.join(root, relative)) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir():
                folders.append(path)
            elif is_image_name(entry.name):
                found.append(path)
    for folder in folders:
        found.extend(_walk_images(root, folder))
    return sorted(found)


def index_folder(root: str, classes: tuple[str, ...] | None = None, location: str | None = None) -> ImageIndex:
    """The images of a class-per-folder or flat folder (see the module docstring). ``classes``
    (e.g. the train split's) fixes the class list, so that validation indices agree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
    if not found:  # flat folder: one class
        rows = [(0, 0, -1, 0, path) for path in _walk_images(root, "")]
        classes = ()
    else:
        classes = classes or found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{root} has class folders not in the class list: {unknown[:5]}")
        top = [e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name)]
        if top:
            logger.warning("%s: ignored %d images beside the class folders (e.g. %s)", root, len(top), top[0])
        number = {name: i for i, name in enumerate(classes)}
        rows = [(0, 0, -1, number[name], path) for name in found for path in _walk_images(root, name)]
    if not rows:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return _index(location or root, "folder", (root,), rows, tuple(classes))


def _read_label(view: mmap.mmap | bytes, start: int, size: int) -> int:
    try:
        label = int(bytes(view[start : start + size]).decode().strip())
    except (ValueError, UnicodeDecodeError):
        return -1
    return label if label >= 0 else -1


def _index_shard(number: int, path: str, bad_data: str) -> tuple[list[tuple[int, int, int, int, str]], int]:
    """The shard's index rows, and how many of its samples have a .cls member."""
    rows: list[tuple[int, int, int, int, str]] = []
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            try:
                members, problem = member_offsets(view, require_end=True)
            except UnicodeDecodeError as error:
                members, problem = [], f"corrupt tar member name: {error}"
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            for name, start, length in members:
                dot = name.find(".", name.rfind("/") + 1)
                if dot > 0:
                    samples.setdefault(name[:dot], {})[name[dot + 1 :].lower()] = (start, length)
            labelled = ignored = 0
            for key, fields in samples.items():
                image = next((fields[f] for f in _IMAGE_FIELDS if f in fields), None)
                if image is None:
                    ignored += 1
                    continue
                label = _read_label(view, *fields["cls"]) if "cls" in fields else -1
                labelled += "cls" in fields
                rows.append((number, image[0], image[1], label, key))
        finally:
            if isinstance(view, mmap.mmap):
                view.close()
    if ignored:
        logger.warning("shard %s: ignored %d keys without an image member", path, ignored)
    if problem:
        if bad_data == "fail":
            raise BadDataError(f"shard {path}: {problem} (set data.bad_data='skip' to use the samples before it)")
        logger.warning("shard %s: %s; using the %d samples before it", path, problem, len(rows))
    return rows, labelled


def index_shards(paths: list[str], bad_data: Literal["skip", "fail"] = "skip", location: str | None = None) -> ImageIndex:
    """The samples of local tar shards, in shard order then member order. A shard that cannot be
    opened raises (after the reader's retries) under either policy: a rank that skipped it would
    disagree with the others about every sample's global index. Without any ``.cls`` member all
    labels are 0 (unconditional data); with some, a sample lacking one is bad when read."""
    rows: list[tuple[int, int, int, int, str]] = []
    labelled = 0
    for number, path in enumerate(paths):
        if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
            raise ValueError(f"shard {path} is compressed: random access needs plain .tar shards")
        for attempt, delay in enumerate((*read_errors.READ_RETRY_DELAYS_S, None)):
            try:
                shard_rows, shard_labelled = _index_shard(number, path, bad_data)
                break
            except FileNotFoundError:
                raise FileNotFoundError(f"image shard {path} does not exist") from None
            except OSError as error:
                if delay is None:
                    raise OSError(f"cannot index image shard {path}: {error} (gave up after {attempt + 1} tries)") from error
                logger.warning("indexing shard %s failed (%s); trying again in %.1f s", path, error, delay)
                time.sleep(delay)
        rows.extend(shard_rows)
        labelled += shard_labelled
    if not rows:
        raise ValueError(f"no image samples in {len(paths)} shard(s) {paths[:3]}")
    if labelled == 0:
        logger.info("%s: no .cls members; all labels are 0", location or paths[0])
        rows = [(r[0], r[1], r[2], 0, r[4]) for r in rows]
    return _index(location or paths[0], "shards", tuple(paths), rows)


def open_source(spec: str | list[str], field_name: str, bad_data: Literal["skip", "fail"] = "skip",
                classes: tuple[str, ...] | None = None) -> ImageIndex:
    """The index of ``data.train`` / ``data.val``: a folder, a .tar path or brace pattern, or a list
    of those (shards). ``field_name`` names the config field in errors."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise ValueError(f"{field_name} must be a folder, a .tar pattern or a list of .tar patterns, got {spec!r}")
    location = spec if isinstance(spec, str) else f"{specs[0]} (+{len(specs) - 1})"
    local = [check_local(field_name, s) for s in specs]
    if len(local) == 1 and os.path.isdir(local[0]):
        return index_folder(local[0], classes, location)
    paths = [p for s in local for p in expand_braces(s)]
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise ValueError(f"{field_name}: {folders[0]} is a folder; give a single folder, or .tar shards")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{field_name}: {len(missing)} of {len(paths)} shard(s) do not exist, e.g. {missing[0]} (from {location!r})")
    return index_shards(paths, bad_data, location)


@dataclass
class SampleReader:
    """Reads sample bytes by global index; keeps up to ``max_open`` shard files open per process.
    ``os.pread`` reads at an offset without moving a shared file position, so a descriptor that a
    forked worker inherited is still safe to use."""

    index: ImageIndex
    max_open: int = 32
    _files: OrderedDict[int, int] = field(default_factory=OrderedDict, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)

    def __getstate__(self) -> dict:
        return {"index": self.index, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: keep the parent's descriptors out of our LRU
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.max_open:
            os.close(self._files.popitem(last=False)[1])
        descriptor = self._files[shard] = os.open(self.index.containers[shard], os.O_RDONLY)
        return descriptor

    def _read_once(self, i: int) -> bytes:
        if self.index.kind == "folder":
            with open(os.path.join(self.index.containers[0], self.index.name(i)), "rb") as file:
                return file.read()
        shard, size = int(self.index.container[i]), int(self.index.sizes[i])
        data = os.pread(self._fd(shard), size, int(self.index.offsets[i]))
        if len(data) != size:
            raise EOFError(f"read {len(data)} of {size} bytes (shard changed since indexing?)")
        return data

    def read(self, i: int) -> bytes:
        """Sample ``i``'s image bytes; an OSError is retried after each delay of
        read_errors.READ_RETRY_DELAYS_S, then raised with the number of tries."""
        delays = read_errors.READ_RETRY_DELAYS_S
        for attempt in range(len(delays) + 1):
            try:
                return self._read_once(i)
            except OSError as error:
                stale = self._files.pop(int(self.index.container[i]), None)  # reopen: it may be stale
                if stale is not None:
                    os.close(stale)
                if attempt == len(delays):
                    raise OSError(f"{error} (gave up after {attempt + 1} tries)") from error
                logger.warning("reading %s failed (%s); trying again in %.1f s", self.index.describe(i), error, delays[attempt])
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")
