"""Listing the images of a dataset: class-per-folder trees (ImageNet ``train/``, ``val/``
reorganised into synset folders, any ImageFolder dataset) and ImageNet's flat ``val/`` folder
with a ground-truth file.

Class indices follow the sorted class-folder names (torchvision's ImageFolder rule), so
``n01440764`` is class 0 of ImageNet. Files whose extension is not an image's are ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mvar_dist.image_decoding import IMAGE_EXTENSIONS, is_image_name
from mvar_dist.shards.format import unique_keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    relative_path: str  # to the source root, '/'-separated: the stable identity of an image
    label: int
    key: str


@dataclass(frozen=True)
class ImageSource:
    root: Path
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...]  # in shard order


def class_folders(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected <root>/<class>/<image> (or pass --val-labels for a flat folder)")
    return classes


def _assign_keys(paths_and_labels: list[tuple[str, int]]) -> list[ImageRecord]:
    """Records with keys unique over the whole split (see :func:`unique_keys` for the rule)."""
    keys = unique_keys([path for path, _ in paths_and_labels])
    return [ImageRecord(path, label, key) for (path, label), key in zip(paths_and_labels, keys)]


def shard_order(records: list[ImageRecord], seed: int | None) -> tuple[ImageRecord, ...]:
    """Sorted by path, then (seed not None) shuffled by a hash of (seed, path): the order does not
    depend on the file system or the numpy version, and classes mix across shards, which the
    loader's window shuffle relies on."""
    records = sorted(records, key=lambda r: r.relative_path)
    if seed is None:
        return tuple(records)
    return tuple(sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.relative_path}".encode()).digest()))


def list_class_folder(root: str | Path, classes: tuple[str, ...] | None = None, seed: int | None = 0) -> ImageSource:
    """All images of ``root/<class>/**``; ``classes`` (e.g. the train split's) fixes the class list."""
    root = Path(root)
    found = class_folders(root)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders not in the class list: {unknown[:5]}")
    index = {name: i for i, name in enumerate(classes)}
    items: list[tuple[str, int]] = []
    ignored = 0
    for name in found:
        for directory, subdirs, files in os.walk(root / name):
            subdirs.sort()
            for file in files:
                if is_image_name(file):
                    items.append((Path(directory, file).relative_to(root).as_posix(), index[name]))
                else:
                    ignored += 1
    if ignored:
        logger.info("%s: ignored %d files without an image extension", root, ignored)
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return ImageSource(root, tuple(classes), shard_order(_assign_keys(items), seed))


def read_label_file(path: str | Path) -> list[tuple[str | None, str]]:
    """Lines of ``<image> <class>`` (space, tab or comma separated; Kaggle's LOC_val_solution.csv,
    whose second field starts with the synset, works), or one ``<class>`` per line in sorted image
    order. Returns (image stem or None, class name) pairs."""
    pairs: list[tuple[str | None, str]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = [f for f in re.split(r"[\s,]+", line.strip()) if f]
        if not fields or (number == 1 and fields[0].lower() in ("imageid", "image", "filename")):
            continue
        if len(fields) == 1:
            pairs.append((None, fields[0]))
        else:
            pairs.append((fields[0].rsplit(".", 1)[0] if is_image_name(fields[0]) else fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"label file {path} has no labels")
    if len({stem is None for stem, _ in pairs}) > 1:
        raise ValueError(f"label file {path} mixes '<image> <class>' lines with '<class>' lines")
    return pairs


def list_flat_folder(
    root: str | Path, label_file: str | Path, classes: tuple[str, ...] | None = None, seed: int | None = 0
) -> ImageSource:
    """ImageNet's flat ``val/`` folder plus a label file. Classes are ``classes`` (pass the train
    split's so indices agree) or the sorted class names of the label file. Integer labels
    (the devkit's ILSVRC ids) are not accepted: their order is not the sorted synset order."""
    root = Path(root)
    files = sorted(f for f in os.listdir(root) if is_image_name(f))
    if not files:
        raise ValueError(f"no images found in flat folder {root}")
    pairs = read_label_file(label_file)
    if pairs[0][0] is None:
        if len(pairs) != len(files):
            raise ValueError(f"{label_file} has {len(pairs)} labels but {root} has {len(files)} images")
        by_stem = {f.rsplit(".", 1)[0]: name for f, (_, name) in zip(files, pairs)}
    else:
        by_stem = {stem: name for stem, name in pairs}
    if all(name.isdigit() for name in by_stem.values()):
        raise ValueError(
            f"{label_file} holds integer labels; give class names (synsets) instead, e.g. Kaggle's "
            "LOC_val_solution.csv, or '<image> <synset>' lines"
        )
    classes = classes or tuple(sorted(set(by_stem.values())))
    index = {name: i for i, name in enumerate(classes)}
    items, missing = [], []
    for file in files:
        name = by_stem.get(file.rsplit(".", 1)[0])
        if name is None:
            missing.append(file)
        elif name not in index:
            raise ValueError(f"{label_file}: class {name!r} of {file} is not in the class list")
        else:
            items.append((file, index[name]))
    if missing:
        raise ValueError(f"{label_file} has no label for {len(missing)} images of {root}, e.g. {missing[:3]}")
    return ImageSource(root, tuple(classes), shard_order(_assign_keys(items), seed))
