"""The statistics of OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) on
features, in numpy/scipy: Frechet distance (FID on pool features, sFID on spatial ones),
Inception Score, and k-nearest-neighbour precision/recall (Kynkaanniemi et al. 2019).

Conventions follow the evaluator so that numbers are comparable: covariances are ``np.cov``
(unbiased, N - 1); a non-finite matrix square root is retried with ``eps`` added to both
diagonals; the manifold radius of a point is the distance to its k-th nearest neighbour,
counting itself as the 0-th (so duplicates make radii 0, as there); a point is inside a
manifold when its distance to some member is <= that member's radius.
Distances here are exact float64 (the evaluator computes them in float16 when finite, which can
flip points that sit on a radius; see docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set (the reference batch's ``mu``/``sigma``)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    """Mean and unbiased covariance of (N, D) features, float64; needs N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N >= 2, D) array, got shape {features.shape}")
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the distance between two Gaussians.

    A singular product (fewer samples than dimensions) can make ``sqrtm`` non-finite: then
    ``eps`` is added to both diagonals, as the evaluator does. A complex square root whose
    diagonal has an imaginary part above 1e-3 is an error (the covariances are not PSD)."""
    mu1, mu2 = np.atleast_1d(first.mu).astype(np.float64), np.atleast_1d(second.mu).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(first.sigma).astype(np.float64), np.atleast_2d(second.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        imaginary = np.max(np.abs(np.diagonal(root).imag))
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance product has a matrix square root with imaginary part {imaginary:.3g}")
        root = root.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def inception_score(probabilities: np.ndarray, splits: int = 10) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` consecutive chunks (the evaluator
    cuts 50,000 samples into 10 chunks of 5,000); ``probabilities`` (N, C) are softmax rows."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) < splits or splits < 1:
        raise ValueError(f"inception score needs (N >= splits={splits}, classes) probabilities, got {probabilities.shape}")
    size = len(probabilities) // splits
    scores = []
    for index in range(splits):
        part = probabilities[index * size : (index + 1) * size]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: a class no sample predicts contributes nothing
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(len(rows), len(columns)) squared Euclidean distances, clipped at 0."""
    squared = (rows * rows).sum(1)[:, None] - 2 * rows @ columns.T + (columns * columns).sum(1)[None, :]
    return np.maximum(squared, 0.0)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10_000) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour (itself is the 0-th)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) <= k:
        raise ValueError(f"a k={k} manifold needs more than {k} points, got {len(features)}")
    radii = np.empty(len(features))
    for begin in range(0, len(features), block):
        distances = _squared_distances(features[begin : begin + block], features)
        radii[begin : begin + block] = np.partition(distances, k, axis=1)[:, k]
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 10_000) -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside the reference manifold, and of
    reference points inside the samples' manifold (k-NN radii)."""
    reference = np.asarray(reference, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    reference_radii, sample_radii = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
    sample_inside = np.zeros(len(samples), dtype=bool)
    reference_inside = np.zeros(len(reference), dtype=bool)
    for begin in range(0, len(reference), block):
        distances = _squared_distances(reference[begin : begin + block], samples)
        sample_inside |= (distances <= reference_radii[begin : begin + block, None]).any(axis=0)
        reference_inside[begin : begin + block] = (distances <= sample_radii[None, :]).any(axis=1)
    return float(sample_inside.mean()), float(reference_inside.mean())
