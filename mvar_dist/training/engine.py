"""The DeepSpeed engine: its JSON from a template + the experiment config (which owns batch
sizes, precision and clipping), torch AdamW with VAR's parameter groups, and the lr schedule
as a LambdaLR that DeepSpeed checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import mvar_dist
from mvar_dist.config import ConfigError, ExperimentConfig
from mvar_dist.training.schedule import lr_factor

logger = logging.getLogger(__name__)

# configs/deepspeed/ sits at the repository top level (editable installs, checkouts); a regular
# install carries a copy inside the package as mvar_dist/configs (see pyproject.toml).
_PACKAGE = Path(mvar_dist.__file__).resolve().parent
_TEMPLATE_CANDIDATES = (_PACKAGE / "configs" / "deepspeed", _PACKAGE.parent / "configs" / "deepspeed")
TEMPLATE_DIR = next((p for p in _TEMPLATE_CANDIDATES if p.is_dir()), _TEMPLATE_CANDIDATES[-1])

# Parameters whose names contain one of these are excluded from weight decay, as in the
# released VAR/MVAR code (utils/lr_control.filter_params with train.py's nowd_keys): the
# positional and level tables, the start token, attention's scale_mul; 1-D tensors (norms,
# biases) never decay. The class table is an Embedding matrix and decays there too.
NO_DECAY_KEYS: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)


# ----- DeepSpeed config -----


def resolve_template(name: str, precision: str) -> Path:
    """``zero2`` + ``bf16`` -> configs/deepspeed/zero2_bf16.json if it exists, else zero2.json."""
    as_path = Path(name)
    if as_path.suffix == ".json":
        if not as_path.is_file():
            raise ConfigError(f"deepspeed.template: file {as_path} does not exist")
        return as_path
    for candidate in (TEMPLATE_DIR / f"{name}_{precision}.json", TEMPLATE_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
    raise ConfigError(f"deepspeed.template: no template {name!r} in {TEMPLATE_DIR}; known: {known}")


def deepspeed_config(config: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The template with every value the experiment config owns filled in from it."""
    path = resolve_template(config.deepspeed.template, config.deepspeed.precision)
    ds = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    train = config.train
    ds["train_batch_size"] = train.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.global_batch_size // (train.micro_batch_size * world_size)
    ds["gradient_clipping"] = config.optim.grad_clip
    precision = config.deepspeed.precision
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    # a non-finite step must be skipped by the optimizer on every rank (see train.py)
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
    """deepspeed.initialize with torch AdamW and a LambdaLR that DeepSpeed checkpoints."""
    import deepspeed

    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=config.peak_lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        foreach=False,
    )

    def factor(step: int) -> float:  # a plain function: LambdaLR then checkpoints only its step
        return lr_factor(step, config)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ds_config = deepspeed_config(config, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


def current_lr(engine: Any) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


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
