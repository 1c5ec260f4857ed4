"""Bytes each rank reads from storage in one epoch, for 1, 2 and 4 ranks, in one run.

ImageNet-shaped shards (1000 samples of 2 x 680 uint16 codes each, as ``mvar-dist prep``
writes them at 256 px) and the recipe's global batch of 448; each rank's loader runs one
epoch. Reported per rank: bytes fetched (``TrainLoader.bytes_read``), as a multiple of the
rank's share (dataset bytes / ranks), for the canonical-stream order (the default) and the
per-rank order of runs started before it (``data.canonical_ranks=null``). Usage::

    python benchmarks/bytes_read.py [--shards 32] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mvar_dist.data import DataConfig, TrainLoader
from mvar_dist.shards.format import ShardWriter
from mvar_dist.shards.manifest import load_manifest

NUM_TOKENS, SHARD_SIZE, GLOBAL_BATCH = 680, 1000, 448


def write_shards(out: Path, shards: int, classes: int = 1000) -> Path:
    """``shards`` full shards of random codes with prep's member layout and a manifest."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    entries = []
    for index in range(shards):
        name = f"bench-train-{index:06d}.tar"
        with open(out / name, "wb") as f:
            writer = ShardWriter(f)
            for i in range(SHARD_SIZE):
                codes = rng.integers(0, 4096, (2, NUM_TOKENS), dtype=np.uint16)
                meta = json.dumps({"path": f"n01440764/n01440764_{index * SHARD_SIZE + i}.JPEG", "size": [500, 375]})
                writer.write(f"n01440764/{index * SHARD_SIZE + i:08d}", int(rng.integers(classes)), codes, meta.encode())
            writer.close()
        entries.append({"name": name, "num_samples": SHARD_SIZE, "bytes": (out / name).stat().st_size})
    manifest = {
        "format": "mvar-dist-codes", "format_version": 1, "name": "bench", "split": "train",
        "num_samples": shards * SHARD_SIZE, "num_shards": shards, "shard_size": SHARD_SIZE, "shards": entries,
        "classes": [f"c{c}" for c in range(classes)], "num_classes": classes,
        "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "num_tokens": NUM_TOKENS, "vocab_size": 4096, "image_size": 256,
        "tokenizer": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def epoch_bytes(split: Path, world: int, workers: int, canonical: bool) -> tuple[list[int], float]:
    """(bytes fetched by each rank over one epoch, seconds)."""
    manifest = load_manifest(split)
    config = DataConfig(num_workers=workers, canonical_ranks="auto" if canonical else None)
    micro = GLOBAL_BATCH // world
    start = time.perf_counter()
    out = []
    for rank in range(world):
        loader = TrainLoader(manifest, config, rank, world, micro, global_batch=GLOBAL_BATCH)
        batches = iter(loader)
        for _ in range(loader.batches_per_epoch):
            next(batches)
        out.append(loader.bytes_read)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=32, help="1000-sample shards (32: 32,000 samples, 180 MB)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader workers per rank, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        split = write_shards(Path(tmp) / "train", args.shards)
        total = sum(entry.stat().st_size for entry in split.glob("*.tar"))
        print(f"{args.shards} shards of {SHARD_SIZE} samples, {total / 2**20:.1f} MiB; global batch {GLOBAL_BATCH}")
        print(f"{'order':<18}{'ranks':>6}{'workers':>8}{'MiB per rank (min-max)':>26}{'x share':>10}{'s':>7}")
        for canonical in (True, False):
            for world in (1, 2, 4):
                for workers in (int(w) for w in args.workers.split(",")):
                    per_rank, seconds = epoch_bytes(split, world, workers, canonical)
                    share = total / world
                    low, high = min(per_rank) / 2**20, max(per_rank) / 2**20
                    print(f"{'canonical streams' if canonical else 'per-rank (legacy)':<18}{world:>6}{workers:>8}"
                          f"{f'{low:.1f}-{high:.1f}':>26}{max(per_rank) / share:>10.3f}{seconds:>7.1f}")


if __name__ == "__main__":
    main()
