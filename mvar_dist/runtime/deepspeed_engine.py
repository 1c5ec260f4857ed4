"""A DeepSpeed engine from a model, its torch optimizer and the experiment's values: the JSON is a
template (ZeRO stage and its tuning) with everything the experiment owns filled in (batch sizes,
precision, clipping), and no DeepSpeed optimizer or lr scheduler (the tasks set the lr of every
step from the step count)."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from mvar_dist.config.batch_split import BatchSplit
from mvar_dist.config.deepspeed_templates import resolve_template

logger = logging.getLogger(__name__)


def deepspeed_json(template: str, precision: str, split: BatchSplit, grad_clip: float,
                   load_universal: bool = False) -> dict[str, Any]:
    """A DeepSpeed template with batch sizes, clipping and precision filled in (an experiment
    owns those; the template the ZeRO stage and its tuning)."""
    path = resolve_template(template, precision)
    ds = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    ds["train_batch_size"] = split.global_batch
    ds["train_micro_batch_size_per_gpu"] = split.micro_batch
    ds["gradient_accumulation_steps"] = split.accumulation
    ds["gradient_clipping"] = grad_clip
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    # a non-finite step must be skipped by the optimizer on every rank (see mvar_dist.runtime.loop)
    ds["bf16"]["check_grad_overflow"] = True
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW: the CPU build has no fused Adam
    ds.setdefault("steps_per_print", 2**31 - 1)  # we log ourselves
    ds.pop("optimizer", None)
    if load_universal:  # resuming on another world size: see mvar_dist.runtime.resize
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds.pop("scheduler", None)
    logger.debug("deepspeed config from %s: %s", path, ds)
    return ds


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` of a model with its (torch) optimizer; no lr scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """The lr of every parameter group of the engine's optimizer."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
