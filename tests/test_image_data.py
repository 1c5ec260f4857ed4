"""The image loader for tokenizer training: folder and tar sources, order and pixels independent
of workers, exact resume, equal disjoint rank shares, bad images, 16-bit PNGs, exactly-once
validation, brace patterns and the refusal of remote URLs. Two ranks are simulated in-process."""

from __future__ import annotations

import io
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist.images import (
    ImageDataConfig,
    build_image_train_loader,
    build_image_val_loader,
)
from mvar_dist.images.batches import Batch, decode_view
from mvar_dist.images.loader import ImageTrainLoader, ImageValLoader
from mvar_dist.images.sources import expand_braces, index_folder, open_source
from mvar_dist.shards.read_errors import BadDataError

SIZE = 8  # crop side


def write_folder(root: Path, classes: int = 3, per_class: int = 7, seed: int = 0, exact: bool = False) -> None:
    """Random RGB images, one folder per class; ``exact``: SIZE x SIZE PNGs whose pixels a
    centre-crop, no-flip, ratio-1 loader returns unchanged (so outputs identify their source)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (SIZE, SIZE, 3) if exact else (int(rng.integers(9, 16)), int(rng.integers(9, 16)), 3)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            image.save(root / f"class{c}" / (f"{i:02d}.jpg" if i % 3 == 2 and not exact else f"{i:02d}.png"))


def write_shards(root: Path, folder: Path, per_shard: int = 8, with_cls: bool = True) -> list[Path]:
    """The folder's images, in its index order, as WebDataset shards {key}.png|jpg + {key}.cls."""
    index = index_folder(str(folder))
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(index), per_shard):
        paths.append(root / f"train-{start // per_shard:03d}.tar")
        with tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(len(index), start + per_shard)):
                name = index.name(i)
                members = {f"s{i:04d}.{name.rsplit('.', 1)[1]}": (folder / name).read_bytes()}
                if with_cls:
                    members[f"s{i:04d}.cls"] = str(int(index.labels[i])).encode()
                for member, data in members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def config(train: object, **overrides: object) -> ImageDataConfig:
    base = dict(train=train, image_size=SIZE, resize_ratio=1.25, num_workers=0, seed=5, max_bad_fraction=1.0)
    return ImageDataConfig(**(base | overrides))


def take(loader: object, count: int) -> list[tuple[torch.Tensor, ...]]:
    return list(islice(iter(loader), count))


def assert_same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "train"
    write_folder(root)
    return root


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exact") / "train"
    write_folder(root, classes=2, per_class=13, exact=True)
    return root


def identify(images: torch.Tensor) -> list[bytes]:
    return [((row + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for row in images]


def exact_table(root: Path) -> dict[bytes, str]:
    """Pixels (3, S, S) bytes -> relative path of the exact images, which are all distinct."""
    table = {np.asarray(Image.open(p)).transpose(2, 0, 1).tobytes(): p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    assert len(table) == len(list(root.rglob("*.png")))
    return table


def test_folder_and_shards_give_the_same_samples(folder, tmp_path):
    index = index_folder(str(folder))
    assert index.classes == ("class0", "class1", "class2") and len(index) == 21 and index.num_classes == 3
    shards = write_shards(tmp_path / "shards", folder)
    from_folder = build_image_train_loader(config(str(folder)), rank=1, world_size=2, batch_size=3)
    from_shards = build_image_train_loader(config([str(p) for p in shards]), rank=1, world_size=2, batch_size=3)
    assert from_shards.index.kind == "shards" and from_shards.index.fingerprint != from_folder.index.fingerprint
    batches = take(from_folder, 7)  # more than one epoch (3 batches per epoch)
    assert_same(batches, take(from_shards, 7))
    images, labels = batches[0]
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1
    val_folder = build_image_val_loader(config(str(folder), val=str(folder)), rank=0, world_size=2, batch_size=4)
    val_shards = build_image_val_loader(config(str(folder), val=[str(p) for p in shards]), rank=0, world_size=2, batch_size=4)
    assert_same(list(val_folder), list(val_shards))


def test_order_and_pixels_do_not_depend_on_num_workers(folder):
    serial = build_image_train_loader(config(str(folder)), rank=0, world_size=2, batch_size=2)
    parallel = build_image_train_loader(config(str(folder), num_workers=2, prefetch=1), rank=0, world_size=2, batch_size=2)
    assert_same(take(serial, 8), take(parallel, 8))


def test_resume_is_exact(folder):
    uninterrupted = take(build_image_train_loader(config(str(folder)), rank=1, world_size=2, batch_size=3), 8)
    first = build_image_train_loader(config(str(folder)), rank=1, world_size=2, batch_size=3)
    before = take(first, 2)
    state = first.state_dict()
    fresh = build_image_train_loader(config(str(folder), num_workers=2), rank=1, world_size=2, batch_size=3)
    fresh.load_state_dict(state)
    assert_same(before + take(fresh, 6), uninterrupted)  # across two epoch boundaries
    assert fresh.state_dict()["epoch"] == 2
    other_seed = build_image_train_loader(config(str(folder), seed=6), rank=1, world_size=2, batch_size=3)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_resume_with_another_world_size_keeps_the_epoch_fraction(folder):
    loader = build_image_train_loader(config(str(folder)), rank=0, world_size=2, batch_size=2)  # 5 batches per epoch
    take(loader, 2)
    single = build_image_train_loader(config(str(folder)), rank=0, world_size=1, batch_size=2)
    single.load_state_dict(loader.state_dict())
    assert (single.epoch, single.position) == (0, 8)  # 8 images consumed in all: 4 batches of 2 on one rank


def test_ranks_are_disjoint_with_equal_batch_counts(exact):
    table = exact_table(exact)
    per_rank = []
    for rank in range(2):  # 26 images, 2 ranks, batch 4: 13 each, 3 batches, 1 left over per rank
        loader = build_image_train_loader(config(str(exact), crop="center", hflip=False, resize_ratio=1.0), rank=rank,
                                          world_size=2, batch_size=4)
        assert loader.batches_per_epoch == 3
        epochs = [[table[k] for images, _ in take(loader, 3) for k in identify(images)] for _ in range(2)]
        assert all(len(set(e)) == 12 for e in epochs)
        per_rank.append(epochs)
    for epoch in range(2):
        assert not set(per_rank[0][epoch]) & set(per_rank[1][epoch])
    assert per_rank[0][0] != per_rank[0][1]  # a new permutation each epoch


def test_augmentation_is_a_deterministic_crop_and_flip_of_the_resized_image(folder):
    loader = build_image_train_loader(config(str(folder)), rank=0, world_size=1, batch_size=4)
    reader, path = loader.reader, folder / loader.index.name(5)
    data = path.read_bytes()
    views = [reader.view(data, epoch, 5, True) for epoch in range(6)]
    assert np.array_equal(views[0], reader.view(data, 0, 5, True))  # the same (seed, epoch, index)
    assert len({v.tobytes() for v in views}) > 1  # epochs differ
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    short, long = sorted(rgb.size)
    target = (10, int(10 * long / short)) if rgb.size[0] <= rgb.size[1] else (int(10 * long / short), 10)
    resized = np.asarray(rgb.resize(target, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    crops = {resized[:, t : t + SIZE, l : l + SIZE][:, :, ::f].tobytes()
             for t in range(resized.shape[1] - SIZE + 1) for l in range(resized.shape[2] - SIZE + 1) for f in (1, -1)}
    assert all(v.tobytes() in crops for v in views)
    centre = decode_view(data, SIZE, 10, "bicubic", None, True, True)
    top, left = round((resized.shape[1] - SIZE) / 2), round((resized.shape[2] - SIZE) / 2)
    assert np.array_equal(centre, resized[:, top : top + SIZE, left : left + SIZE])


@pytest.fixture()
def with_bad(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    write_folder(root, classes=2, per_class=6)
    (root / "class0" / "03.png").write_bytes(b"\x89PNG not really")  # does not decode
    Image.fromarray(np.zeros((2, 120, 3), np.uint8)).save(root / "class1" / "04.png")  # 60:1
    return root


def test_bad_images_are_replaced_counted_and_deterministic(with_bad):
    runs = []
    for workers in (0, 2):
        loader = build_image_train_loader(config(str(with_bad), num_workers=workers), rank=0, world_size=1, batch_size=4)
        runs.append(take(loader, 6))  # two epochs of 3 batches
        assert loader.num_skipped == 4 and loader.num_read == 24
    assert_same(*runs)
    assert all(images.shape[0] == 4 for images, _ in runs[0])
    strict = build_image_train_loader(config(str(with_bad), max_bad_fraction=0.1), rank=0, world_size=1, batch_size=4)
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        take(strict, 6)


def test_bad_data_fail_names_the_file_and_the_shard_key(with_bad, tmp_path):
    loader = build_image_train_loader(config(str(with_bad), bad_data="fail"), rank=0, world_size=1, batch_size=4)
    with pytest.raises(BadDataError, match=r"class0/03\.png|class1/04\.png"):
        take(loader, 3)
    shards = write_shards(tmp_path / "shards", with_bad, per_shard=5)
    loader = build_image_train_loader(config([str(p) for p in shards], bad_data="fail"), rank=0, world_size=1, batch_size=4)
    with pytest.raises(BadDataError, match=r"shard .*train-00\d\.tar, key s00(03|10)"):
        take(loader, 3)


def test_a_batch_with_no_good_image_is_filled_from_later_in_the_epoch(with_bad):
    loader = build_image_train_loader(config(str(with_bad)), rank=0, world_size=1, batch_size=2)
    bad = [i for i in range(len(loader.index)) if loader.index.name(i) in ("class0/03.png", "class1/04.png")]
    data = loader.reader.read(Batch(0, 0, np.array(bad), 0, True), loader.plan)
    assert data.num_bad == 2 and bool(data.valid.all()) and data.images.shape == (2, 3, SIZE, SIZE)
    assert not torch.equal(data.images[0], data.images[1])  # one image, each slot's own crop and flip


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    levels = np.array([0, 10 * 257, 128 * 257, 65535], dtype=np.uint16)
    Image.fromarray(np.repeat(levels, 2)[None, :].repeat(SIZE, 0)).save(root / "a.png")  # 16-bit grayscale
    assert Image.open(root / "a.png").mode.startswith("I")
    loader = build_image_val_loader(config(str(root), val=str(root), resize_ratio=1.0), rank=0, world_size=1, batch_size=1)
    images, labels, mask = next(iter(loader))
    expected = torch.tensor([0, 10, 128, 255], dtype=torch.float32).repeat_interleave(2) / 127.5 - 1
    assert bool(mask.all()) and int(labels[0]) == 0  # flat folder: class 0
    assert torch.equal(images[0, :, 0], expected.expand(3, -1))


def test_validation_visits_every_image_exactly_once_with_masks(exact, tmp_path):
    table = exact_table(exact)
    cfg = config(str(exact), val=str(exact), resize_ratio=1.0)
    seen, lengths = [], set()
    for rank in range(2):  # 26 images: 13 per rank, batch 5: 3 batches, the last with 3 rows
        loader = build_image_val_loader(cfg, rank=rank, world_size=2, batch_size=5, classes=("class0", "class1"))
        batches = list(loader)
        lengths.add((len(loader), len(batches)))
        for images, labels, mask in batches:
            assert images.shape == (5, 3, SIZE, SIZE)
            names = [table[k] for k in identify(images[mask])]
            assert labels[mask].tolist() == [int(name[len("class")]) for name in names]
            assert not labels[~mask].any()
            seen += names
    assert lengths == {(3, 3)}
    assert sorted(seen) == sorted(table.values()) and len(seen) == 26


def test_validation_masks_bad_images(with_bad):
    loader = build_image_val_loader(config(str(with_bad), val=str(with_bad)), rank=0, world_size=1, batch_size=5)
    masks = torch.cat([mask for _, _, mask in loader])
    assert int(masks.sum()) == 10 and loader.num_skipped == 2 and len(masks) == 15


def test_brace_patterns_expand(folder, tmp_path):
    assert expand_braces("/d/train-{000000..000002}.tar") == [f"/d/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("a{x,y}{8..10}") == ["ax8", "ax9", "ax10", "ay8", "ay9", "ay10"]
    assert expand_braces("plain.tar") == ["plain.tar"] and expand_braces("a{b}c") == ["a{b}c"]
    shards = write_shards(tmp_path / "shards", folder)
    index = open_source(str(tmp_path / "shards" / f"train-{{000..{len(shards) - 1:03d}}}.tar"), "data.train")
    assert index.containers == tuple(str(p) for p in shards) and len(index) == 21
    assert index.labels.tolist() == index_folder(str(folder)).labels.tolist()
    with pytest.raises(FileNotFoundError, match="97 of 100 shard.*train-003.tar"):
        open_source(str(tmp_path / "shards" / "train-{000..099}.tar"), "data.train")


def test_shards_without_cls_are_class_0_and_a_missing_cls_is_bad(folder, tmp_path):
    shards = write_shards(tmp_path / "plain", folder, with_cls=False)
    assert open_source([str(p) for p in shards], "data.train").labels.tolist() == [0] * 21
    shards = write_shards(tmp_path / "mixed", folder)
    with tarfile.open(shards[0], "a") as tar:  # a labelled shard set with one sample lacking its .cls
        info = tarfile.TarInfo("extra.png")
        info.size = len(data := (folder / "class0" / "00.png").read_bytes())
        tar.addfile(info, io.BytesIO(data))
    index = open_source([str(p) for p in shards], "data.train")
    assert len(index) == 22 and index.labels.tolist().count(-1) == 1
    loader = ImageValLoader(index, config(str(folder), bad_data="fail"), 0, 1, 22)
    with pytest.raises(BadDataError, match=r"key extra\b.*\.cls"):
        next(iter(loader))


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary"])
def test_a_truncated_shard_keeps_the_samples_before_the_cut_or_fails(folder, tmp_path, where):
    shard = write_shards(tmp_path / "cut", folder, per_shard=21)[0]
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[20].offset  # the header of sample 10's image: 10 whole samples before it
    shard.write_bytes(data[: boundary + (700 if where == "inside a member" else 0)])
    assert len(open_source(str(shard), "data.train", "skip")) == 10
    with pytest.raises(BadDataError, match=r"train-000\.tar: .*truncated shard"):
        open_source(str(shard), "data.train", "fail")


@pytest.mark.parametrize("url", ["s3://bucket/train-{000..009}.tar", "https://host/a.tar", "pipe:curl -s x"])
def test_remote_urls_are_refused(url):
    with pytest.raises(ValueError, match=r"data\.train=.*remote shards are not supported"):
        ImageDataConfig(train=url).validate()
    with pytest.raises(ValueError, match=r"data\.val=.*random global order"):
        open_source([url], "data.val")


@pytest.mark.parametrize("field, value", [
    ("image_size", 0), ("crop", "left"), ("resize_ratio", 0.9), ("resample", "nearest"), ("num_workers", -1),
    ("prefetch", 0), ("bad_data", "ignore"), ("max_bad_fraction", 1.5), ("seed", -1), ("train", 3),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"data\.{field}.*{value}"):
        ImageDataConfig(**{field: value}).validate()


def test_too_few_images_and_bad_ranks_are_refused(folder):
    with pytest.raises(ValueError, match="21 images: too few"):
        build_image_train_loader(config(str(folder)), rank=0, world_size=4, batch_size=8)
    with pytest.raises(ValueError, match="rank"):
        ImageValLoader(index_folder(str(folder)), config(str(folder)), 2, 2, 4)
    assert isinstance(build_image_train_loader(config(str(folder)), rank=0, world_size=1, batch_size=1), ImageTrainLoader)
    assert build_image_val_loader(config(str(folder)), rank=0, world_size=1, batch_size=1) is None
