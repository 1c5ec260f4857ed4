"""The transformer's optimizer and engine: torch AdamW with VAR's parameter groups (what decays
and what does not), wrapped in a DeepSpeed engine whose JSON the experiment fills in, and the
lr of every step set from the step count."""

from __future__ import annotations

from typing import Any

import torch

from mvar_dist.config import ExperimentConfig
from mvar_dist.runtime import deepspeed_engine
from mvar_dist.training.schedule import lr_factor

# Parameters whose names contain one of these are excluded from weight decay, as in the
# released VAR/MVAR code (utils/lr_control.filter_params with train.py's nowd_keys): the
# positional and level tables, the start token, attention's scale_mul; 1-D tensors (norms,
# biases) never decay. The class table is an Embedding matrix and decays there too.
NO_DECAY_KEYS: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)


# ----- DeepSpeed config -----


def deepspeed_config(config: ExperimentConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The template with every value the experiment config owns filled in from it."""
    split = config.train.batch_split(world_size)
    return deepspeed_engine.deepspeed_json(config.deepspeed.template, config.deepspeed.precision, split,
                                           config.optim.grad_clip, load_universal)


# ----- optimizer -----


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and everything VAR's recipe keeps free of decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or any(key in name for key in NO_DECAY_KEYS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_engine(model: torch.nn.Module, config: ExperimentConfig, world_size: int, load_universal: bool = False) -> Any:
    """deepspeed.initialize with torch AdamW; the lr is set before every step (:func:`set_lr`)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=config.peak_lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        foreach=False,
    )
    return deepspeed_engine.initialize(model, optimizer, deepspeed_config(config, world_size, load_universal))


def set_lr(engine: Any, config: ExperimentConfig, step: int) -> float:
    """The lr of optimizer step ``step`` (1-based) on every parameter group; returns it.

    A function of the step count alone: DeepSpeed steps an lr scheduler only when the optimizer
    step was applied, so a scheduler would fall behind by every step skipped for non-finite
    gradients; and nothing about the schedule needs checkpointing."""
    lr = config.peak_lr * lr_factor(step - 1, config)
    deepspeed_engine.set_lr(engine, lr)
    return lr
