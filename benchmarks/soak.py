"""Soak test: a long run of the tiny config on 2 CPU ranks with everything a real run does
(periodic checkpoints, validation, sample grids, per-step MLflow logging), watching each rank's
resident memory and open file descriptors from outside, and counting what reached MLflow.

Reported, per rank: RSS at the end of warm-up (median of the samples in 15-25 % of the run) and
at the end (median of the last 5 %), their ratio, the fitted RSS slope after warm-up (MB per
1,000 steps), the largest RSS seen; open file descriptors after warm-up and at the end; and the
MLflow metric rows against steps x metrics per step (exactly one value per metric and step).
Not part of the test suite: it runs for minutes.

    python benchmarks/soak.py                      # 3,000 steps (about 10 minutes on 2 cores)
    python benchmarks/soak.py --steps 600 --out runs/soak
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_data(root: Path) -> tuple[Path, Path]:
    """A tiny random tokenizer and code shards of random images (as the tests build them)."""
    import numpy as np
    import torch
    from PIL import Image

    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)
    tokenizer.save(root / "tokenizer.safetensors")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 64), ("val", 8)):
        for c in range(4):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
        source = sources.list_class_folder(root / "images" / split)
        shard_dataset(source, root / "codes", tokenizer, name="soak", split=split, shard_size=32, progress=False)
        merge_manifest(root / "codes", split)
    return root / "tokenizer.safetensors", root / "codes"


def sample(pids: dict[int, int]) -> dict[int, tuple[float, int]]:
    """rank -> (RSS in MB, open file descriptors) now."""
    out = {}
    for rank, pid in pids.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
            out[rank] = (rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")))
        except (OSError, StopIteration):  # the rank has just exited
            pass
    return out


def rank_pids(launcher: int) -> dict[int, int]:
    """The launcher's children, by the RANK in their environment."""
    pids = {}
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:  # the launcher has just exited
        return pids
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = next(int(e[5:]) for e in environ if e.startswith(b"RANK="))
            pids[rank] = int(child)
        except (OSError, StopIteration, ValueError):  # a rank that has just exited
            continue
    return pids


def summarize(samples: list[tuple[float, dict[int, tuple[float, int]]]], steps: int) -> dict:
    start, end = samples[0][0], samples[-1][0]
    span = max(end - start, 1e-9)
    report = {}
    for rank in sorted({r for _, s in samples for r in s}):
        series = [(t, s[rank]) for t, s in samples if rank in s]

        def window(lo: float, hi: float) -> list[tuple[float, int]]:
            return [v for t, v in series if lo <= (t - start) / span <= hi]

        warm, last = window(0.15, 0.25), window(0.95, 1.0)
        after = [(t, v[0]) for t, v in series if (t - start) / span >= 0.2]
        steps_of = [(t - start) / span * steps for t, _ in after]
        slope = statistics.linear_regression(steps_of, [v for _, v in after]).slope * 1000 if len(after) > 2 else 0.0
        rss_warm, rss_end = statistics.median(v[0] for v in warm), statistics.median(v[0] for v in last)
        report[rank] = {
            "rss_mb_after_warmup": round(rss_warm, 1), "rss_mb_at_end": round(rss_end, 1),
            "rss_growth": round(rss_end / rss_warm - 1, 4), "rss_slope_mb_per_1000_steps": round(slope, 2),
            "rss_mb_max": round(max(v[0] for _, v in series), 1),
            "fds_after_warmup": int(statistics.median(v[1] for v in warm)), "fds_at_end": int(statistics.median(v[1] for v in last)),
            "fds_max": max(v[1] for _, v in series),
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer, codes = make_data(args.out / "data") if not (args.out / "data" / "codes" / "val" / "manifest.json").is_file() \
        else (args.out / "data" / "tokenizer.safetensors", args.out / "data" / "codes")
    run_dir, db = args.out / "run", args.out / "mlflow.db"
    overrides = [
        f"run.dir={run_dir}", f"tokenizer.checkpoint={tokenizer}", "tokenizer.options={}",
        f"data.train_manifest={codes / 'train'}", f"data.val_manifest={codes / 'val'}", f"train.total_steps={args.steps}",
        "train.val_every_steps=200", "sample.every_steps=500", "sample.per_class=2", "checkpoint.every_steps=500",
        "checkpoint.keep_last=2", "train.log_every=1", f"tracking.uri=sqlite:///{db}", "tracking.experiment=soak",
    ]
    command = [sys.executable, "-m", "mvar_dist", "train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               "--nproc", "2", *overrides]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    log = open(args.out / "train.log", "w")
    launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, dict[int, tuple[float, int]]]] = []
    started = time.monotonic()
    with open(args.out / "samples.jsonl", "w") as trace:  # kept for plotting, and if this process dies
        while launcher.poll() is None:
            now = sample(rank_pids(launcher.pid))
            if now:
                samples.append((time.monotonic(), now))
                trace.write(json.dumps([samples[-1][0] - started, now]) + "\n")
                trace.flush()
            time.sleep(args.interval)
    log.close()
    if launcher.returncode != 0:
        print(f"training failed (exit {launcher.returncode}); see {args.out / 'train.log'}", file=sys.stderr)
        return 1
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT key, COUNT(*), COUNT(DISTINCT step) FROM metrics WHERE key NOT LIKE 'system/%' "
                                  "GROUP BY key").fetchall()
    per_step = {key: (count, distinct) for key, count, distinct in rows}
    train_keys = {k: v for k, v in per_step.items() if k.startswith("train/") or k in ("lr", "step_time_s")}
    report = {
        "steps": args.steps, "wall_s": round(time.monotonic() - started, 1), "ranks": summarize(samples, args.steps),
        "mlflow": {
            "metric_keys": len(per_step), "rows": sum(c for c, _ in per_step.values()),
            "train_keys_with_one_row_per_step": sum(1 for c, d in train_keys.values() if c == d == args.steps),
            "train_keys": len(train_keys), "duplicated_rows": sum(c - d for c, d in per_step.values()),
        },
    }
    print(json.dumps(report, indent=1))
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
