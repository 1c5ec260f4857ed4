"""The ADM evaluator's statistics (mvar_dist/evaluation/statistics.py) against independent
computations written here: FID through the eigenvalues of sqrt(S1) S2 sqrt(S1) and in closed
form, the Inception Score through scipy's relative entropy, and precision/recall through a
brute-force k-NN on small integer features (exact distances, ties and duplicates included)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import special

from mvar_dist.evaluation.statistics import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

# ----- Frechet distance -----


def eigen_fid(mu1, sigma1, mu2, sigma2) -> float:
    """Tr sqrt(S1 S2) = sum of sqrt(eigenvalues) of the symmetric PSD sqrt(S1) S2 sqrt(S1)."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(50, 4))
    stats = feature_statistics(x)
    centred = x - x.sum(0) / len(x)
    np.testing.assert_allclose(stats.mu, x.sum(0) / 50)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(200, 16)) * np.arange(1, 17)
    stats = feature_statistics(x)
    assert abs(frechet_distance(stats, stats)) < 1e-6
    shifted = feature_statistics(x + 0.5)
    assert frechet_distance(stats, shifted) == pytest.approx(16 * 0.25, rel=1e-6)


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(FeatureStatistics(mu1, np.diag(s1)), FeatureStatistics(mu2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_of_full_covariances_matches_the_eigenvalue_form():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 1
    first, second = feature_statistics(a), feature_statistics(b)
    expected = eigen_fid(first.mu, first.sigma, second.mu, second.sigma)
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(second, first) == pytest.approx(expected, rel=1e-7)


def test_fid_with_rank_deficient_covariances_stays_finite():
    rng = np.random.default_rng(4)
    first, second = feature_statistics(rng.normal(size=(5, 32))), feature_statistics(rng.normal(size=(6, 32)) + 0.1)
    assert np.linalg.matrix_rank(first.sigma) < 32
    got = frechet_distance(first, second)
    assert np.isfinite(got)
    assert got == pytest.approx(eigen_fid(first.mu, first.sigma, second.mu, second.sigma), rel=1e-3)


def test_fid_refuses_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(FeatureStatistics(np.zeros(3), np.eye(3)), FeatureStatistics(np.zeros(4), np.eye(4)))


# ----- Inception Score -----


def reference_inception_score(probabilities: np.ndarray, splits: int) -> float:
    size = len(probabilities) // splits
    scores = []
    for part in np.split(probabilities[: size * splits], splits):
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([special.rel_entr(row, marginal).sum() for row in part])))
    return float(np.mean(scores))


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((100, 1008), 1 / 1008)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("classes", [1, 4, 10])
def test_inception_score_of_one_hot_predictions_spread_evenly_is_the_class_count(classes):
    labels = np.tile(np.arange(classes), 10 * 3)  # each split of 3 * classes rows holds every class 3 times
    one_hot = np.eye(classes)[labels]
    assert inception_score(one_hot, splits=10) == pytest.approx(classes, rel=1e-9)


def test_inception_score_splits_are_consecutive_chunks():
    one_hot = np.eye(5)[np.repeat(np.arange(5), 4)]  # split i holds only class i
    assert inception_score(one_hot, splits=5) == pytest.approx(1.0)
    assert inception_score(one_hot, splits=1) == pytest.approx(5.0)


def test_inception_score_matches_scipy_relative_entropy():
    probabilities = np.random.default_rng(5).dirichlet(np.full(7, 0.3), size=53)
    for splits in (1, 4, 10):
        got = inception_score(probabilities, splits=splits)
        assert got == pytest.approx(reference_inception_score(probabilities, splits), rel=1e-10)


# ----- precision / recall -----


def brute_radii(points: np.ndarray, k: int) -> list[float]:
    """k-th smallest squared distance to all points, the point itself being the 0-th."""
    return [sorted(float(np.sum((p - q) ** 2)) for q in points)[k] for p in points]


def brute_inside(queries: np.ndarray, manifold: np.ndarray, k: int) -> float:
    radii = brute_radii(manifold, k)
    inside = [any(float(np.sum((q - m) ** 2)) <= r for m, r in zip(manifold, radii)) for q in queries]
    return sum(inside) / len(inside)


def test_radius_counts_the_point_itself_as_the_zeroth_neighbour():
    line = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_array_equal(manifold_radii(line, k=1), [1, 1, 4, 9, 16])
    np.testing.assert_array_equal(manifold_radii(line, k=2), [9, 4, 9, 16, 49])
    duplicates = np.array([[0.0], [0.0], [0.0], [5.0]])
    np.testing.assert_array_equal(manifold_radii(duplicates, k=2), [0, 0, 0, 25])
    with pytest.raises(ValueError):
        manifold_radii(duplicates, k=4)


def test_precision_and_recall_by_hand():
    reference = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])  # k=1 radii 1, 1, 2, 3, 4
    samples = np.array([[-1.0], [2.0], [5.5], [20.0]])  # k=1 radii 3, 3, 3.5, 14.5
    # samples inside: -1 (by 0), 2 (by 1), 5.5 (by 6), not 20; reference 10 is inside only through 20's radius
    assert precision_recall(reference, samples, k=1) == (0.75, 1.0)
    assert precision_recall(reference, samples[:3], k=1) == (1.0, 0.8)


def test_precision_recall_matches_brute_force_with_ties_and_duplicates():
    rng = np.random.default_rng(6)
    reference = rng.integers(0, 4, size=(40, 3)).astype(np.float64)  # 64 cells: many duplicates and ties
    samples = rng.integers(1, 6, size=(35, 3)).astype(np.float64)
    assert len({tuple(r) for r in reference}) < len(reference)
    results = {}
    for k in (1, 2, 3, 5):
        expected = (brute_inside(samples, reference, k), brute_inside(reference, samples, k))
        results[k] = expected
        assert precision_recall(reference, samples, k=k) == pytest.approx(expected, abs=0), k
        assert precision_recall(reference, samples, k=k, block=7) == pytest.approx(expected, abs=0), k
    # the data tell the values of k apart, so an off-by-one k would fail above
    assert all(results[a] != results[b] for a, b in itertools.combinations(results, 2))


def test_points_exactly_on_a_radius_are_inside():
    reference = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 3.0]])  # radius of (0,0) with k=1: 25
    samples = np.array([[0.0, -5.0], [0.0, -5.1], [-3.0, -4.0], [20.0, 20.0]])
    assert precision_recall(reference, samples, k=1)[0] == 0.5
