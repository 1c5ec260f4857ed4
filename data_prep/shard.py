"""Tokenize an image source into tar shards of codes: deterministic, resumable, scale-out.

Image ``i`` of the source's (sorted, hash-shuffled) list goes to shard ``i // shard_size``;
task ``t`` of ``T`` writes the shards ``s`` with ``s % T == t``. Tasks therefore never
coordinate, and the shards do not depend on how many tasks wrote them. A shard is written under
a temporary name and renamed when complete; then its record ``_records/<shard>.json``
(sample count, sha256, skipped images) is written the same way. A shard counts as done when its
record exists: reruns skip it, and rewrite shards whose record is missing.

A task owns its shards and their records, and nothing else: when it starts it removes the
temporary files that a killed write of any of them left (``.<name>.<random>.tmp``); the merge
removes the rest (the manifest's, ``prep.json``'s, and any a task did not get to clean).

``stop`` (e.g. set by SIGUSR2/SIGTERM, see :mod:`mvar_dist.data_prep.pipeline`) is polled before
every tokenizer batch: when it turns true the shard in progress is dropped (its temporary file
removed), the finished shards and their records stay, and the summary says ``stopped``.

The tokenizer is any :class:`~mvar_dist.tokenizer.Tokenizer` (``img_to_codes``, ``vocab_size``,
``patch_nums``, ``image_size`` and ``identity()`` are what prep uses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

import mvar_dist
from mvar_dist.atomic import write_json, write_via_temp
from mvar_dist.data_prep import preprocess
from mvar_dist.data_prep.sources import ImageRecord, ImageSource
from mvar_dist.shards.format import CODES_DTYPE, ShardWriter, encode_meta
from mvar_dist.shards.manifest import PLAIN_NAME_RULE, is_plain_name
from mvar_dist.state_files import file_sha256
from mvar_dist.tokenizer.base import Tokenizer

logger = logging.getLogger(__name__)

RECORDS_DIR = "_records"
PREP_FILE = "prep.json"


@dataclass
class ShardRunSummary:
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already complete
    images_written: int = 0
    images_failed: int = 0
    stopped: bool = False  # stop() turned true: the shard in progress was dropped, the rest not started


class _Stopped(Exception):
    """Raised inside a shard's write when ``stop()`` turns true, so that the write is abandoned."""


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


def check_shard_names(name: str, split: str) -> None:
    """Refuse a ``--name``/``--split`` whose shard names a manifest could not hold (see
    :func:`mvar_dist.shards.manifest.is_plain_name`), before anything is written."""
    example = shard_name(name, split, 0)
    if not is_plain_name(example) or not is_plain_name(split):
        raise ValueError(
            f"--name {name!r} and --split {split!r} make the shard name {example!r} (in directory {split!r}), which is "
            f"not a plain file name ({PLAIN_NAME_RULE})"
        )


def leftovers_of(directory: Path, names: Iterable[str]) -> list[Path]:
    """The temporary files that killed atomic writes of ``directory/<name>`` left, for each of
    ``names``: ``.<name>.<random>.tmp`` (see :func:`mvar_dist.atomic.temporary_sibling`) and the
    ``<name>.tmp`` of earlier versions. One scan of the directory, where
    :func:`mvar_dist.atomic.remove_leftovers` would glob it once per name (thousands of shards)."""
    wanted = set(names)
    if not directory.is_dir():
        return []
    found = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(".tmp") or not entry.is_file(follow_symlinks=False):
            continue
        stem = entry.name[: -len(".tmp")]
        # mkstemp's random part has no dot: '.<name>.<random>' -> '<name>'
        if (entry.name.startswith(".") and stem[1:].rsplit(".", 1)[0] in wanted) or stem in wanted:
            found.append(Path(entry.path))
    return sorted(found)


def remove_leftovers_of(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete :func:`leftovers_of`; only for names this process owns (a live writer's file would go too)."""
    removed = leftovers_of(directory, names)
    for leftover in removed:
        leftover.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted run", leftover)
    return removed


def prep_config(
    source: ImageSource, tokenizer: Tokenizer, name: str, split: str, shard_size: int, order_seed: int | None
) -> dict[str, Any]:
    """Everything that fixes the shards' content; every task of a run must agree on it."""
    listing = hashlib.sha256("\n".join(f"{r.relative_path}\t{r.label}" for r in source.records).encode())
    num_images = len(source.records)
    config = {
        "name": name,
        "split": split,
        "num_images": num_images,
        "listing_sha256": listing.hexdigest(),
        "shard_size": shard_size,
        "num_shards": -(-num_images // shard_size),
        "order_seed": order_seed,
        "classes": list(source.classes),
        "patch_nums": [int(p) for p in tokenizer.patch_nums],
        "vocab_size": int(tokenizer.vocab_size),
        "image_size": int(tokenizer.image_size),
        "preprocessing": preprocess.recipe(int(tokenizer.image_size)),
        "tokenizer": tokenizer.identity(),
        "tool_version": mvar_dist.__version__,
    }
    return json.loads(json.dumps(config))  # plain JSON types, as it will be read back


def _claim_prep_config(split_dir: Path, config: dict[str, Any]) -> None:
    path = split_dir / RECORDS_DIR / PREP_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        differing = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
        if differing:
            raise ValueError(
                f"{split_dir} holds shards of a different prep run (differs in: {', '.join(differing)}); "
                "use another --out directory, or delete it to start over"
            )
        return
    write_json(path, config)


def _device_of(tokenizer: Tokenizer) -> torch.device:
    parameters = getattr(tokenizer, "parameters", None)
    first = next(iter(parameters()), None) if parameters else None
    return first.device if first is not None else torch.device("cpu")


def _load(root: Path, record: ImageRecord, size: int) -> tuple[np.ndarray, tuple[int, int]] | str:
    try:
        return preprocess.load_image(str(root / record.relative_path), size)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip and report"
        return f"{type(error).__name__}: {error}"


@torch.inference_mode()
def tokenize_views(tokenizer: Tokenizer, images: np.ndarray, device: torch.device) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 2, L) uint16 codes of each image and of its horizontal flip."""
    pixels = torch.from_numpy(images if images.flags.writeable else images.copy()).to(device)
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255).mul_(2).sub_(1)
    both = torch.cat([pixels, pixels.flip(dims=[3])])
    codes = torch.cat([c.reshape(c.shape[0], -1) for c in tokenizer.img_to_codes(both)], dim=1)
    batch = images.shape[0]
    return torch.stack([codes[:batch], codes[batch:]], dim=1).cpu().numpy().astype(CODES_DTYPE)


def _write_shard(
    path: Path, loaded: list[tuple[ImageRecord, Future]], tokenizer: Tokenizer, batch_size: int,
    device: torch.device, bar: tqdm, stop: Callable[[], bool],
) -> tuple[int, list[dict[str, str]]]:
    """Write one shard through a temporary file; raises _Stopped (temporary file removed) when
    ``stop()`` turns true before a batch."""
    skipped: list[dict[str, str]] = []
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as f:
            writer = ShardWriter(f)
            for start in range(0, len(loaded), batch_size):
                if stop():
                    raise _Stopped
                good = []
                for record, future in loaded[start : start + batch_size]:
                    result = future.result()
                    if isinstance(result, str):
                        logger.warning("skipping %s: %s", record.relative_path, result)
                        skipped.append({"path": record.relative_path, "reason": result})
                    else:
                        good.append((record, result))
                if good:
                    codes = tokenize_views(tokenizer, np.stack([array for _, (array, _) in good]), device)
                    for (record, (_, size)), sample_codes in zip(good, codes):
                        writer.write(record.key, record.label, sample_codes, encode_meta(record.relative_path, size))
                    count += len(good)
                bar.update(min(batch_size, len(loaded) - start))
            writer.close()

    write_via_temp(path, write)
    return count, skipped


def shard_dataset(
    source: ImageSource,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    name: str,
    split: str,
    shard_size: int = 1000,
    batch_size: int = 64,
    task_id: int = 0,
    num_tasks: int = 1,
    order_seed: int | None = 0,
    decode_threads: int | None = None,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> ShardRunSummary:
    """Write this task's shards of ``source`` into ``out_dir/split``; see the module docstring."""
    stop = stop or (lambda: False)
    check_shard_names(name, split)
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id must be in [0, {num_tasks}), got {task_id}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if tokenizer.vocab_size > np.iinfo(CODES_DTYPE).max + 1:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 code format")
    split_dir = Path(out_dir) / split
    (split_dir / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    config = prep_config(source, tokenizer, name, split, shard_size, order_seed)
    _claim_prep_config(split_dir, config)
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    mine = [s for s in range(config["num_shards"]) if s % num_tasks == task_id]
    owned = [shard_name(name, split, s) for s in mine]
    remove_leftovers_of(split_dir, owned)
    remove_leftovers_of(split_dir / RECORDS_DIR, [f"{shard}.json" for shard in owned])
    todo = [s for s in mine if not (split_dir / RECORDS_DIR / f"{shard_name(name, split, s)}.json").exists()]
    summary = ShardRunSummary(shards_skipped=[shard_name(name, split, s) for s in mine if s not in todo])
    if summary.shards_skipped:
        logger.info("task %d/%d: %d shards already complete, %d to write", task_id, num_tasks, len(summary.shards_skipped), len(todo))
    device, size = _device_of(tokenizer), int(tokenizer.image_size)
    total = sum(len(source.records[s * shard_size : (s + 1) * shard_size]) for s in todo)
    threads = decode_threads or min(8, os.cpu_count() or 1)
    bar = tqdm(total=total, unit="img", disable=not progress, desc=f"{split} task {task_id}")
    with ThreadPoolExecutor(threads) as pool, bar:
        def submit(index: int) -> list[tuple[ImageRecord, Future]]:
            records = source.records[index * shard_size : (index + 1) * shard_size]
            return [(r, pool.submit(_load, source.root, r, size)) for r in records]

        pending = deque(submit(s) for s in todo[:2])  # decode one shard ahead of the tokenizer
        for position, index in enumerate(todo):
            loaded = pending.popleft()
            if position + 2 < len(todo):
                pending.append(submit(todo[position + 2]))
            shard = shard_name(name, split, index)
            try:
                if stop():
                    raise _Stopped
                count, skipped = _write_shard(split_dir / shard, loaded, tokenizer, batch_size, device, bar, stop)
            except _Stopped:
                summary.stopped = True
                pool.shutdown(wait=True, cancel_futures=True)  # decodes queued for later shards are not needed
                break
            record = {
                "shard": shard, "index": index, "num_samples": count, "bytes": (split_dir / shard).stat().st_size,
                "sha256": file_sha256(split_dir / shard), "skipped": skipped, "fingerprint": fingerprint,
            }
            write_json(split_dir / RECORDS_DIR / f"{shard}.json", record)
            summary.shards_written.append(shard)
            summary.images_written += count
            summary.images_failed += len(skipped)
    return summary
