"""The five numbers of the ADM evaluator from two feature sets: FID (pool features), sFID
(spatial features), Inception Score, precision and recall (k = 3 manifolds of pool features).
The reference batch's own ``mu``/``sigma``/``mu_s``/``sigma_s`` are used as they are when it
has them, as the evaluator does; otherwise they are computed from its images' features."""

from __future__ import annotations

from mvar_dist.evaluation.features import Features
from mvar_dist.evaluation.image_batches import ReferenceBatch
from mvar_dist.evaluation.statistics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

# metric name -> what the table line calls it (MLflow gets ``eval/<name>``)
METRICS = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall"}
NEAREST_NEIGHBOURS = 3
INCEPTION_SCORE_SPLITS = 10


def adm_metrics(samples: Features, reference: Features, reference_batch: ReferenceBatch | None = None) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of ``samples`` against ``reference`` (features of the
    reference batch's images; its precomputed statistics come from ``reference_batch``)."""
    pool = reference_batch.pool if reference_batch is not None and reference_batch.pool is not None \
        else feature_statistics(reference.pool)
    spatial = reference_batch.spatial if reference_batch is not None and reference_batch.spatial is not None \
        else feature_statistics(reference.spatial)
    precision, recall = precision_recall(reference.pool, samples.pool, k=NEAREST_NEIGHBOURS)
    return {
        "fid": frechet_distance(feature_statistics(samples.pool), pool),
        "sfid": frechet_distance(feature_statistics(samples.spatial), spatial),
        # the evaluator's 10 splits; a set of fewer than 10 images is one split per image
        "inception_score": inception_score(samples.probabilities, min(INCEPTION_SCORE_SPLITS, len(samples))),
        "precision": precision,
        "recall": recall,
    }


def table_line(metrics: dict[str, float], num_samples: int, num_reference: int) -> str:
    shown = "  ".join(f"{label} {metrics[name]:.4g}" for name, label in METRICS.items() if name in metrics)
    return f"{shown}  ({num_samples:,} samples vs {num_reference:,} reference images)"
