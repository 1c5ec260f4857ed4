"""Sharding an image folder into code shards: content, manifest, verify, resume, array split."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist.cli import main as cli_main
from mvar_dist.commands.verify_shards import main as verify_main
from mvar_dist.data_prep import preprocess, sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import RECORDS_DIR, shard_dataset, tokenize_views
from mvar_dist.data_prep.verify import verify_manifest
from mvar_dist.shards.format import CODES_FIELD, decode_codes, key_from_path
from mvar_dist.shards.tar_reader import iter_samples, read_canonical
from mvar_dist.tokenizer import MultiScaleVQVAE

# a tiny tokenizer: no downsampling, 4x4 latent -> 4 px images, L = 1+4+9+16 = 30
TOKENIZER_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)
CLASSES = ("cat", "dog", "fox")
IMAGES_PER_CLASS = 6
PREP = dict(name="tiny", split="train", shard_size=5, batch_size=4, progress=False)


def make_image_folder(root: Path, per_class: int = IMAGES_PER_CLASS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (int(rng.integers(8, 30)), int(rng.integers(8, 30)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "not_an_image.jpg").write_bytes(b"this is text")
    whole = (root / "fox" / "fox_0.jpg").read_bytes()
    (root / "fox" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def tokenizer() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(**TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory, tokenizer: MultiScaleVQVAE) -> tuple[Path, Path]:
    """(image folder, output directory) of one single-process prep run, shard size 5."""
    base = tmp_path_factory.mktemp("prep")
    images = make_image_folder(base / "images")
    shard_dataset(sources.list_class_folder(images), base / "out", tokenizer, **PREP)
    merge_manifest(base / "out", "train")
    return images, base / "out"


def read_shard(path: Path) -> list:
    with open(path, "rb") as f:
        return list(iter_samples(f))


def test_manifest_describes_shards_and_skipped_images(prepped, tokenizer):
    _, out = prepped
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    good = len(CLASSES) * IMAGES_PER_CLASS
    assert manifest["num_samples"] == good
    assert manifest["num_images_listed"] == good + 2
    assert manifest["num_shards"] == 4 and [s["name"] for s in manifest["shards"]] == [f"tiny-train-{i:06d}.tar" for i in range(4)]
    assert sum(s["num_samples"] for s in manifest["shards"]) == good
    assert manifest["classes"] == list(CLASSES)
    assert sorted(s["path"] for s in manifest["skipped"]) == ["dog/not_an_image.jpg", "fox/truncated.jpg"]
    assert all(s["reason"] and s["shard"].startswith("tiny-train-") for s in manifest["skipped"])
    assert manifest["patch_nums"] == [1, 2, 3, 4] and manifest["num_tokens"] == 30
    assert manifest["vocab_size"] == 64 and manifest["image_size"] == 4
    assert manifest["tokenizer"] == json.loads(json.dumps(tokenizer.identity()))
    assert manifest["preprocessing"]["name"] == preprocess.RECIPE_NAME
    assert manifest["tool"]["version"]


def test_samples_hold_codes_of_image_and_flip(prepped, tokenizer):
    images, out = prepped
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    samples = [s for shard in manifest["shards"] for s in read_shard(out / "train" / shard["name"])]
    assert len({s.key for s in samples}) == len(samples) == manifest["num_samples"]
    arrays, stored = [], []
    for sample in samples[:4]:
        meta = json.loads(sample.fields["json"])
        label = int(sample.fields["cls"])
        assert meta["path"].split("/")[0] == CLASSES[label] and sample.key == key_from_path(meta["path"])
        array, size = preprocess.load_image(str(images / meta["path"]), 4)
        assert list(size) == meta["size"]
        arrays.append(array)
        stored.append(decode_codes(sample.fields[CODES_FIELD], 30, 64))
    expected = tokenize_views(tokenizer, np.stack(arrays), torch.device("cpu"))
    np.testing.assert_array_equal(np.stack(stored), expected)
    flipped = tokenize_views(tokenizer, np.stack(arrays)[:, :, ::-1].copy(), torch.device("cpu"))
    np.testing.assert_array_equal(np.stack(stored)[:, 1], flipped[:, 0])


def test_center_crop_resize_follows_recipe():
    image = Image.fromarray(np.arange(40 * 100 * 3, dtype=np.uint8).reshape(40, 100, 3))
    out = preprocess.center_crop_resize(image, 8)  # 100x40 -> halved twice to 25x10 -> 20x8 -> crop x 6..14
    resized = image.resize((50, 20), Image.BOX).resize((25, 10), Image.BOX).resize((20, 8), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(resized)[:, 6:14])


def test_verify_passes_then_names_truncated_shard(prepped, tmp_path, capsys):
    _, out = prepped
    assert verify_main([str(out)]) == 0
    broken = tmp_path / "out"
    shutil.copytree(out, broken)
    shard = broken / "train" / "tiny-train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    report = verify_manifest(broken / "train" / "manifest.json")
    assert list(report.bad_shards) == ["tiny-train-000002.tar"]
    assert verify_main([str(broken / "train")]) == 1
    assert "bad shard tiny-train-000002.tar" in capsys.readouterr().out


def test_verify_detects_out_of_range_code(prepped, tmp_path):
    _, out = prepped
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shard = copy / "train" / "tiny-train-000001.tar"
    data = bytearray(shard.read_bytes())
    position = data.index(b".codes.u16") // 512 * 512 + 512  # first codes payload
    data[position : position + 2] = np.array([64], dtype="<u2").tobytes()
    shard.write_bytes(bytes(data))
    report = verify_manifest(copy / "train" / "manifest.json")
    assert list(report.bad_shards) == ["tiny-train-000001.tar"]
    assert "out of range" in report.bad_shards["tiny-train-000001.tar"]


def test_rerun_skips_complete_shards_and_replaces_half_written_one(prepped, tokenizer, tmp_path):
    images, out = prepped
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    split = copy / "train"
    target = "tiny-train-000002.tar"
    original = (split / target).read_bytes()
    (split / RECORDS_DIR / f"{target}.json").unlink()  # as if killed before the record was written
    (split / target).unlink()
    (split / f"{target}.tmp").write_bytes(b"half a shard")
    before = {p.name: p.stat().st_mtime_ns for p in split.glob("*.tar")}
    summary = shard_dataset(sources.list_class_folder(images), copy, tokenizer, **PREP)
    assert summary.shards_written == [target]
    assert len(summary.shards_skipped) == 3
    assert not (split / f"{target}.tmp").exists()
    assert (split / target).read_bytes() == original
    assert {p.name: p.stat().st_mtime_ns for p in split.glob("*.tar") if p.name != target} == before
    assert merge_manifest(copy, "train").read_text() == (out / "train" / "manifest.json").read_text()


def test_array_tasks_and_merge_equal_single_process(prepped, tokenizer, tmp_path):
    images, out = prepped
    source = sources.list_class_folder(images)
    common = dict(name="tiny", split="train", shard_size=5, batch_size=4, num_tasks=2, progress=False)
    first = shard_dataset(source, tmp_path, tokenizer, task_id=0, **common)
    assert first.shards_written == ["tiny-train-000000.tar", "tiny-train-000002.tar"]
    with pytest.raises(RuntimeError, match="not complete"):
        merge_manifest(tmp_path, "train")
    shard_dataset(source, tmp_path, tokenizer, task_id=1, **common)
    merged = merge_manifest(tmp_path, "train")
    assert merged.read_text() == (out / "train" / "manifest.json").read_text()
    for shard in sorted((out / "train").glob("*.tar")):
        assert (tmp_path / "train" / shard.name).read_bytes() == shard.read_bytes()


def test_prep_refuses_to_mix_runs(prepped, tmp_path):
    images, out = prepped
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    torch.manual_seed(1)
    other = MultiScaleVQVAE(**TOKENIZER_CONFIG)
    with pytest.raises(ValueError, match="different prep run.*tokenizer"):
        shard_dataset(sources.list_class_folder(images), copy, other, name="tiny", split="train", shard_size=5, progress=False)


def test_cli_prep_flat_val_folder_and_verify(prepped, tokenizer, tmp_path, capsys):
    images, _ = prepped
    flat = tmp_path / "val"
    flat.mkdir()
    lines = []
    for i, name in enumerate(("fox", "cat", "fox", "dog")):
        shutil.copy(images / name / f"{name}_2.jpg", flat / f"VAL_{i:04d}.JPEG")
        lines.append(f"VAL_{i:04d},{name} 1 2 3 4")
    (tmp_path / "labels.csv").write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
    checkpoint = tmp_path / "tok.pth"
    torch.save(tokenizer.state_dict(), checkpoint)
    options = {"ch_mult": [1], "num_res_blocks": 1}
    code = cli_main([
        "prep", str(flat), "--split", "val", "--out", str(tmp_path / "codes"), "--name", "tiny",
        "--val-labels", str(tmp_path / "labels.csv"), "--classes-from", str(images), "--tokenizer", str(checkpoint),
        "--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--patch-nums", "1,2,3,4",
        "--tokenizer-options", json.dumps(options), "--shard-size", "3", "--device", "cpu", "--no-progress",
    ])
    assert code == 0
    manifest = json.loads((tmp_path / "codes" / "val" / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["num_samples"] == 4 and manifest["num_shards"] == 2
    labels = {}
    for shard in manifest["shards"]:
        for sample in read_shard(tmp_path / "codes" / "val" / shard["name"]):
            labels[sample.key] = int(sample.fields["cls"])
    assert labels == {"VAL_0000": 2, "VAL_0001": 0, "VAL_0002": 2, "VAL_0003": 1}
    assert cli_main(["verify-shards", str(tmp_path / "codes")]) == 0
    assert "OK" in capsys.readouterr().out


def test_label_file_with_integer_ids_is_refused(tmp_path):
    flat = tmp_path / "val"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.JPEG")
    (tmp_path / "gt.txt").write_text("490\n")
    with pytest.raises(ValueError, match="integer labels"):
        sources.list_flat_folder(flat, tmp_path / "gt.txt")


def test_keys_are_safe_and_distinct():
    assert key_from_path("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert key_from_path("a/b.c d.png") == "a/b%2Ec%20d"
    long_key = key_from_path("x/" + "y" * 200 + ".jpg")
    assert len(long_key) <= 80 and long_key != key_from_path("x/" + "y" * 199 + ".jpg")


def test_canonical_reader_agrees_with_general_reader(prepped, tmp_path):
    _, out = prepped
    data = (out / "train" / "tiny-train-000000.tar").read_bytes()
    fast = read_canonical(data, 2 * 30 * 2)
    slow = read_shard(out / "train" / "tiny-train-000000.tar")
    assert fast is not None and len(fast.labels) == len(slow) >= 3
    for index, sample in enumerate(slow):
        assert fast.key(index) == sample.key and fast.labels[index] == int(sample.fields["cls"])
        assert fast.codes[index].tobytes() == sample.fields[CODES_FIELD]
    assert read_canonical(data[: 512 * 9 + 100], 120) is None  # truncated: left to the general reader
    assert read_canonical(data[: 512 * 9], 120) is None  # cut at a block boundary, inside a sample
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:  # long names: pax records
        for sample in slow[:2]:
            for field, payload in sample.fields.items():
                info = tarfile.TarInfo(f"{'deep/' * 30}{sample.key}.{field}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    assert read_canonical(pax.read_bytes(), 120) is None
    assert [s.key for s in read_shard(pax)] == [f"{'deep/' * 30}{s.key}" for s in slow[:2]]
