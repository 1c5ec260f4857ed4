"""Shared fixtures: a tiny tokenizer saved to a file and code shards made with it.

The tokenizer (1x "downsampling", 4 px images, patch_nums (1, 2, 3, 4), L = 30) matches
configs/tiny_cpu.yaml, so training tests only override paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_TOKENIZER = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)
TINY_CLASSES, TINY_PER_CLASS = 4, 12


@dataclass(frozen=True)
class TinyCodes:
    tokenizer: Path  # state dict of MultiScaleVQVAE(**TINY_TOKENIZER)
    manifest: Path  # train split manifest.json
    num_samples: int

    def overrides(self, run_dir: Path) -> list[str]:
        """key=value overrides that point configs/tiny_cpu.yaml at these files."""
        return [f"run.dir={run_dir}", f"tokenizer.checkpoint={self.tokenizer}", f"data.train_manifest={self.manifest}"]


def write_tiny_images(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """Random RGB images of random small sizes in one folder per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="session")
def tiny_codes(tmp_path_factory: pytest.TempPathFactory) -> TinyCodes:
    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    base = tmp_path_factory.mktemp("tiny_codes")
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(**TINY_TOKENIZER)
    torch.save(tokenizer.state_dict(), base / "tokenizer.pth")
    write_tiny_images(base / "images", TINY_CLASSES, TINY_PER_CLASS)
    source = sources.list_class_folder(base / "images")
    shard_dataset(source, base / "out", tokenizer, name="tiny", split="train", shard_size=16, batch_size=64, progress=False)
    manifest = merge_manifest(base / "out", "train")
    return TinyCodes(base / "tokenizer.pth", Path(manifest), TINY_CLASSES * TINY_PER_CLASS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test left a process of its own running (a server, a launcher, a rank):
    it would hold ports and CPU, and a later test, or CI, would wait on it."""
    import time

    import psutil

    deadline = time.monotonic() + 30  # ranks and workers of the last test may still be exiting
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        lines = []
        for process in left:
            try:
                lines.append(f"  pid {process.pid}: {' '.join(process.cmdline())[:200]}")
                process.kill()
            except psutil.Error:
                pass
        session.config.get_terminal_writer().line(
            "\ntests left these processes running (now killed):\n" + "\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
