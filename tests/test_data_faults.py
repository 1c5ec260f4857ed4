"""Faults in data prep and loading (issue 11): hostile shard names, colliding keys, leftovers of
killed writes, mismatched class lists, extreme images, flaky file systems, unreadable training
windows (tests/test_data_faults_loading.py), and prep stopped by SLURM's signals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist.atomic import temporary_sibling
from mvar_dist.cli import main as cli_main
from mvar_dist.data_prep import preprocess, sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import RECORDS_DIR, shard_dataset
from mvar_dist.data_prep.verify import verify_manifest
from mvar_dist.shards.format import CODES_FIELD
from mvar_dist.shards.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest
from mvar_dist.shards.tar_reader import iter_samples
from mvar_dist.tokenizer import MultiScaleVQVAE

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)
TOKENIZER_FLAGS = [
    "--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--patch-nums", "1,2,3,4",
    "--tokenizer-options", json.dumps({"ch_mult": [1], "num_res_blocks": 1}), "--device", "cpu", "--no-progress",
]
NUM_CLASSES, PER_CLASS, SHARD_SIZE = 4, 12, 7  # 48 samples in 7 shards, the last one short


@pytest.fixture(scope="module")
def tokenizer() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(**TOKENIZER_CONFIG)


def random_image(rng: np.random.Generator, low: int = 4, high: int = 12) -> Image.Image:
    shape = (int(rng.integers(low, high)), int(rng.integers(low, high)), 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def write_images(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            random_image(rng).save(root / f"class{c}" / f"{i}.png")
    return root


def shard_files(split_dir: Path) -> dict[str, list]:
    manifest = json.loads((split_dir / MANIFEST_NAME).read_text())
    result = {}
    for shard in manifest["shards"]:
        with open(split_dir / shard["name"], "rb") as f:
            result[shard["name"]] = list(iter_samples(f))
    return result


def leftovers(directory: Path) -> list[str]:
    """Every temporary file of an atomic write (any version's naming) under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.tmp"))


# ----- shard names in a manifest -----

UNSAFE_NAMES = [
    "../outside.tar", "/etc/passwd", "sub/shard.tar", "..", ".", "", "shard.tar; touch PWNED", "$(touch PWNED).tar",
    "`touch PWNED`.tar", "a b.tar", "-rf.tar", ".hidden.tar", "shard.tar\n", "sh\\ard.tar", "{name}.tar",
]


def write_manifest_with(tmp_path: Path, names: list) -> Path:
    split = tmp_path / "train"
    split.mkdir(exist_ok=True)
    shards = [{"name": n, "num_samples": 1, "sha256": "0" * 64, "bytes": 1} for n in names]
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "split": "train", "num_samples": len(names),
            "num_shards": len(names), "shards": shards, "classes": ["a"], "num_classes": 1}
    (split / MANIFEST_NAME).write_text(json.dumps(data))
    return split / MANIFEST_NAME


@pytest.mark.parametrize("bad", UNSAFE_NAMES)
def test_manifest_refuses_shard_names_that_are_not_plain_file_names(tmp_path, bad):
    path = write_manifest_with(tmp_path, ["good-train-000000.tar", bad])
    with pytest.raises(ValueError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message and "shards[1]" in message and repr(bad) in message
    # through a pipe: template nothing may run either
    with pytest.raises(ValueError, match=r"shards\[1\]"):
        load_manifest(path, shard_url_template=f"pipe:cat {tmp_path}/{{name}}")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_manifest_refuses_non_string_names(tmp_path):
    path = write_manifest_with(tmp_path, ["good-train-000000.tar", 7])
    with pytest.raises(ValueError, match=r"shards\[1\]"):
        load_manifest(path)


def test_manifest_split_put_into_a_url_template_must_be_plain(tmp_path):
    path = write_manifest_with(tmp_path, ["good-train-000000.tar"])
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"split": "x; touch PWNED"}))
    with pytest.raises(ValueError, match=r"split 'x; touch PWNED'"):
        load_manifest(path, shard_url_template=f"pipe:cat {tmp_path}/{{split}}/{{name}}")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_manifest_accepts_plain_names(tmp_path):
    names = ["imagenet-train-000000.tar", "my_set.v2-val-000001.tar", "A-B_c.d-999999.tar"]
    manifest = load_manifest(write_manifest_with(tmp_path, names))
    assert manifest.shard_urls == tuple(str(tmp_path / "train" / n) for n in names)


def test_prep_refuses_a_name_that_makes_unsafe_shard_names(tmp_path, tokenizer):
    images = write_images(tmp_path / "images", 1, 2)
    for name, split in (("../up", "train"), ("a/b", "train"), ("x", "tr ain"), ("$(id)", "train")):
        with pytest.raises(ValueError, match="shard name"):
            shard_dataset(sources.list_class_folder(images), tmp_path / "out", tokenizer, name=name, split=split,
                          shard_size=2, progress=False)
    assert not (tmp_path / "up-train-000000.tar").exists()


# ----- keys -----

def test_keys_are_unique_for_adversarial_names():
    from mvar_dist.shards.format import unique_keys

    names = ["c0/a.jpg", "c0/a.png", "c0/a_jpg.png", "c0/a_png.jpg", "c0/a_jpg_png.bmp", "c0/a.JPG", "c0/a_JPG.png",
             "c0/a.b.jpg", "c0/a_b.jpg", "c0/a_b_jpg.png", "c0/a%2Eb.png", "c0/a.b.png",
             "c0/" + "y" * 200 + ".jpg", "c0/" + "y" * 200 + ".png", "c0/" + "y" * 200 + "_jpg.png"]
    keys = unique_keys(names)
    assert len(set(keys)) == len(keys) == len(names)
    assert all(len(k) <= 80 and "." not in k for k in keys)
    # names that never collided keep today's key: existing shards keep their keys
    assert keys[names.index("c0/a_jpg_png.bmp")] == "c0/a_jpg_png"
    # a stem shared by two files: the extension becomes part of the key, as before
    assert keys[names.index("c0/a_b_jpg.png")] == "c0/a_b_jpg"
    # and the result does not depend on the listing order
    shuffled = names[::-1]
    assert dict(zip(shuffled, unique_keys(shuffled))) == dict(zip(names, keys))


def test_keys_are_unique_for_random_name_sets():
    from mvar_dist.shards.format import unique_keys

    rng = random.Random(0)
    parts = ["a", "_", ".", "jpg", "png", "%2E", "_jpg", ".jpg", "b"]
    for _ in range(300):
        names = {"c/" + "".join(rng.choice(parts) for _ in range(rng.randint(1, 5))) + rng.choice([".jpg", ".png"])
                 for _ in range(rng.randint(2, 12))}
        keys = unique_keys(sorted(names))
        assert len(set(keys)) == len(names), sorted(names)


def test_keys_unchanged_for_names_that_never_collided():
    records = sources._assign_keys([("n01/n01_10026.JPEG", 0), ("n01/x.png", 0), ("n01/x.jpg", 0), ("n02/a b.png", 1)])
    assert [r.key for r in records] == ["n01/n01_10026", "n01/x_png", "n01/x_jpg", "n02/a%20b"]


def test_prep_with_colliding_names_writes_shards_verify_accepts(tmp_path, tokenizer):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images" / "c0"
    folder.mkdir(parents=True)
    names = ["a.jpg", "a.png", "a_jpg.png", "a_png.jpg", "a.JPG", "b.png"]
    for name in names:
        random_image(rng).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    shard_dataset(sources.list_class_folder(tmp_path / "images"), tmp_path / "out", tokenizer, name="k", split="train",
                  shard_size=len(names), batch_size=4, progress=False)
    merge_manifest(tmp_path / "out", "train")
    report = verify_manifest(tmp_path / "out" / "train" / MANIFEST_NAME)
    assert report.ok, report.bad_shards
    assert cli_main(["verify-shards", str(tmp_path / "out")]) == 0
    keys = [s.key for samples in shard_files(tmp_path / "out" / "train").values() for s in samples]
    assert len(keys) == len(set(keys)) == len(names)


# ----- leftovers of killed atomic writes -----

def test_rerun_removes_what_a_killed_run_left(tmp_path, tokenizer):
    images = write_images(tmp_path / "images", 3, 4)
    common = dict(name="t", split="train", shard_size=3, batch_size=4, num_tasks=2, progress=False)
    source = sources.list_class_folder(images)
    for task in (0, 1):  # 4 shards: task 0 owns 0 and 2, task 1 owns 1 and 3
        shard_dataset(source, tmp_path / "out", tokenizer, task_id=task, **common)
    split = tmp_path / "out" / "train"
    records = split / RECORDS_DIR
    reference = merge_manifest(tmp_path / "out", "train").read_text()
    (split / MANIFEST_NAME).unlink()

    def leave(path: Path, content: bytes = b"half written") -> Path:
        """What SIGKILL inside mvar_dist.atomic's write of ``path`` leaves behind."""
        tmp = temporary_sibling(path)
        tmp.write_bytes(content)
        return tmp

    (records / "t-train-000002.tar.json").unlink()  # killed while writing shard 2's record
    task0 = [leave(records / "t-train-000002.tar.json"), leave(split / "t-train-000002.tar"),
             leave(records / "t-train-000000.tar.json")]
    task1 = [leave(records / "t-train-000001.tar.json"), leave(split / "t-train-000003.tar")]
    (records / "t-train-000001.tar.json.tmp").write_bytes(b"{")  # an earlier version's naming
    task1.append(records / "t-train-000001.tar.json.tmp")
    others = [leave(split / MANIFEST_NAME), leave(records / "prep.json")]
    unrelated = [split / ".notes.txt.abc123.tmp", split / "keep.txt"]
    for path in unrelated:
        path.write_text("not prep's")

    summary = shard_dataset(source, tmp_path / "out", tokenizer, task_id=0, **common)
    assert summary.shards_written == ["t-train-000002.tar"]
    assert not any(p.exists() for p in task0), "task 0 must clean the leftovers of the shards it owns"
    assert all(p.exists() for p in task1 + others), "task 0 must not touch what other tasks own"

    merged = merge_manifest(tmp_path / "out", "train")
    assert merged.read_text() == reference
    assert not any(p.exists() for p in task1 + others)
    assert all(p.exists() for p in unrelated)
    assert leftovers(tmp_path / "out") == ["train/.notes.txt.abc123.tmp"]


# ----- train and validation class lists -----

def manifest_with_classes(location: str, classes: list[str]) -> Manifest:
    return Manifest(location, {"classes": classes, "num_classes": len(classes)}, ())


def test_same_classes_pass():
    from mvar_dist.shards.manifest import check_same_classes

    assert check_same_classes(manifest_with_classes("t.json", ["a", "b"]), manifest_with_classes("v.json", ["a", "b"])) is None


def test_class_lists_that_differ_are_refused_naming_the_first_difference():
    from mvar_dist.shards.manifest import check_same_classes

    train = manifest_with_classes("/codes/train/manifest.json", ["n01", "n02", "n03", "n04"])
    shifted = manifest_with_classes("/codes/val/manifest.json", ["n01", "n03", "n04", "n05"])
    with pytest.raises(ValueError) as caught:
        check_same_classes(train, shifted)
    message = str(caught.value)
    assert "/codes/train/manifest.json" in message and "/codes/val/manifest.json" in message
    assert "index 1" in message and "'n02'" in message and "'n03'" in message
    assert "--classes-from" in message


def test_class_lists_of_different_length_are_refused():
    from mvar_dist.shards.manifest import check_same_classes

    train = manifest_with_classes("train.json", ["n01", "n02", "n03"])
    short = manifest_with_classes("val.json", ["n01", "n02"])
    for a, b in ((train, short), (short, train)):
        with pytest.raises(ValueError) as caught:
            check_same_classes(a, b)
        message = str(caught.value)
        assert "3 classes" in message and "2 classes" in message and "'n03'" in message and "index 2" in message


# ----- extreme images -----

def test_preprocess_refuses_extreme_aspect_ratios():
    for size in ((1, 100000), (100000, 1), (3, 1000)):
        with pytest.raises(ValueError, match="aspect ratio"):
            preprocess.center_crop_resize(Image.new("RGB", size), 4)
    preprocess.center_crop_resize(Image.new("RGB", (40, 4)), 4)  # 10:1 is an image, not a hazard


def test_load_image_refuses_extreme_image_before_decoding(tmp_path):
    path = tmp_path / "line.png"
    Image.new("RGB", (100000, 1), (10, 20, 30)).save(path)
    with pytest.raises(ValueError, match=r"aspect ratio.*100000x1"):
        preprocess.load_image(str(path), 8)  # no 256: before the fix that allocates 256 x 25.6M pixels


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    edges = [0, 1, 128, 129, 257, 300, 30000, 65278, 65535]
    values = np.array(edges + list(np.linspace(400, 65000, 64 - len(edges)).astype(int)), dtype=np.uint16).reshape(8, 8)
    expected = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # mode I;16: a 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I;16")
    array, size = preprocess.load_image(str(path), 8)
    assert size == (8, 8)
    np.testing.assert_array_equal(array, np.repeat(expected[:, :, None], 3, axis=2))
    as_int = Image.fromarray(values.astype(np.int32))  # mode I, as older Pillow reads 16-bit PNGs
    np.testing.assert_array_equal(preprocess.center_crop_resize(as_int, 8), np.repeat(expected[:, :, None], 3, axis=2))


def test_prep_skips_extreme_images_and_converts_16_bit_ones(tmp_path, tokenizer):
    rng = np.random.default_rng(2)
    folder = tmp_path / "images" / "c0"
    folder.mkdir(parents=True)
    random_image(rng).save(folder / "normal.png")
    Image.new("RGB", (100000, 1), (200, 10, 10)).save(folder / "wide.png")
    Image.new("RGB", (1, 100000), (10, 200, 10)).save(folder / "tall.png")
    deep = (rng.integers(0, 2, (8, 8)) * 60000 + 300).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(((deep.astype(np.int64) + 128) // 257).astype(np.uint8)).convert("RGB").save(folder / "deep8.png")
    shard_dataset(sources.list_class_folder(tmp_path / "images"), tmp_path / "out", tokenizer, name="x", split="train",
                  shard_size=10, batch_size=4, progress=False)
    manifest = json.loads(merge_manifest(tmp_path / "out", "train").read_text())
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(skipped) == ["c0/tall.png", "c0/wide.png"]
    assert all("aspect ratio" in reason for reason in skipped.values())
    samples = {s.key: s for samples in shard_files(tmp_path / "out" / "train").values() for s in samples}
    assert sorted(samples) == ["c0/deep16", "c0/deep8", "c0/normal"]
    assert samples["c0/deep16"].fields[CODES_FIELD] == samples["c0/deep8"].fields[CODES_FIELD]
