"""The quickstart's digits: split, image folder, and the judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvar_dist.quickstart.digits import (
    DigitJudge,
    default_judge,
    grey_to_model_images,
    judge_accuracy,
    load_digits_split,
    read_image_folder,
    real_val_accuracy,
    upscale_digits,
    write_digits_image_folder,
)


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    first, again, other = load_digits_split(seed=0), load_digits_split(seed=0), load_digits_split(seed=1)
    assert len(first.train_labels) + len(first.val_labels) == 1797
    assert len(first.val_labels) == 300
    assert np.array_equal(first.val_images, again.val_images) and np.array_equal(first.train_labels, again.train_labels)
    assert not np.array_equal(first.val_images, other.val_images)
    assert np.bincount(first.val_labels, minlength=10).min() >= 29  # stratified: ~30 of every class
    train_rows = {row.tobytes() for row in first.train_images.reshape(len(first.train_labels), -1)}
    val_rows = [row.tobytes() for row in first.val_images.reshape(300, -1)]
    # sklearn's digits hold a handful of exact duplicates; the split itself must not repeat indices
    assert sum(row in train_rows for row in val_rows) <= 3
    with pytest.raises(ValueError, match="val_size"):
        load_digits_split(val_size=5)


def test_upscale_keeps_the_digit() -> None:
    digits = load_digits_split().val_images[:50]
    grey = upscale_digits(digits, 16)
    assert grey.shape == (50, 16, 16) and grey.dtype == np.uint8
    pooled = torch.from_numpy(grey).float().view(50, 8, 2, 8, 2).mean(dim=(2, 4)) / 255 * 16
    assert float((pooled - torch.from_numpy(digits)).abs().mean()) < 1.0  # of 0..16
    assert np.array_equal(upscale_digits(digits, 8), np.round(digits * 255 / 16).astype(np.uint8))
    with pytest.raises(ValueError, match="8, 8"):
        upscale_digits(np.zeros((2, 16, 16)), 16)


def test_image_folder_counts_and_determinism(tmp_path) -> None:
    counts = write_digits_image_folder(tmp_path / "a", image_size=16)
    data = load_digits_split()
    for split, labels in (("train", data.train_labels), ("val", data.val_labels)):
        expected = np.bincount(labels, minlength=10)
        assert [counts[split][str(c)] for c in range(10)] == expected.tolist()
        on_disk = [len(list((tmp_path / "a" / split / str(c)).glob("*.png"))) for c in range(10)]
        assert on_disk == expected.tolist()
    write_digits_image_folder(tmp_path / "b", image_size=16)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    # the folder reads back as the exact pixels and labels of the split
    images, labels = read_image_folder(tmp_path / "a" / "val")
    assert images.shape == (300, 3, 16, 16) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert sorted(labels.tolist()) == sorted(data.val_labels.tolist())
    expected_pixels = grey_to_model_images(upscale_digits(data.val_images, 16))
    order = np.argsort(data.val_labels, kind="stable")  # files are numbered in split order per class
    assert torch.equal(images, expected_pixels[torch.from_numpy(order)])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left


def test_image_folder_is_reused_or_refused(tmp_path) -> None:
    write_digits_image_folder(tmp_path / "d", image_size=8)
    assert write_digits_image_folder(tmp_path / "d", image_size=8)["val"]["0"] == 30  # same settings: reused
    with pytest.raises(FileExistsError, match="overwrite"):
        write_digits_image_folder(tmp_path / "d", image_size=16)
    write_digits_image_folder(tmp_path / "d", image_size=16, overwrite=True)
    assert read_image_folder(tmp_path / "d" / "train")[0].shape[-1] == 16


def test_judge_recognises_real_digits_and_rejects_wrong_labels() -> None:
    data = load_digits_split()
    images = grey_to_model_images(upscale_digits(data.val_images, 16))
    accuracy = judge_accuracy((images + 1) / 2, data.val_labels)
    assert accuracy >= 0.95
    assert real_val_accuracy(16) == pytest.approx(accuracy)
    shifted = (data.val_labels + 1) % 10
    assert judge_accuracy((images + 1) / 2, shifted) < 0.05
    # blank images are not digits of every class
    assert judge_accuracy(torch.zeros(10, 3, 16, 16), np.arange(10)) <= 0.2


def test_judge_checks_its_inputs() -> None:
    judge = default_judge()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.accuracy(torch.full((2, 3, 16, 16), -1.0), [0, 1])
    with pytest.raises(ValueError, match="one intended label"):
        judge.accuracy(torch.zeros(2, 3, 16, 16), [0, 1, 2])
    with pytest.raises(ValueError, match="multiples of 8"):
        judge.accuracy(torch.zeros(2, 3, 12, 12), [0, 1])


def test_judge_is_fitted_on_training_digits_only() -> None:
    data = load_digits_split()
    judge = DigitJudge(data.train_images, data.train_labels)
    assert np.array_equal(judge.classifier.classes_, np.arange(10))
    assert judge.classifier.shape_fit_[0] == len(data.train_labels)
