"""Merge step: the per-shard records of all prep tasks -> ``<out>/<split>/manifest.json``
(format: :mod:`mvar_dist.shards.manifest`).

Once every shard is complete no task writes into the split any more, so the merge removes every
temporary file that a killed write left there: the manifest's, ``prep.json``'s, and those of
shards and records whose task did not rerun."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mvar_dist.data_prep.shard import PREP_FILE, RECORDS_DIR, remove_leftovers_of, shard_name
from mvar_dist.scales import ScaleLayout
from mvar_dist.shards.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, SAMPLE_FORMAT, write_manifest

logger = logging.getLogger(__name__)


def merge_manifest(out_dir: str | Path, split: str) -> Path:
    """Check that every shard of the split is complete and write its manifest atomically."""
    split_dir = Path(out_dir) / split
    prep_path = split_dir / RECORDS_DIR / PREP_FILE
    if not prep_path.exists():
        raise FileNotFoundError(f"{prep_path} not found: run 'mvar-dist prep' for split {split!r} into {out_dir} first")
    prep = json.loads(prep_path.read_text())
    fingerprint = hashlib.sha256(json.dumps(prep, sort_keys=True).encode()).hexdigest()
    names = [shard_name(prep["name"], split, i) for i in range(prep["num_shards"])]
    missing = [n for n in names if not (split_dir / RECORDS_DIR / f"{n}.json").exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(names)} shards in {split_dir} are not complete (e.g. {missing[:3]}); "
            "rerun the prep tasks that own them (shard i belongs to task i % num_tasks), then merge again"
        )
    remove_leftovers_of(split_dir, [*names, MANIFEST_NAME])
    remove_leftovers_of(split_dir / RECORDS_DIR, [*(f"{n}.json" for n in names), PREP_FILE])
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        record = json.loads((split_dir / RECORDS_DIR / f"{name}.json").read_text())
        if record["fingerprint"] != fingerprint:
            raise RuntimeError(f"{name} was written by a different prep run than {prep_path}; delete it and rerun its task")
        size = (split_dir / name).stat().st_size if (split_dir / name).exists() else None
        if size != record["bytes"]:
            raise RuntimeError(
                f"{split_dir / name} is missing or has {size} bytes, its record says {record['bytes']}; "
                "delete its record and rerun its task"
            )
        shards.append({k: record[k] for k in ("num_samples", "sha256", "bytes")} | {"name": name})
        skipped += [entry | {"shard": name} for entry in record["skipped"]]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": prep["name"],
        "split": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "shard_size": prep["shard_size"],
        "shards": shards,
        "classes": prep["classes"],
        "num_classes": len(prep["classes"]),
        "patch_nums": prep["patch_nums"],
        "num_tokens": ScaleLayout(tuple(prep["patch_nums"])).num_tokens,
        "vocab_size": prep["vocab_size"],
        "image_size": prep["image_size"],
        "sample_format": SAMPLE_FORMAT,
        "preprocessing": prep["preprocessing"],
        "tokenizer": prep["tokenizer"],
        "tool": {"name": "mvar-dist", "version": prep["tool_version"]},
        "order_seed": prep["order_seed"],
        "listing_sha256": prep["listing_sha256"],
        "num_images_listed": prep["num_images"],
        "skipped": skipped,
    }
    path = write_manifest(split_dir, manifest)
    logger.info("wrote %s: %d samples in %d shards, %d images skipped", path, manifest["num_samples"], len(shards), len(skipped))
    return path
