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


# ---- the FID in the judge's feature space ----


def _independent_frechet(first: np.ndarray, second: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 sum sqrt(eig(S1^1/2 S2 S1^1/2))), via symmetric eigensolves
    (no sqrtm of the non-symmetric product, as the project's frechet_distance takes)."""
    mu1, mu2 = first.mean(0), second.mean(0)
    s1, s2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def test_judge_features_are_its_45_pairwise_decisions() -> None:
    from mvar_dist.quickstart.digits import real_digit_images

    judge = default_judge()
    images, labels = real_digit_images("val", 16)
    features = judge.features(images)
    assert features.shape == (300, DigitJudge.FEATURE_DIM) == (300, 45) and features.dtype == np.float64
    assert np.isfinite(features).all()
    assert np.array_equal(judge.features(images[:7]), features[:7])  # per image, not per batch
    # the one-vs-one decisions the vote is taken over: the "ovo" shape did not change the predictions
    from sklearn.svm import SVC

    data = load_digits_split()
    plain = SVC().fit(data.train_images.reshape(len(data.train_labels), -1), data.train_labels)
    assert np.array_equal(plain.predict(judge.to_digit_features(images)), judge.predict(images))


def test_fid_of_real_digits_is_small_and_of_noise_large() -> None:
    from mvar_dist.quickstart.digits import generated_fid, judge_fid, real_digit_images, real_fid_floor

    val, _ = real_digit_images("val", 16)
    train, train_labels = real_digit_images("train", 16)
    # measured (default split, seed 0): 200 training digits (20 per class) vs the 300 validation
    # digits 0.19 (mean of 10 draws; single draws 0.14-0.25); all 1,497 0.087; 200 uniform-noise images ~22.7, 200 dark
    # images ~29; 200 real digits of the classes 0-4 only 4.3
    floor = real_fid_floor(20, 16)
    assert 0.05 < floor < 0.5
    assert generated_fid(train) < 0.15
    assert real_fid_floor(20, 16) == floor  # seeded draws
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 3, 16, 16, generator=generator)
    assert generated_fid(noise) > 10
    half_the_classes = train[torch.from_numpy(np.flatnonzero(train_labels < 5)[:200])]
    assert generated_fid(half_the_classes) > 5 * floor  # the judge's features see the missing classes
    # a smaller sample is further from the same distribution: the floor depends on the size
    assert real_fid_floor(2, 16) > floor
    assert judge_fid(val, val) == pytest.approx(0.0, abs=1e-6)


def test_fid_is_the_projects_frechet_distance(monkeypatch) -> None:
    from mvar_dist.evaluation import statistics
    from mvar_dist.quickstart import digits
    from mvar_dist.quickstart.digits import generated_fid, real_digit_images

    val, _ = real_digit_images("val", 16)
    train, _ = real_digit_images("train", 16)
    judge = default_judge()
    expected = _independent_frechet(judge.features(train[:200]), judge.features(val))
    assert generated_fid(train[:200]) == pytest.approx(expected, rel=1e-6, abs=1e-9)

    calls = []

    def recording(first, second, eps=1e-6):
        calls.append((first, second))
        return statistics.frechet_distance(first, second, eps)

    monkeypatch.setattr(digits, "frechet_distance", recording)
    assert generated_fid(train[:200]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert len(calls) == 1 and isinstance(calls[0][0], statistics.FeatureStatistics)
    np.testing.assert_allclose(calls[0][1].mu, judge.features(val).mean(0))  # the real side: the validation digits
    digits.real_fid_floor(20, 16, draws=3)
    assert len(calls) == 4  # one per draw


def test_quickstart_reports_the_fid_beside_the_accuracy(monkeypatch) -> None:
    from mvar_dist.commands.quickstart import format_fid
    from mvar_dist.quickstart import pipeline

    monkeypatch.setattr(pipeline, "generated_fid", lambda images, image_size: 1.25)
    monkeypatch.setattr(pipeline, "real_fid_floor", lambda per_class, image_size: 0.5)
    assert pipeline.judge_fids(torch.zeros(4, 3, 16, 16), 2) == {"judged_fid": 1.25, "real_fid_floor": 0.5}

    def refused(per_class, image_size):
        raise ValueError("the covariance product has a matrix square root with imaginary part")

    monkeypatch.setattr(pipeline, "real_fid_floor", refused)
    assert pipeline.judge_fids(torch.zeros(4, 3, 16, 16), 2) == {"judged_fid": 1.25, "real_fid_floor": None}
    assert "1.250" in format_fid({"judged_fid": 1.25, "real_fid_floor": None})
    # a summary.json written before the quickstart computed the FID
    assert "n/a" in format_fid({"judged_accuracy": 0.9})
