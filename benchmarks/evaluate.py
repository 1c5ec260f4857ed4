"""Speed of ``mvar-dist evaluate``: images/s of the Inception feature extraction alone, and of the
whole command on a samples ``.npz`` (process start, reading, features, the five metrics, the
report), with the reference batch's features computed in the same run (a cold cache) and read
from the cache (the usual case). Every variant runs ``--runs`` times in a fresh process, the
variants taking turns; figures are the median [min-max].

The Inception weights are random values in the converted file's layout: the speed does not
depend on them (and no real weights are needed to measure it). The images are random 256 px
uint8 images, as many reference images as samples.

    python benchmarks/evaluate.py                    # 1,000 images, 3 runs, this machine's device
    python benchmarks/evaluate.py --images 1000 --runs 1 --json gpu_report/evaluate.json   # the GPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fresh_runs import measure_rounds, median_row, spread

VARIANTS = ("features", "evaluate-cold", "evaluate-cached")


def write_inputs(folder: Path, images: int, size: int) -> None:
    import torch

    from mvar_dist.evaluation.inception import random_inception_state

    rng = np.random.default_rng(0)
    for name in ("samples", "reference"):
        np.savez(folder / f"{name}.npz", arr_0=rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8))
    torch.save(random_inception_state(0), folder / "inception.pth")


def features_variant(folder: Path, batch: int, device: str) -> dict:
    """Feature extraction alone, after one warm-up batch (the network loaded, memory allocated)."""
    import torch

    from mvar_dist.evaluation.features import batch_features
    from mvar_dist.evaluation.image_batches import read_npz_images
    from mvar_dist.evaluation.inception import load_inception

    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    network = load_inception(folder / "inception.pth", target)
    images = read_npz_images(folder / "samples.npz")
    with torch.no_grad():
        batch_features(network, images[:batch], target)
        if target.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for begin in range(0, len(images), batch):
            batch_features(network, images[begin : begin + batch], target)
        if target.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"variant": "features", "seconds": seconds, "images_per_s": len(images) / seconds, "device": str(target),
            "threads": torch.get_num_threads()}


def evaluate_variant(folder: Path, cached: bool, batch: int, device: str, run_id: str) -> dict:
    """The whole command in its own process, timed from outside (process start included)."""
    cache = folder / ("cache_shared" if cached else f"cache_{run_id}")
    command = [sys.executable, "-m", "mvar_dist", "evaluate", "--no-progress", "--samples", str(folder / "samples.npz"),
               "--ref", str(folder / "reference.npz"), "--inception", str(folder / "inception.pth"),
               "--feature-batch-size", str(batch), "--device", device, "--cache-dir", str(cache),
               "--out", str(folder / f"report_{run_id}.json")]
    if cached and not cache.exists():  # the first cached run fills the cache, untimed
        subprocess.run(command, check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    report = json.loads((folder / f"report_{run_id}.json").read_text())
    return {"variant": "evaluate-cached" if cached else "evaluate-cold", "seconds": seconds,
            "images_per_s": report["num_samples"] / seconds, "metrics": report["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="sample images (and as many reference images)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--json", help="write the rows here (after every round)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one measurement, in this fresh process
        folder = Path(args.folder)
        if args.variant == "features":
            result = features_variant(folder, args.batch, args.device)
        else:
            result = evaluate_variant(folder, args.variant == "evaluate-cached", args.batch, args.device, args.run_id)
        print("RESULT " + json.dumps(result))
        return

    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.images, args.size)
        counter = iter(range(10**6))

        def command(variant: str) -> list[str]:
            return [sys.executable, __file__, "--variant", variant, "--folder", str(folder), "--batch", str(args.batch),
                    "--device", args.device, "--run-id", str(next(counter))]

        rows = measure_rounds(command, variants, args.runs, lambda runs: median_row(runs, ("seconds", "images_per_s")),
                              args.json)
    print(f"mvar-dist evaluate speed: {args.images:,} samples of {args.size} px (and {args.images:,} reference images), "
          f"Inception batch {args.batch}, {args.runs} fresh processes per variant, median [min-max]; "
          f"{os.cpu_count()} CPUs visible")
    for row in rows:
        what = {"features": "feature extraction (Inception forward, 299 px)",
                "evaluate-cold": "whole evaluate, reference features computed too",
                "evaluate-cached": "whole evaluate, reference features from the cache"}[row["variant"]]
        print(f"  {what:<52} {spread(row, 'images_per_s', '.2f')} sample images/s  ({spread(row, 'seconds', '.1f')} s)")
    features = next((r for r in rows if r["variant"] == "features"), None)
    if features:
        print(f"  device {features['device']}, {features['threads']} torch threads")


if __name__ == "__main__":
    main()
