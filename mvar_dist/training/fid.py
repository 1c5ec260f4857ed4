"""FID during training (``eval.fid_every_steps``): the ranks draw ``eval.fid_samples`` images
together (fixed batches, batch ``b`` on rank ``b % world_size``, each with the seed of
:func:`mvar_dist.sampling.batches.batch_seed`), take their Inception pool features and rank 0
scores them against the reference batch's ``mu``/``sigma``. A collective: every rank calls it.

It does not touch training: every global RNG is restored afterwards (the sampler draws from
its own generators) and the weights are only read, so a run with FID resumes bit-identically
and trains the same weights as one without. Under ZeRO-3 the partitioned weights are gathered
on every rank for the duration (DeepSpeed's ``GatheredParameters``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mvar_dist.config import ExperimentConfig
from mvar_dist.evaluation.features import batch_features
from mvar_dist.evaluation.image_batches import read_reference
from mvar_dist.evaluation.inception import INCEPTION_ENV, load_inception
from mvar_dist.evaluation.statistics import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
)
from mvar_dist.sampling.batches import SamplingSettings, num_batches, sample_batch

logger = logging.getLogger(__name__)


def metric_name(config: ExperimentConfig) -> str:
    """``eval/fid_<samples>``: FIDs of different sample counts are not comparable."""
    return f"eval/fid_{config.eval.fid_samples}"


class TrainingFID:
    """The Inception network and the reference statistics, loaded once per run on first use."""

    def __init__(self, config: ExperimentConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.network: torch.nn.Module | None = None
        self.reference: FeatureStatistics | None = None

    def _load(self) -> None:
        section = self.config.eval
        self.network = load_inception(section.inception or os.environ.get(INCEPTION_ENV), self.device)
        reference = read_reference(section.fid_reference)  # type: ignore[arg-type]
        assert reference.pool is not None, "validated: eval.fid_reference holds mu/sigma"
        self.reference = reference.pool

    def labels(self) -> list[int]:
        classes = self.config.model.num_classes
        return [index % classes for index in range(self.config.eval.fid_samples)]

    def _local_features(self, model: Any, tokenizer: Any, rank: int, world_size: int) -> dict[int, np.ndarray]:
        section, sample = self.config.eval, self.config.sample
        settings = SamplingSettings(cfg=sample.cfg, top_k=sample.top_k, top_p=sample.top_p)
        labels = self.labels()
        features = {}
        for index in range(rank, num_batches(len(labels), section.fid_batch_size), world_size):
            images = sample_batch(model, tokenizer, labels, section.fid_batch_size, index, section.fid_seed, settings,
                                  self.device)
            features[index] = batch_features(self.network, images, self.device)["pool"]
        return features

    def compute(self, engine: Any, model: Any, tokenizer: Any, rank: int, world_size: int) -> float | None:
        """The FID on rank 0, None on the others."""
        if self.network is None:
            self._load()
        gathered = contextlib.nullcontext()
        if engine.zero_optimization_stage() >= 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), gathered:
            local = self._local_features(model, tokenizer, rank, world_size)
        parts: list[dict[int, np.ndarray]] = [local]
        if world_size > 1 and dist.is_initialized():
            parts = [{} for _ in range(world_size)] if rank == 0 else []
            dist.gather_object(local, parts if rank == 0 else None, dst=0)
        if rank != 0:
            return None
        batches = {index: array for part in parts for index, array in part.items()}
        pool = np.concatenate([batches[index] for index in sorted(batches)])
        assert self.reference is not None
        return frechet_distance(feature_statistics(pool), self.reference)
