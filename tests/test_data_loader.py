"""The distributed code loader: exactly-once validation, equal batches, exact resume, bad data."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist.data import BadDataError, DataConfig, TrainLoader, ValLoader, build_train_loader, build_val_loader
from mvar_dist.data_prep import sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import shard_dataset
from mvar_dist.shards.format import CODES_FIELD, decode_codes
from mvar_dist.shards.manifest import check_manifest_matches, load_manifest
from mvar_dist.shards.tar_reader import iter_samples
from mvar_dist.tokenizer import MultiScaleVQVAE

# 1x "downsampling": 4 px images, L = 30; cheap enough to tokenize 50 images in a test
TOKENIZER_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)
NUM_CLASSES, PER_CLASS, SHARD_SIZE = 4, 12, 7  # 48 samples in 7 shards, the last one short


@pytest.fixture(scope="module")
def tokenizer() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(**TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: MultiScaleVQVAE) -> Path:
    base = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        (base / "images" / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"class{c}" / f"{i}.png")
    source = sources.list_class_folder(base / "images")
    shard_dataset(source, base / "out", tokenizer, name="t", split="train", shard_size=SHARD_SIZE, batch_size=64, progress=False)
    merge_manifest(base / "out", "train")
    return base / "out" / "train"


@pytest.fixture(scope="module")
def samples(split_dir: Path) -> dict[bytes, tuple[str, int, int]]:
    """Codes of each view (bytes of the int64 row) -> (key, label, view); the rows are unique."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    table = {}
    for shard in manifest["shards"]:
        with open(split_dir / shard["name"], "rb") as f:
            for sample in iter_samples(f):
                codes = decode_codes(sample.fields[CODES_FIELD], 30, 64).astype(np.int64)
                for view in (0, 1):
                    table.setdefault(codes[view].tobytes(), (sample.key, int(sample.fields["cls"]), view))
    assert len({key for key, _, _ in table.values()}) == manifest["num_samples"] == NUM_CLASSES * PER_CLASS
    return table


def identify(batch_codes: torch.Tensor, table: dict) -> list[tuple[str, int, int]]:
    return [table[row.numpy().tobytes()] for row in batch_codes]


def config(**overrides) -> DataConfig:
    return DataConfig(**({"num_workers": 0, "shuffle_window": 8, "seed": 3} | overrides))


def test_validation_visits_every_sample_once_over_ranks_and_workers(split_dir, samples):
    manifest = load_manifest(split_dir)
    seen, lengths = [], set()
    for rank in range(2):
        loader = ValLoader(manifest, config(num_workers=2, shuffle_window=5), rank, 2, batch_size=5)
        batches = list(loader)
        lengths.add(len(batches))
        assert len(batches) == len(loader)
        for codes, labels, mask in batches:
            assert codes.shape == (5, 30) and codes.dtype == torch.long and labels.shape == mask.shape == (5,)
            for (key, label, view), y in zip(identify(codes[mask], samples), labels[mask]):
                assert view == 0 and label == int(y)
                seen.append(key)
    assert lengths == {5}  # 24 samples per rank -> 4 full batches and one of 4 + padding
    assert sorted(seen) == sorted({key for key, _, _ in samples.values()})


def test_training_ranks_get_equal_disjoint_batches_per_epoch(split_dir, samples):
    manifest = load_manifest(split_dir)
    loaders = [TrainLoader(manifest, config(), rank, 3, batch_size=4) for rank in range(3)]
    assert {loader.batches_per_epoch for loader in loaders} == {4}  # 48 // 3 = 16 samples per rank
    epoch0 = []
    for loader in loaders:
        batches = list(islice(iter(loader), 4))
        assert all(codes.shape == (4, 30) for codes, *_ in batches)
        for codes, labels, *_ in batches:
            rows = identify(codes, samples)
            assert [label for _, label, _ in rows] == labels.tolist()
            epoch0 += [key for key, _, _ in rows]
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    assert len(epoch0) == len(set(epoch0)) == 48


def test_flip_views_are_used(split_dir, samples):
    loader = TrainLoader(load_manifest(split_dir), config(), 0, 1, batch_size=8)
    views = Counter(view for codes, *_ in islice(iter(loader), 12) for _, _, view in identify(codes, samples))
    assert views[0] > 10 and views[1] > 10
    no_flip = TrainLoader(load_manifest(split_dir), config(hflip=False), 0, 1, batch_size=8)
    assert {view for codes, *_ in islice(iter(no_flip), 6) for _, _, view in identify(codes, samples)} == {0}


def test_order_depends_on_seed_not_on_workers(split_dir):
    manifest = load_manifest(split_dir)
    plain = [c for c, *_ in islice(iter(TrainLoader(manifest, config(), 1, 2, batch_size=4)), 9)]
    workers = [c for c, *_ in islice(iter(TrainLoader(manifest, config(num_workers=2), 1, 2, batch_size=4)), 9)]
    other_seed = [c for c, *_ in islice(iter(TrainLoader(manifest, config(seed=4), 1, 2, batch_size=4)), 9)]
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))
    assert not all(torch.equal(a, b) for a, b in zip(plain, other_seed))


def test_resume_continues_exactly(split_dir):
    manifest = load_manifest(split_dir)
    reference = list(islice(iter(TrainLoader(manifest, config(num_workers=2), 0, 2, batch_size=4)), 14))
    first = TrainLoader(manifest, config(num_workers=2), 0, 2, batch_size=4)
    consumed = list(islice(iter(first), 5))  # mid-window (2 batches per window), epoch has 6 batches
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = TrainLoader(manifest, config(num_workers=2), 0, 2, batch_size=4)
    resumed.load_state_dict(state)
    continued = list(islice(iter(resumed), 9))
    for (a, la, _), (b, lb, _) in zip(reference, consumed + continued):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_resume_with_other_world_size_keeps_epoch_fraction(split_dir):
    manifest = load_manifest(split_dir)
    old = TrainLoader(manifest, config(), 0, 2, batch_size=4)
    list(islice(iter(old), 3))  # 3 of 6 batches: 24 of 48 samples consumed globally
    new = TrainLoader(manifest, config(), 1, 3, batch_size=4)
    new.load_state_dict(old.state_dict())
    assert (new.epoch, new.position) == (0, 8)  # 24 samples / (3 ranks x 4) = batch 2 of 4


def test_truncated_shard_is_skipped_and_counted_or_fails(split_dir, samples, tmp_path, caplog):
    broken = tmp_path / "train"
    shutil.copytree(split_dir, broken)
    shard = broken / "t-train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: 512 * 7])  # keeps the first sample, cuts the second
    manifest = load_manifest(broken)
    train = TrainLoader(manifest, config(max_bad_fraction=0.5), 0, 1, batch_size=4)
    batches = list(islice(iter(train), 2 * train.batches_per_epoch))
    assert all(codes.shape == (4, 30) for codes, *_ in batches)
    assert train.num_skipped == 2 * 6  # 6 of the shard's 7 samples lost, in each of 2 epochs
    assert "t-train-000003.tar" in caplog.text
    val = ValLoader(manifest, config(max_bad_fraction=0.5), 0, 1, batch_size=8)
    assert sum(int(mask.sum()) for _, _, mask in val) == 48 - 6 and val.num_skipped == 6
    with pytest.raises(BadDataError, match="t-train-000003.tar"):
        list(ValLoader(manifest, config(bad_data="fail"), 0, 1, batch_size=8))
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        list(islice(iter(TrainLoader(manifest, config(), 0, 1, batch_size=4)), 12))


def test_check_manifest_matches(split_dir, tokenizer):
    manifest = load_manifest(split_dir)
    check_manifest_matches(manifest, (1, 2, 3, 4), 64, tokenizer.identity())
    with pytest.raises(ValueError, match="patch_nums"):
        check_manifest_matches(manifest, (1, 2, 4), 64, None)
    with pytest.raises(ValueError, match="vocab_size: shards 64, model 4096"):
        check_manifest_matches(str(split_dir / "manifest.json"), (1, 2, 3, 4), 4096, None)
    torch.manual_seed(5)
    other = MultiScaleVQVAE(**TOKENIZER_CONFIG)
    with pytest.raises(ValueError, match="weights_sha256"):
        check_manifest_matches(manifest, (1, 2, 3, 4), 64, other.identity())


def test_manifest_read_through_url_opener(split_dir):
    manifest = load_manifest(f"pipe:cat {split_dir / 'manifest.json'}", shard_url_template=f"pipe:cat {split_dir}/{{name}}")
    loader = ValLoader(manifest, config(), 0, 1, batch_size=16)
    assert sum(int(mask.sum()) for _, _, mask in loader) == 48


def rewrite_last_shard(split_dir: Path, target: Path, edit) -> None:
    """Copy the split to ``target``, rewriting shard 6's samples through ``edit(index, key, label, codes)``,
    which returns the members to write (name suffix -> bytes) or None to write them unchanged."""
    shutil.copytree(split_dir, target)
    shard = target / "t-train-000006.tar"
    with open(shard, "rb") as f:
        samples = list(iter_samples(f))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, sample in enumerate(samples):
            codes = decode_codes(sample.fields[CODES_FIELD], 30, 64)
            fields = edit(index, sample.key, int(sample.fields["cls"]), codes) or sample.fields
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{sample.key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_out_of_range_code_is_masked_or_fails(split_dir, tmp_path):
    def bump(index, key, label, codes):
        if index == 2:
            codes = codes.copy()
            codes[0, 5] = 64
            return {"cls": str(label).encode(), CODES_FIELD: codes.astype("<u2").tobytes(), "json": b"{}"}
        return None

    rewrite_last_shard(split_dir, tmp_path / "train", bump)
    manifest = load_manifest(tmp_path / "train")
    val = ValLoader(manifest, config(max_bad_fraction=0.1), 0, 1, batch_size=16)
    assert sum(int(mask.sum()) for _, _, mask in val) == 47 and val.num_skipped == 1
    with pytest.raises(BadDataError, match=r"t-train-000006.tar, sample class\d/\d+: code 64 >= vocab_size 64"):
        list(ValLoader(manifest, config(bad_data="fail"), 0, 1, batch_size=16))


def test_missing_field_and_wrong_length_are_masked(split_dir, tmp_path):
    def damage(index, key, label, codes):
        if index == 1:
            return {"cls": str(label).encode(), "json": b"{}"}
        if index == 4:
            return {"cls": str(label).encode(), CODES_FIELD: codes.astype("<u2").tobytes()[:-2]}
        return None

    rewrite_last_shard(split_dir, tmp_path / "train", damage)
    manifest = load_manifest(tmp_path / "train")
    val = ValLoader(manifest, config(max_bad_fraction=0.1), 0, 1, batch_size=16)
    assert sum(int(mask.sum()) for _, _, mask in val) == 46 and val.num_skipped == 2
    train = TrainLoader(manifest, config(max_bad_fraction=0.1), 0, 1, batch_size=8)
    assert len(list(islice(iter(train), train.batches_per_epoch))) == 6 and train.num_skipped == 2
    with pytest.raises(BadDataError, match="missing field"):
        list(ValLoader(manifest, config(bad_data="fail"), 0, 1, batch_size=16))


def test_build_loaders_from_config(split_dir):
    data = config(train_manifest=str(split_dir), val_manifest=str(split_dir / "manifest.json"))
    train = build_train_loader(data, rank=0, world_size=2, batch_size=4, seed=7)
    assert train.config.seed == 7 and data.seed == 3 and train.batches_per_epoch == 6
    val = build_val_loader(data, rank=1, world_size=2, batch_size=4)
    assert isinstance(val, ValLoader) and len(val) == 6
    assert build_val_loader(config(), rank=0, world_size=1, batch_size=4) is None
    with pytest.raises(ValueError, match="train_manifest is empty"):
        build_train_loader(config(), rank=0, world_size=1, batch_size=4)


# ----- canonical streams: the same samples in every global step on any world size -----


def step_samples(loaders: list[TrainLoader], steps: int, samples: dict) -> list[list[tuple[str, int, int]]]:
    iterators = [iter(loader) for loader in loaders]
    micro = loaders[0].global_batch // (len(loaders) * loaders[0].batch_size)
    out = []
    for _ in range(steps):
        rows = []
        for it in iterators:
            for _ in range(micro):
                codes, labels, _ = next(it)
                rows += identify(codes, samples)
        out.append(rows)
    return out


def stream_loaders(manifest, world: int, micro: int, states: list[dict] | None = None, **overrides) -> list[TrainLoader]:
    loaders = [TrainLoader(manifest, config(**overrides), rank, world, batch_size=micro, global_batch=8)
               for rank in range(world)]
    for rank, loader in enumerate(loaders):
        if states is not None:
            loader.load_state_dict(json.loads(json.dumps(states[rank % len(states)])))
    return loaders


@pytest.mark.parametrize("path", [(4, 2, 4), (2, 1, 2), (1, 8)])
def test_canonical_streams_keep_every_global_step_across_world_sizes(split_dir, samples, path):
    manifest = load_manifest(split_dir)  # 48 samples: 8 streams of 6, 6 global steps of 8 per epoch
    reference = step_samples(stream_loaders(manifest, 4, 2), 14, samples)  # over two epochs
    assert all(len(step) == 8 for step in reference)
    assert len({key for step in reference[:6] for key, _, _ in step}) == 48  # an epoch sees every sample once
    resized, states, done = [], None, 0
    for world, steps in zip(path, (5, 4, 5)):
        loaders = stream_loaders(manifest, world, max(1, 4 // world), states, num_workers=world % 2)
        resized += step_samples(loaders, steps, samples)
        states, done = [loader.state_dict() for loader in loaders], done + steps
    assert resized == reference[:done]  # same samples, same views, same order within each step


def test_world_size_that_does_not_divide_the_streams_is_refused_or_resplit(split_dir, samples):
    manifest = load_manifest(split_dir)
    loaders = stream_loaders(manifest, 2, 2)
    step_samples(loaders, 2, samples)
    state = loaders[0].state_dict()
    assert state["streams"] == 8
    three = TrainLoader(manifest, config(), 0, 1, batch_size=8, global_batch=8)
    three.world_size = 3  # as a 3-rank job would see it
    with pytest.raises(ValueError, match=r"8 canonical streams, which 3 ranks cannot share exactly.*\[1, 2, 4, 8\]"):
        three.load_state_dict(state)
    approximate = TrainLoader(manifest, config(resize="approximate"), 0, 1, batch_size=8, global_batch=8)
    approximate.world_size = 3
    approximate.load_state_dict(state)
    assert not approximate.per_sample_noise  # the per-rank order, with its warning


def test_runs_started_before_canonical_streams_keep_their_order(split_dir, samples):
    manifest = load_manifest(split_dir)
    old = TrainLoader(manifest, config(), 0, 2, batch_size=4)  # the per-rank order
    list(islice(iter(old), 3))
    state = old.state_dict()
    assert "streams" not in state
    reference = [c for c, *_ in islice(iter(old), 4)]
    resumed = TrainLoader(manifest, config(), 0, 2, batch_size=4, global_batch=16)
    resumed.load_state_dict(state)
    assert not resumed.per_sample_noise
    assert all(torch.equal(a, b) for a, b in zip(reference, [c for c, *_ in islice(iter(resumed), 4)]))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_canonical_streams_read_each_shard_once_per_epoch(split_dir, samples, world, monkeypatch):
    """A stream's windows are smaller than a shard (here one sample each): the shard must still
    come from storage once per epoch, not once per window, and a rank reads only its share."""
    import webdataset

    opened: list[Counter] = [Counter() for _ in range(world)]
    reading = [0]
    real_gopen = webdataset.gopen

    def counting_gopen(url, mode="rb", **kwargs):
        opened[reading[0]][Path(url).name] += 1
        return real_gopen(url, mode, **kwargs)

    monkeypatch.setattr(webdataset, "gopen", counting_gopen)
    manifest = load_manifest(split_dir)  # 48 samples in 7 shards; 8 streams of 6 samples
    loaders = stream_loaders(manifest, world, 8 // world)
    iterators = [iter(loader) for loader in loaders]
    epoch_shards: list[set[str]] = [set() for _ in range(world)]
    for _ in range(6):  # one epoch: 6 global steps of 8
        for rank, it in enumerate(iterators):
            reading[0] = rank
            codes, _, ids = next(it)
            epoch_shards[rank] |= {manifest.shard_urls[int(i) >> 32].rsplit("/", 1)[-1] for i in ids}
    for rank in range(world):
        assert max(opened[rank].values()) == 1, opened[rank]  # each shard once in the epoch
        assert set(opened[rank]) == epoch_shards[rank]  # and only the shards of its samples
        sizes = sum((split_dir / name).stat().st_size for name in opened[rank])
        assert loaders[rank].bytes_read == sizes


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (1, 3), (2, 4), (4, 2)])
def test_canonical_streams_read_each_shard_once_with_workers(split_dir, samples, world, workers):
    """Workers take windows in turn: a stream must stay with one worker, else each worker would
    fetch its shards again (3 workers and 8 streams run on 1; 4 workers and 4 streams on 4). A
    shard that two streams share may be fetched by both streams' workers, not more often."""
    manifest = load_manifest(split_dir)
    loaders = stream_loaders(manifest, world, 8 // world, num_workers=workers)
    iterators = [iter(loader) for loader in loaders]
    per_stream: list[dict[int, set[int]]] = [{} for _ in range(world)]
    for _ in range(6):
        for rank, it in enumerate(iterators):
            rows = torch.cat([next(it)[2] for _ in range(loaders[rank].batches_per_epoch // 6)])
            for row, sample in enumerate(rows.tolist()):  # a rank's step: each of its streams in turn
                per_stream[rank].setdefault(row // loaders[rank].plan.per_stream, set()).add(sample >> 32)
    size = lambda shard: (split_dir / Path(manifest.shard_urls[shard]).name).stat().st_size  # noqa: E731
    for rank, loader in enumerate(loaders):
        once = sum(size(s) for s in set().union(*per_stream[rank].values()))
        once_per_stream = sum(size(s) for shards in per_stream[rank].values() for s in shards)
        assert once <= loader.bytes_read <= once_per_stream
