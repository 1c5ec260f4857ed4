"""DeepSpeed engine for training: JSON from a template + the experiment config, AdamW param
groups, the lr schedule, and checkpoints that a killed job resumes from exactly.

Checkpoint layout under ``<run.dir>/checkpoints``::

    step_00000020/            DeepSpeed's files (model, ZeRO optimizer partitions, lr scheduler)
        run_state.json        rank 0: step, config, config hash, MLflow run id
        rank_00001.pt         every rank: RNG states and data-loader state
    latest                    the newest *complete* tag, moved last with os.replace
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mvar_dist.atomic import write_bytes, write_json
from mvar_dist.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

# configs/deepspeed/ sits at the repository top level (editable installs, checkouts); a regular
# install carries a copy inside the package (see pyproject.toml).
_TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parent / "configs" / "deepspeed",
    Path(__file__).resolve().parent.parent / "configs" / "deepspeed",
)
TEMPLATE_DIR = next((p for p in _TEMPLATE_CANDIDATES if p.is_dir()), _TEMPLATE_CANDIDATES[-1])
LATEST_FILE = "latest"
RUN_STATE_FILE = "run_state.json"
_TAG_PATTERN = re.compile(r"^step_(\d{8})$")

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


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ----- optimizer and schedule -----


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


# ----- RNG states -----


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every generator training draws from (label drop and drop path use torch's global one)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value


# ----- checkpoints -----


@dataclass
class ResumePoint:
    tag: str
    step: int
    run_state: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(checkpoint_dir: Path) -> ResumePoint | None:
    """The newest complete checkpoint, or None for a fresh run."""
    latest = checkpoint_dir / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state_file = checkpoint_dir / tag / RUN_STATE_FILE
    if not state_file.is_file():
        raise RuntimeError(f"{latest} names {tag!r} but {state_file} is missing; the checkpoint is damaged")
    run_state = json.loads(state_file.read_text())
    return ResumePoint(tag=tag, step=int(run_state["step"]), run_state=run_state)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any,
    checkpoint_dir: Path,
    step: int,
    run_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank writes its part; ``latest`` moves only once all have finished."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"run_state": run_state}, save_latest=False)
    tag_dir = checkpoint_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / f".rank_{rank:05d}.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, tag_dir / f"rank_{rank:05d}.pt")
    if rank == 0:
        write_json(tag_dir / RUN_STATE_FILE, run_state)
    _barrier()
    if rank == 0:
        write_bytes(checkpoint_dir / LATEST_FILE, (tag + "\n").encode())
        prune_checkpoints(checkpoint_dir, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", tag_dir)
    return tag_dir


def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete tags; drop older ones and any newer than ``latest``
    (left half-written by a killed save)."""
    point = read_latest(checkpoint_dir)
    if point is None:
        return
    steps = sorted(
        int(m.group(1)) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _TAG_PATTERN.match(p.name))
    )
    complete = [s for s in steps if s <= point.step]
    keep = set(complete[-keep_last:]) | {point.step}
    for s in steps:
        if s not in keep:
            shutil.rmtree(checkpoint_dir / tag_for(s), ignore_errors=True)


def load_checkpoint(engine: Any, checkpoint_dir: Path, point: ResumePoint) -> dict[str, Any]:
    """Load weights, optimizer and lr scheduler into ``engine``; returns this rank's extra state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, _ = engine.load_checkpoint(
        str(checkpoint_dir), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / point.tag}")
    rank_file = checkpoint_dir / point.tag / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks than this job has; "
            f"resume with the same world size"
        )
    return torch.load(rank_file, map_location="cpu", weights_only=True)


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Fine-tuning start (``train.init_from``): a released VAR/MVAR state dict, strict."""
    from mvar_dist.tokenizer import load_state_dict_file

    state = load_state_dict_file(Path(path), "cpu")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"train.init_from: {path} does not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); check model.depth and model.patch_nums"
        )
    logger.info("initialised weights from %s", path)


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


def is_finite(value: float) -> bool:
    return math.isfinite(value)
