"""Periodic evaluation during training: a validation pass over ``data.val_manifest`` and a grid
of samples. Neither touches the training stream: the train loader is not advanced and every
RNG that training draws from is restored afterwards (``torch.random.fork_rng``), so a run that
validates and samples resumes bit-identically, like one that does not.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mvar_dist.config import ExperimentConfig
from mvar_dist.sampling.images import compose_grid, to_uint8_hwc
from mvar_dist.scales import ScaleLayout
from mvar_dist.training.losses import scale_metrics

logger = logging.getLogger(__name__)


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


# ----- validation -----


@torch.no_grad()
def masked_scale_sums(
    layout: ScaleLayout, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(S, 3) float64 sums over the rows where ``mask`` is True: CE, correct tokens, tokens, per
    scale, for logits (B, L, V) and targets (B, L) covering every scale in order."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    correct = logits.argmax(-1) == targets
    # multiply, not index: masked rows may hold garbage (even NaN logits) and must not leak
    keep = mask.to(torch.float64)[:, None]
    ce = torch.where(mask[:, None], ce.double(), torch.zeros((), dtype=torch.float64, device=ce.device))
    sums = torch.zeros(layout.num_scales, 3, dtype=torch.float64, device=logits.device)
    for s, (begin, end) in enumerate(layout.begin_ends):
        sums[s, 0] = ce[:, begin:end].sum()
        sums[s, 1] = (correct[:, begin:end] * keep).sum()
        sums[s, 2] = keep.sum() * (end - begin)
    return sums


def val_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Reduced (S, 3) sums -> ``val/loss``, ``val/acc`` (all tokens, acc in %), and the
    per-scale ``val/loss/scale_<s>``, ``val/acc/scale_<s>`` (named as the train metrics)."""
    if float(sums[:, 2].sum()) == 0:
        return {}
    metrics = scale_metrics(sums)
    out = {"val/loss": metrics.pop("loss/mean"), "val/acc": metrics.pop("acc/mean")}
    out.update({f"val/{k}": v for k, v in metrics.items()})
    out["val/samples"] = float(sums[0, 2])  # scale 0 has one token per image
    return out


def validate(
    engine: Any, model: Any, tokenizer: Any, loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    max_batches: int, device: torch.device,
) -> dict[str, float]:
    """One pass over the validation loader on every rank (a collective: every rank must call it),
    all scales per batch in one forward, in eval mode; returns the metrics reduced over ranks."""
    layout: ScaleLayout = model.layout
    scales = tuple(range(layout.num_scales))
    dtype = next(model.parameters()).dtype
    sums = torch.zeros(layout.num_scales, 3, dtype=torch.float64, device=device)
    was_training = model.training
    engine.eval()
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad():
            for index, (codes, labels, mask) in enumerate(loader):
                if max_batches and index >= max_batches:
                    break  # every rank has the same number of batches, so every rank stops here
                codes, labels, mask = codes.to(device), labels.to(device), mask.to(device)
                teacher = tokenizer.codes_to_teacher_input(codes).to(dtype)
                logits = engine(labels, teacher, scales)
                sums += masked_scale_sums(layout, logits, model.targets_for(codes, scales), mask)
    finally:
        engine.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return val_metrics(sums.cpu())


# ----- sample grids -----


def sample_grid(model: Any, tokenizer: Any, config: ExperimentConfig, device: torch.device) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per ``sample.classes`` label, ``sample.per_class`` columns,
    drawn with the fixed ``sample.seed``. Leaves every global RNG as it found it."""
    section = config.sample
    classes = section.grid_classes(config.model.num_classes)
    labels = torch.tensor(classes, dtype=torch.long, device=device).repeat_interleave(section.per_class)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        _, images = model.generate(
            labels, tokenizer, cfg=section.cfg, top_k=section.top_k, top_p=section.top_p, seed=section.seed,
        )
    return compose_grid(to_uint8_hwc(images), rows=len(classes))


def log_sample_grid(
    engine: Any, model: Any, tokenizer: Any, config: ExperimentConfig, tracker: Any, step: int, rank: int,
    device: torch.device,
) -> None:
    """Rank 0 samples and logs ``samples/step_NNNNNNN.png``; other ranks return at once (no
    collective inside). Under ZeRO-3 the weights are partitioned, so sampling on one rank would
    wait forever for the others' shards: the grid is skipped with a warning instead."""
    if rank != 0:
        return
    if engine.zero_optimization_stage() >= 3:
        logger.warning("sample.every_steps: no sample grid under ZeRO-3 (partitioned weights); step %d skipped", step)
        return
    try:
        grid = sample_grid(model, tokenizer, config, device)
        tracker.log_image(grid, f"samples/step_{step:07d}.png")
    except Exception:  # a grid is a progress picture: it must never stop training
        logger.exception("step %d: the sample grid failed; training continues", step)
