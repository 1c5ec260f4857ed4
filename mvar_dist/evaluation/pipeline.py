"""``mvar-dist evaluate`` on one rank: features of the samples (read from an ``.npz``, or drawn
from an export batch by batch and kept as an ``.npz``) and of the reference batch (cached per
reference file and Inception weights), split over the ranks; rank 0 then computes the metrics
and writes the JSON report.

Where the parts go: the samples' under ``<out>.parts/`` (removed when the report is written;
a rerun after a preemption reuses them if the inputs are the same, recorded in its
``inputs.json``), the reference's under ``<cache_dir>/<reference sha>-<weights sha>-<resize>/``
(kept: the next evaluation against the same reference reads them).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvar_dist.atomic import write_json
from mvar_dist.evaluation.features import (
    FEATURE_KEYS,
    Features,
    Ranks,
    batch_features,
    extract_parts,
    features_of,
    part_path,
    read_parts,
    save_part,
)
from mvar_dist.evaluation.image_batches import ReferenceBatch, read_npz_images
from mvar_dist.evaluation.metrics import adm_metrics, table_line
from mvar_dist.sampling.batches import SamplingSettings, num_batches, sample_batch
from mvar_dist.sampling.images import NpzSampleWriter
from mvar_dist.state_files import file_sha256

logger = logging.getLogger(__name__)

REPORT_FORMAT = "mvar-dist-evaluation/1"


@dataclass
class Sampler:
    """What ``--model`` draws: the export, its tokenizer, the labels in class order and how."""

    model: Any
    tokenizer: Any
    labels: Sequence[int]
    batch_size: int
    seed: int
    settings: SamplingSettings
    precision: str = "fp32"


@dataclass
class Evaluation:
    """One evaluation's inputs (identical on every rank)."""

    out: Path  # the JSON report
    reference: ReferenceBatch
    reference_sha256: str
    network: torch.nn.Module
    inception_sha256: str
    resize: str
    device: torch.device
    cache_dir: Path
    feature_batch_size: int = 100
    samples_npz: Path | None = None  # --samples input, or where --model's samples are kept
    sampler: Sampler | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # what the parts depend on, besides the above
    progress: bool = True

    @property
    def work_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    def reference_dir(self) -> Path:
        return self.cache_dir / f"{self.reference_sha256[:16]}-{self.inception_sha256[:16]}-{self.resize}"


def prepare_work_dir(evaluation: Evaluation, ranks: Ranks) -> None:
    """Rank 0 keeps the samples' parts of an interrupted evaluation with the same inputs and
    removes any others; every rank then starts."""
    inputs = {**evaluation.identity, "inception_sha256": evaluation.inception_sha256, "resize": evaluation.resize,
              "feature_batch_size": evaluation.feature_batch_size}
    if ranks.rank == 0:
        record = evaluation.work_dir / "inputs.json"
        if evaluation.work_dir.exists():
            previous = json.loads(record.read_text()) if record.is_file() else None
            if previous != inputs:
                logger.info("%s holds parts of another evaluation: starting afresh", evaluation.work_dir)
                shutil.rmtree(evaluation.work_dir)
            else:
                logger.info("%s: reusing the parts of an interrupted evaluation", evaluation.work_dir)
        evaluation.work_dir.mkdir(parents=True, exist_ok=True)
        write_json(record, inputs, indent=2)
    ranks.barrier()


def _reference_features(evaluation: Evaluation, ranks: Ranks) -> int:
    images = evaluation.reference.images
    return extract_parts(evaluation.network, len(images), evaluation.feature_batch_size, lambda b, e: images[b:e],
                         evaluation.reference_dir(), "reference", ranks, evaluation.device, evaluation.progress)


def _sample_parts(evaluation: Evaluation, ranks: Ranks) -> int:
    """Draw this rank's batches; each part holds the batch's images and their features."""
    from tqdm import tqdm

    sampler = evaluation.sampler
    assert sampler is not None
    total = num_batches(len(sampler.labels), sampler.batch_size)
    mine = [b for b in ranks.batches(total) if not part_path(evaluation.work_dir, "samples", b).exists()]
    with tqdm(total=len(mine), unit="batch", desc="sampling", disable=not evaluation.progress or ranks.rank != 0) as bar:
        for index in mine:
            images = sample_batch(sampler.model, sampler.tokenizer, sampler.labels, sampler.batch_size, index,
                                  sampler.seed, sampler.settings, evaluation.device, sampler.precision)
            arrays = {"images": images, **batch_features(evaluation.network, images, evaluation.device)}
            save_part(part_path(evaluation.work_dir, "samples", index), arrays)
            bar.update(1)
    return total


def _merge_samples(evaluation: Evaluation, total: int, num: int) -> Features:
    """Rank 0: the samples' parts in order into the kept ``.npz`` and one feature set (each part
    read once)."""
    assert evaluation.samples_npz is not None
    writer = None
    features: dict[str, list[np.ndarray]] = {key: [] for key in FEATURE_KEYS}
    try:
        for index in range(total):
            with np.load(part_path(evaluation.work_dir, "samples", index), allow_pickle=False) as part:
                images = part["images"]
                for key in FEATURE_KEYS:
                    features[key].append(part[key])
            if writer is None:
                writer = NpzSampleWriter(evaluation.samples_npz, num, images.shape[1], images.shape[2])
            writer.write(images)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    assert writer is not None
    writer.close()
    return features_of({key: np.concatenate(values) for key, values in features.items()})


def run_evaluation(evaluation: Evaluation, ranks: Ranks) -> dict[str, Any] | None:
    """Every rank computes its share; rank 0 returns the report (written to ``evaluation.out``),
    the others None."""
    prepare_work_dir(evaluation, ranks)
    reference_total = _reference_features(evaluation, ranks)
    if evaluation.sampler is not None:
        total = _sample_parts(evaluation, ranks)
        num = len(evaluation.sampler.labels)
    else:
        assert evaluation.samples_npz is not None
        images = read_npz_images(evaluation.samples_npz)
        num = len(images)
        total = extract_parts(evaluation.network, num, evaluation.feature_batch_size, lambda b, e: images[b:e],
                              evaluation.work_dir, "samples", ranks, evaluation.device, evaluation.progress)
    ranks.barrier()
    if ranks.rank != 0:
        return None
    reference = features_of(read_parts(evaluation.reference_dir(), "reference", reference_total))
    if evaluation.sampler is not None:
        samples = _merge_samples(evaluation, total, num)
    else:
        samples = features_of(read_parts(evaluation.work_dir, "samples", total))
    logger.info("computing the metrics of %d samples against %d reference images", len(samples), len(reference))
    metrics = adm_metrics(samples, reference, evaluation.reference)
    report = {
        "format": REPORT_FORMAT,
        "metrics": metrics,
        "table": table_line(metrics, len(samples), len(reference)),
        "num_samples": len(samples),
        "num_reference": len(reference),
        "samples": str(evaluation.samples_npz) if evaluation.samples_npz else None,
        "reference": str(evaluation.reference.path),
        "reference_sha256": evaluation.reference_sha256,
        "reference_statistics": "from the reference file" if evaluation.reference.pool is not None else "computed",
        "inception_sha256": evaluation.inception_sha256,
        "resize": evaluation.resize,
        "world_size": ranks.world_size,
        "feature_batch_size": evaluation.feature_batch_size,
        **evaluation.identity,
    }
    write_json(evaluation.out, report, indent=2)
    shutil.rmtree(evaluation.work_dir, ignore_errors=True)
    return report


def hash_file(path: Path, what: str) -> str:
    logger.info("hashing %s %s", what, path)
    return file_sha256(path)
