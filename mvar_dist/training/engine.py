"""The DeepSpeed engine: its JSON from a template + the experiment config (which owns batch
sizes, precision and clipping), torch AdamW with VAR's parameter groups, and the lr of every
step set from the step count."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist

from mvar_dist.config import ExperimentConfig
from mvar_dist.config.deepspeed_templates import resolve_template
from mvar_dist.training.schedule import lr_factor

logger = logging.getLogger(__name__)

# Parameters whose names contain one of these are excluded from weight decay, as in the
# released VAR/MVAR code (utils/lr_control.filter_params with train.py's nowd_keys): the
# positional and level tables, the start token, attention's scale_mul; 1-D tensors (norms,
# biases) never decay. The class table is an Embedding matrix and decays there too.
NO_DECAY_KEYS: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)


# ----- DeepSpeed config -----


def deepspeed_config(config: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The template with every value the experiment config owns filled in from it."""
    train = config.train
    return deepspeed_json(config.deepspeed.template, config.deepspeed.precision, train.global_batch_size,
                          train.micro_batch_size, world_size, config.optim.grad_clip)


def deepspeed_json(template: str, precision: str, global_batch: int, micro_batch: int, world_size: int,
                   grad_clip: float) -> dict[str, Any]:
    """A DeepSpeed template with batch sizes, clipping and precision filled in (an experiment
    owns those; the template the ZeRO stage and its tuning)."""
    path = resolve_template(template, precision)
    ds = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    ds["train_batch_size"] = global_batch
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = global_batch // (micro_batch * world_size)
    ds["gradient_clipping"] = grad_clip
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    # a non-finite step must be skipped by the optimizer on every rank (see mvar_dist.training.loop)
    ds["bf16"]["check_grad_overflow"] = True
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW: the CPU build has no fused Adam
    ds.setdefault("steps_per_print", 2**31 - 1)  # we log ourselves
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    logger.debug("deepspeed config from %s: %s", path, ds)
    return ds


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


def build_engine(model: torch.nn.Module, config: ExperimentConfig, world_size: int) -> Any:
    """deepspeed.initialize with torch AdamW; the lr is set before every step (:func:`set_lr`)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=config.peak_lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        foreach=False,
    )
    return initialize(model, optimizer, deepspeed_config(config, world_size))


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` of a model with its (torch) optimizer; no lr scheduler: the
    training loop sets the lr of every step."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def set_lr(engine: Any, config: ExperimentConfig, step: int) -> float:
    """The lr of optimizer step ``step`` (1-based) on every parameter group; returns it.

    A function of the step count alone: DeepSpeed steps an lr scheduler only when the optimizer
    step was applied, so a scheduler would fall behind by every step skipped for non-finite
    gradients; and nothing about the schedule needs checkpointing."""
    lr = config.peak_lr * lr_factor(step - 1, config)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr


def on_every_rank(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and make every rank fail if any rank failed (avoids hangs in collectives)."""
    error: BaseException | None = None
    try:
        result = fn()
    except BaseException as err:  # noqa: BLE001 - re-raised below
        error, result = err, None
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if error is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            raise RuntimeError("another rank failed; see its log")
    if error is not None:
        raise error
    return result


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself without a group."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
