"""Code loader vs on-the-fly tokenization, side by side on the same images, in one run.

- on-the-fly (as VAR trains): JPEG decode, resize shorter side to 288 (LANCZOS), crop 256,
  tokenizer encode of one view, batched; and its decode+resize part alone;
- prep (``mvar-dist prep``'s shard_dataset): decode, ADM crop, encode image and flip, write;
- code loader (:class:`mvar_dist.data.TrainLoader`) with 1 and 2 DataLoader workers, over
  shards holding the prep's samples replicated to ``--samples`` samples (content does not
  change the loader's cost, only the bytes per sample do: L = 680 as at 256 px), in the
  canonical-stream order the trainer uses (global batch ``--batch-size`` on one rank), and in
  the per-rank order of runs started before canonical streams.

The tokenizer is the released architecture (ch 160, V 4096, 256 px) with random weights:
the cost of encoding does not depend on the weights. Usage::

    python benchmarks/dataloader.py [--images 8] [--samples 65536] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvar_dist.data import DataConfig, TrainLoader, window_reader
from mvar_dist.data_prep import sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import shard_dataset
from mvar_dist.shards.format import CLS_FIELD, CODES_FIELD, META_FIELD, ShardWriter
from mvar_dist.shards.manifest import load_manifest
from mvar_dist.shards.tar_reader import iter_samples
from mvar_dist.state_files import file_sha256
from mvar_dist.tokenizer import MultiScaleVQVAE


def make_jpegs(root: Path, count: int, size: int = 256) -> list[Path]:
    """Smooth random images (JPEG-compressible like photos) in 4 class folders."""
    rng = np.random.default_rng(0)
    paths = []
    grid = np.linspace(0, 1, size)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(1, 8, 3)
        base = np.sin(a * np.outer(grid, grid) * 6 + b) * 0.5 + 0.5
        pixels = np.stack([base, np.roll(base, int(c * 10), 0), base.T], -1) * 200 + rng.normal(0, 12, (size, size, 3))
        path = folder / f"img{i:05d}.JPEG"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def var_transform(path: Path, size: int = 256) -> np.ndarray:
    """VAR's ImageNet transform: shorter side to round(1.125 * size) with LANCZOS, crop size."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        mid = round(1.125 * size)
        w, h = image.size
        scale = mid / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))


def on_the_fly(paths: list[Path], tokenizer: MultiScaleVQVAE, batch_size: int) -> tuple[float, float]:
    """(decode+resize samples/s, decode+resize+encode samples/s), one process."""
    start = time.perf_counter()
    arrays = [var_transform(p) for p in paths]
    decode_seconds = time.perf_counter() - start
    with torch.inference_mode():
        for i in range(0, len(arrays), batch_size):
            pixels = torch.from_numpy(np.stack(arrays[i : i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            tokenizer.img_to_codes(pixels)
    total = time.perf_counter() - start
    return len(paths) / decode_seconds, len(paths) / total


def replicate(split_dir: Path, out: Path, num_samples: int, shard_size: int = 1000) -> Path:
    """Shards holding the prep's samples over and over; a manifest like the prep's."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with open(split_dir / shard["name"], "rb") as f:
            samples += list(iter_samples(f))
    out.mkdir(parents=True)
    shards = []
    for index, begin in enumerate(range(0, num_samples, shard_size)):
        name = f"bench-train-{index:06d}.tar"
        count = min(shard_size, num_samples - begin)
        with open(out / name, "wb") as f:
            writer = ShardWriter(f)
            for i in range(begin, begin + count):
                sample = samples[i % len(samples)]
                codes = np.frombuffer(sample.fields[CODES_FIELD], dtype="<u2").reshape(2, -1)
                writer.write(f"rep/{i:08d}", int(sample.fields[CLS_FIELD]), codes, sample.fields[META_FIELD])
            writer.close()
        shards.append({"name": name, "num_samples": count, "sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size})
    manifest |= {"shards": shards, "num_shards": len(shards), "num_samples": num_samples}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def train_loader(manifest_dir: Path, workers: int, batch_size: int, canonical: bool) -> TrainLoader:
    """One rank's loader as the trainer builds it: canonical streams of a global batch of
    ``batch_size`` (the default), or the per-rank order of runs started before them."""
    config = DataConfig(num_workers=workers, canonical_ranks="auto" if canonical else None)
    return TrainLoader(load_manifest(manifest_dir), config, 0, 1, batch_size, global_batch=batch_size)


def loader_rate(manifest_dir: Path, workers: int, batch_size: int, canonical: bool = True) -> float:
    """Samples/s of the training loader over one epoch, after its first batch (worker start-up)."""
    loader = train_loader(manifest_dir, workers, batch_size, canonical)
    batches = iter(loader)
    next(batches)
    count = loader.batches_per_epoch - 1
    start = time.perf_counter()
    for codes, labels, _ in islice(batches, count):
        assert codes.shape[0] == batch_size
    return count * batch_size / (time.perf_counter() - start)


def reader_cpu_rate(manifest_dir: Path, batch_size: int, canonical: bool = True) -> float:
    """Samples per CPU-second of the work one loader worker does (reading and shuffling one
    epoch's windows), timed in this process with process_time: what one worker delivers when it
    has a core to itself, however loaded the machine is."""
    loader = train_loader(manifest_dir, 0, batch_size, canonical)
    plan = loader.plan
    if canonical:
        count, held = plan.windows_per_stream * plan.streams_per_rank, plan.streams_per_rank + 1
    else:
        count, held = plan.windows_per_epoch, 2
    reader = window_reader(loader.manifest, loader.config, 0, held)
    windows = [plan.window(n) for n in range(count)]
    start = time.process_time()
    samples = sum(reader.read(window).codes.shape[0] for window in windows)
    return samples / (time.process_time() - start)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="256 px JPEGs tokenized on the fly and by prep")
    parser.add_argument("--samples", type=int, default=65536, help="samples in the replicated code shards")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tokenizer-ch", type=int, default=160, help="160 = released tokenizer")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(ch=args.tokenizer_ch)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_jpegs(tmp / "images", args.images)
        decode_rate, fly_rate = on_the_fly(paths, tokenizer, batch_size=4)
        start = time.perf_counter()
        shard_dataset(sources.list_class_folder(tmp / "images"), tmp / "codes", tokenizer, name="bench", split="train",
                      batch_size=4, progress=False)
        prep_rate = args.images / (time.perf_counter() - start)
        merge_manifest(tmp / "codes", "train")
        big = replicate(tmp / "codes" / "train", tmp / "big", args.samples)
        rates = {w: loader_rate(big, w, args.batch_size) for w in (1, 2)}
        cpu_rate = reader_cpu_rate(big, args.batch_size)
        legacy_rate = loader_rate(big, 1, args.batch_size, canonical=False)
        legacy_cpu_rate = reader_cpu_rate(big, args.batch_size, canonical=False)
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; "
          f"tokenizer ch={args.tokenizer_ch}, {tokenizer.image_size} px, L={tokenizer.layout.num_tokens}")
    print(f"{'path':<44}{'samples/s':>12}{'per worker':>12}{'x on-the-fly':>14}")
    rows = [
        ("on-the-fly: decode+resize only", decode_rate, decode_rate),
        ("on-the-fly: decode+resize+encode (VAR)", fly_rate, fly_rate),
        ("prep: decode+crop+encode 2 views+write", prep_rate, prep_rate),
    ] + [(f"code loader, {w} worker{'s' if w > 1 else ''}", r, r / w) for w, r in rates.items()]
    rows.append(("code loader worker, per CPU-second", cpu_rate, cpu_rate))
    rows.append(("per-rank order (legacy runs), 1 worker", legacy_rate, legacy_rate))
    rows.append(("per-rank order worker, per CPU-second", legacy_cpu_rate, legacy_cpu_rate))
    for name, rate, per_worker in rows:
        print(f"{name:<44}{_fmt(rate):>12}{_fmt(per_worker):>12}{_fmt(rate / fly_rate):>14}")


if __name__ == "__main__":
    main()
