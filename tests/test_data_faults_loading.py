"""Faults while loading code shards (issue 11): transient read errors are retried with back-off,
a shard that keeps failing is declared bad, and a training window with no readable sample
follows the bad-data policy (replaced and counted, bounded by max_bad_fraction, resumed exactly)."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_faults import NUM_CLASSES, PER_CLASS, SHARD_SIZE, shard_files, tokenizer, write_images  # noqa: F401

from mvar_dist.data import BadDataError, DataConfig, TrainLoader, ValLoader
from mvar_dist.shards import read_errors
from mvar_dist.data_prep import sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import shard_dataset
from mvar_dist.shards.format import CODES_FIELD, decode_codes
from mvar_dist.shards.manifest import Manifest, load_manifest
from mvar_dist.tokenizer import MultiScaleVQVAE


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: MultiScaleVQVAE) -> Path:
    base = tmp_path_factory.mktemp("codes")
    source = sources.list_class_folder(write_images(base / "images", NUM_CLASSES, PER_CLASS))
    shard_dataset(source, base / "out", tokenizer, name="t", split="train", shard_size=SHARD_SIZE, batch_size=64, progress=False)
    merge_manifest(base / "out", "train")
    return base / "out" / "train"


@pytest.fixture(scope="module")
def samples(split_dir: Path) -> dict[bytes, tuple[str, int, int]]:
    """Codes of each view (bytes of the int64 row) -> (key, label, view)."""
    table = {}
    for shard_samples in shard_files(split_dir).values():
        for sample in shard_samples:
            codes = decode_codes(sample.fields[CODES_FIELD], 30, 64).astype(np.int64)
            for view in (0, 1):
                table.setdefault(codes[view].tobytes(), (sample.key, int(sample.fields["cls"]), view))
    return table


def config(**overrides) -> DataConfig:
    return DataConfig(**({"num_workers": 0, "shuffle_window": 8, "seed": 3} | overrides))


FLAKY_SCRIPT = """#!/bin/sh
# flaky.sh DIR FILE: fail (exit 1, no output) as often as DIR/<file name>.fails says, then cat FILE
name=$(basename "$2")
count=$(cat "$1/$name.count" 2>/dev/null || echo 0)
echo $((count + 1)) > "$1/$name.count"
fails=$(cat "$1/$name.fails" 2>/dev/null || echo 0)
if [ "$count" -lt "$fails" ]; then exit 1; fi
exec cat "$2"
"""


def flaky_manifest(split_dir: Path, tmp_path: Path, fails: dict[str, int]) -> tuple[Manifest, Path]:
    """The split read through a pipe that fails the first ``fails[shard]`` opens of each shard."""
    counts = tmp_path / "counts"
    counts.mkdir()
    (tmp_path / "flaky.sh").write_text(FLAKY_SCRIPT)
    for name, number in fails.items():
        (counts / f"{name}.fails").write_text(str(number))
    template = f"pipe:sh {tmp_path / 'flaky.sh'} {counts} {split_dir}/{{name}}"
    return load_manifest(split_dir, shard_url_template=template), counts


def test_transient_open_errors_are_retried(split_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(read_errors, "READ_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    names = [f"t-train-{i:06d}.tar" for i in range(7)]
    flaky, counts = flaky_manifest(split_dir, tmp_path, {name: 2 for name in names})
    healthy = TrainLoader(load_manifest(split_dir), config(), 0, 1, batch_size=4)
    loader = TrainLoader(flaky, config(), 0, 1, batch_size=4)
    for (a, la, _), (b, lb, _) in zip(islice(iter(healthy), 12), islice(iter(loader), 12)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert loader.num_skipped == 0
    assert all(int((counts / f"{name}.count").read_text()) >= 3 for name in names)


def test_shard_that_keeps_failing_is_declared_bad_after_the_retries(split_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(read_errors, "READ_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    flaky, counts = flaky_manifest(split_dir, tmp_path, {"t-train-000002.tar": 1000})
    val = ValLoader(flaky, config(shuffle_window=64, max_bad_fraction=0.5), 0, 1, batch_size=16)  # one window: shards read once
    assert sum(int(mask.sum()) for _, _, mask in val) == 48 - SHARD_SIZE and val.num_skipped == SHARD_SIZE
    assert int((counts / "t-train-000002.tar.count").read_text()) == 4  # the first try and 3 retries
    with pytest.raises(BadDataError, match=r"t-train-000002.tar.*4 tries"):
        list(ValLoader(flaky, config(shuffle_window=64, bad_data="fail"), 0, 1, batch_size=16))


BAD_SHARD_RANK = 2  # batch 2, window 4: a whole window falls inside any corrupt 7-sample shard


def corrupt_split(split_dir: Path, target: Path, shard: int) -> None:
    shutil.copytree(split_dir, target)
    path = target / f"t-train-{shard:06d}.tar"
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256))  # not a tar at all


def all_bad_windows(loader: TrainLoader, shard: int) -> list[int]:
    """Window numbers of the loader's first epoch that hold only samples of ``shard``."""
    plan = loader.plan
    return [n for n in range(plan.windows_per_epoch) if {c.shard for c in plan.window(n).chunks} == {shard}]


def test_unreadable_training_window_is_replaced_and_counted(split_dir, samples, tmp_path):
    corrupt_split(split_dir, tmp_path / "train", 3)
    manifest = load_manifest(tmp_path / "train")
    bad_keys = {s.key for s in shard_files(split_dir)["t-train-000003.tar"]}
    loaders = [TrainLoader(manifest, config(shuffle_window=4, max_bad_fraction=0.5, num_workers=w), rank, 2, batch_size=2)
               for rank, w in ((0, 0), (1, 2))]
    assert any(all_bad_windows(loader, 3) for loader in loaders), "the test needs a window inside shard 3"
    for loader in loaders:
        stream = iter(loader)
        for epoch in (1, 2):
            batches = list(islice(stream, loader.batches_per_epoch))
            assert len(batches) == loader.batches_per_epoch == 12  # every rank: the same number of batches
            assert (loader.epoch, loader.position) == (epoch, 0)
            for codes, labels, *_ in batches:
                assert codes.shape == (2, 30)
                rows = [samples[row.numpy().tobytes()] for row in codes]  # every row is a real sample
                assert [label for _, label, _ in rows] == labels.tolist()
                assert not {key for key, _, _ in rows} & bad_keys
    assert sum(loader.num_skipped for loader in loaders) == 2 * SHARD_SIZE  # the shard's samples, each epoch


def test_unreadable_training_window_counts_against_max_bad_fraction(split_dir, tmp_path):
    corrupt_split(split_dir, tmp_path / "train", 3)
    manifest = load_manifest(tmp_path / "train")
    loaders = [TrainLoader(manifest, config(shuffle_window=4), rank, 2, batch_size=2) for rank in range(2)]
    rank = next(i for i, loader in enumerate(loaders) if all_bad_windows(loader, 3))
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        list(islice(iter(loaders[rank]), loaders[rank].batches_per_epoch))


def test_resume_inside_an_unreadable_window_is_exact(split_dir, tmp_path):
    corrupt_split(split_dir, tmp_path / "train", 3)
    manifest = load_manifest(tmp_path / "train")
    settings = config(shuffle_window=4, max_bad_fraction=0.5)
    loaders = [TrainLoader(manifest, settings, rank, 2, batch_size=2) for rank in range(2)]
    rank = next(i for i, loader in enumerate(loaders) if all_bad_windows(loader, 3))
    window = all_bad_windows(loaders[rank], 3)[0]
    stop = 2 * window + 1  # the first of the window's two batches: resume mid-window
    reference = list(islice(iter(TrainLoader(manifest, settings, rank, 2, batch_size=2)), stop + 8))
    first = TrainLoader(manifest, settings, rank, 2, batch_size=2)
    consumed = list(islice(iter(first), stop))
    resumed = TrainLoader(manifest, config(shuffle_window=4, max_bad_fraction=0.5, num_workers=2), rank, 2, batch_size=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    continued = list(islice(iter(resumed), 8))
    assert len(consumed + continued) == len(reference)
    for (a, la, _), (b, lb, _) in zip(reference, consumed + continued):
        assert torch.equal(a, b) and torch.equal(la, lb)


