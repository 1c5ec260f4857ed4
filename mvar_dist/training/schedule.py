"""What each optimizer step trains, and at which learning rate: the scale groups of a step
(the ``all`` and ``paper`` schedules, VAR's single pass) and VAR's ``lin0`` lr multiplier."""

from __future__ import annotations

from mvar_dist.config import ExperimentConfig
from mvar_dist.scales import scale_groups


def step_groups(config: ExperimentConfig, step: int) -> list[tuple[int, ...]]:
    """Scale groups of optimizer step ``step`` (1-based); each group is one forward pass."""
    model, train = config.model, config.train
    num_scales = len(model.patch_nums)
    if model.mode == "var":
        return [tuple(range(num_scales))]
    if train.schedule == "all":
        return scale_groups(num_scales, model.refine_step)
    refine = model.refine_step
    position = (step - 1) % (train.ratio_k + num_scales - refine)
    if position < train.ratio_k:
        return [tuple(range(refine))]
    return [(refine + position - train.ratio_k,)]


def lr_factor(step: int, config: ExperimentConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): VAR's ``lin0``.

    Linear warmup from ``warmup_start``; hold the peak for 5% of the rest; linear decay to
    ``final_lr_ratio`` at the last step. Computed from the config on every call, so a resumed run
    with a new ``train.total_steps`` re-targets the decay.
    """
    optim, total = config.optim, config.train.total_steps
    if optim.lr_schedule == "constant":
        return 1.0
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.warmup_start + (1 - optim.warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    flat = optim.flat_fraction
    if progress < flat:
        return 1.0
    rest = max(0.0, 1 - progress)
    return optim.final_lr_ratio + (1 - optim.final_lr_ratio) * rest / (1 - flat)
