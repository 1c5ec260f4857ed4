"""Checking code shards against their manifest (``mvar-dist verify-shards``).

Per shard: the file exists and its size and sha256 match the manifest; it parses as a tar to
its end; it holds exactly the manifest's number of samples, with unique keys; every sample has
``cls``, ``codes.u16`` and ``json``, codes of length 2 x L with every code < V, a class index
< num_classes. Every bad shard is reported by name with its first problem.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mvar_dist.shards.format import CLS_FIELD, CODES_FIELD, FIELDS, decode_codes, decode_label
from mvar_dist.shards.manifest import Manifest, load_manifest
from mvar_dist.shards.tar_reader import ShardReadError, iter_samples

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    manifest: str
    shards_checked: int = 0
    samples_checked: int = 0
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard name -> problem

    @property
    def ok(self) -> bool:
        return not self.bad_shards


class _HashingReader:
    """File wrapper that hashes every byte read, so one pass both parses and checksums."""

    def __init__(self, url: str) -> None:
        import webdataset  # opens local paths and the URLs a training run could use

        self._file = webdataset.gopen(url, "rb")
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def finish(self) -> None:
        for block in iter(lambda: self.read(1 << 20), b""):
            pass
        self._file.close()


def check_shard(manifest: Manifest, index: int) -> tuple[int, str | None]:
    """(samples read, first problem or None) for shard ``index`` of ``manifest``."""
    entry, path = manifest.shards[index], manifest.shard_urls[index]
    if "://" not in path and not path.startswith("pipe:") and not Path(path).is_file():
        return 0, "file is missing"
    try:
        reader = _HashingReader(path)
    except OSError as error:
        return 0, f"cannot open: {error}"
    count, keys, problem = 0, set(), None
    try:
        for sample in iter_samples(reader):
            count += 1
            if sample.key in keys:
                problem = problem or f"duplicate key {sample.key}"
            keys.add(sample.key)
            missing = [f for f in FIELDS if f not in sample.fields]
            try:
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
                decode_codes(sample.fields[CODES_FIELD], int(manifest.num_tokens), int(manifest.vocab_size))
                decode_label(sample.fields[CLS_FIELD], int(manifest.num_classes))
            except ValueError as error:
                problem = problem or f"sample {sample.key}: {error}"
    except ShardReadError as error:
        problem = f"unreadable after {count} samples: {error}"
    reader.finish()
    if problem:
        return count, problem
    if reader.size != entry["bytes"]:
        return count, f"{reader.size} bytes, manifest says {entry['bytes']}"
    if reader.digest.hexdigest() != entry["sha256"]:
        return count, "sha256 differs from the manifest"
    if count != entry["num_samples"]:
        return count, f"{count} samples, manifest says {entry['num_samples']}"
    return count, None


def verify_manifest(path: str | Path) -> VerifyReport:
    manifest = load_manifest(path)
    report = VerifyReport(str(path))
    if len(manifest.shards) != manifest.num_shards or sum(manifest.shard_counts) != manifest.num_samples:
        report.bad_shards["<manifest>"] = "shard list does not add up to num_shards / num_samples"
    for index, entry in enumerate(manifest.shards):
        count, problem = check_shard(manifest, index)
        report.shards_checked += 1
        report.samples_checked += count
        if problem:
            report.bad_shards[entry["name"]] = problem
            logger.error("BAD %s: %s", entry["name"], problem)
    return report
