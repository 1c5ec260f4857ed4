"""How long a hung rank holds a local job (``train.hang_timeout_s``), side by side for the ways a
rank hangs: rank 1 stopped (SIGSTOP) or blocked reading a FIFO at step 4 of a 2-rank run of
configs/tiny_cpu.yaml, and a SIGTERM sent to the launcher once rank 1 is stopped. Prints, per
repetition, the seconds from the hang (seen from outside: the rank's process state, the FIFO
appearing) to the launcher's exit, and its exit status; then min / median / max.

    python benchmarks/hang_exit.py [--timeout 10] [--reps 3]

The times are the timeout, up to a quarter of it for the watchdog's poll, and for a stopped
rank the launcher's 10 s before SIGKILL. Builds its own tiny shards in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY_TOKENIZER = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)


def tiny_codes(base: Path) -> tuple[Path, Path]:
    """Shards and tokenizer of configs/tiny_cpu.yaml's shape, as tests/conftest.py makes them."""
    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(**TINY_TOKENIZER)
    torch.save(tokenizer.state_dict(), base / "tokenizer.pth")
    rng = np.random.default_rng(0)
    for c in range(4):
        (base / "images" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"class{c}" / f"{i}.png")
    source = sources.list_class_folder(base / "images")
    shard_dataset(source, base / "out", tokenizer, name="tiny", split="train", shard_size=16, batch_size=64, progress=False)
    return Path(merge_manifest(base / "out", "train")), base / "tokenizer.pth"


def hung(launcher: psutil.Process, run_dir: Path, how: str) -> bool:
    if how == "read":
        return any(run_dir.glob(".debug-hang-*"))
    return any(p.status() == psutil.STATUS_STOPPED for p in launcher.children())


def one_run(manifest: Path, tokenizer: Path, run_dir: Path, how: str, timeout: float) -> tuple[float, int]:
    hang_how = "read" if how == "read" else "stop"
    command = [sys.executable, "-m", "mvar_dist", "train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               "--nproc", "2", f"run.dir={run_dir}", f"tokenizer.checkpoint={tokenizer}",
               f"data.train_manifest={manifest}", "train.total_steps=6", "checkpoint.every_steps=2",
               f"train.hang_timeout_s={timeout:g}", "debug.hang_at_step=4", f"debug.hang_how={hang_how}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(proc.pid)
    while not hung(launcher, run_dir, hang_how):
        if proc.poll() is not None:
            raise RuntimeError(f"{how}: the run ended (status {proc.returncode}) before the rank hung")
        time.sleep(0.05)
    start = time.monotonic()
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    return time.monotonic() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=10.0, help="train.hang_timeout_s")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, tokenizer = tiny_codes(Path(tmp))
        times: dict[str, list[float]] = {"stop": [], "read": [], "sigterm": []}
        for rep in range(args.reps):
            for how in times:
                seconds, code = one_run(manifest, tokenizer, Path(tmp) / f"run_{how}_{rep}", how, args.timeout)
                times[how].append(seconds)
                print(f"rep {rep + 1} {how:8s}: hang -> launcher exit {seconds:5.1f} s, exit status {code}", flush=True)
        print(f"train.hang_timeout_s={args.timeout:g}, min / median / max over {args.reps} runs:")
        for how, values in times.items():
            print(f"  {how:8s}: {min(values):5.1f} / {statistics.median(values):5.1f} / {max(values):5.1f} s")


if __name__ == "__main__":
    main()
