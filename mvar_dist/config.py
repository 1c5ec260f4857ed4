"""Experiment configuration for ``mvar-dist train``: typed sections, YAML/TOML loading,
``key=value`` overrides and early validation.

One file describes an experiment completely; the DeepSpeed JSON is derived from it (see
:mod:`mvar_dist.engine`), so batch sizes, precision and clipping exist in exactly one place.
The ``model`` section is :class:`mvar_dist.model.MVARConfig` and ``data`` is
:class:`mvar_dist.data.DataConfig`: their fields are owned by those modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from mvar_dist.data import DataConfig
from mvar_dist.launch import LaunchConfig
from mvar_dist.model import MVARConfig


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field to fix."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: resolved config, checkpoints, logs
    seed: int = 0


@dataclass
class TokenizerSection:
    """The frozen tokenizer that turns codes into the transformer's teacher input."""

    kind: Literal["vqvae", "patch"] = "vqvae"  # VAR's VQVAE, or the quickstart pixel-patch tokenizer
    checkpoint: str | None = None  # .pth/.safetensors; the shards' manifest must name the same weights
    options: dict[str, Any] = field(default_factory=dict)  # architecture kwargs of the tokenizer class


@dataclass
class TrainConfig:
    schedule: Literal["paper", "all"] = "all"  # which scales each optimizer step covers (README_train)
    ratio_k: int = 8  # paper schedule: steps on scales 0..refine_step-1 per refine-scale step
    total_steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # images per optimizer step, all ranks together
    micro_batch_size: int = 32  # images per rank per forward pass
    label_smoothing: float = 0.0
    init_from: str | None = None  # weights to start from (e.g. var_d16.pth for fine-tuning)
    max_consecutive_nonfinite: int = 10  # save and stop after this many non-finite steps in a row
    log_every: int = 1  # metrics to the tracker every N steps
    val_every_steps: int = 0  # validation pass (data.val_manifest) every N steps and at the end; 0: off
    val_max_batches: int = 0  # per-rank batches of each validation pass; 0: the whole split


@dataclass
class OptimConfig:
    base_lr: float = 1e-4  # per 256 images; lr = base_lr * global_batch_size / 256 unless lr is set
    lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 2.0  # 0 disables
    warmup_steps: int = 0
    warmup_start: float = 0.005  # lr fraction at step 0
    final_lr_ratio: float = 0.01  # lr fraction at the last step
    lr_schedule: Literal["lin0", "constant"] = "lin0"

    @property
    def flat_fraction(self) -> float:
        """lin0 holds the peak lr for this fraction of the post-warmup steps (as VAR's lin0)."""
        return 0.05


@dataclass
class DeepSpeedSection:
    template: str = "zero2"  # configs/deepspeed/<template>[_<precision>].json, or a path to a JSON file
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    backend: str | None = None  # torch.distributed backend; None: nccl on CUDA, gloo otherwise


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite in run.dir
    experiment: str = "mvar-dist"


@dataclass
class SampleConfig:
    """Sampling settings published with the model (SEMANTICS 5); used by sample/eval commands,
    and by the sample grids logged during training (``every_steps`` > 0)."""

    cfg: float = 1.5
    top_p: float = 0.96
    top_k: int = 900
    every_steps: int = 0  # training: log a sample grid every N steps and at the end; 0: off
    classes: tuple[int, ...] | None = None  # grid rows; None: the first min(model.num_classes, 8) classes
    per_class: int = 4  # grid columns
    seed: int = 0  # fixed, so that grids of different steps are comparable

    def grid_classes(self, num_classes: int) -> tuple[int, ...]:
        return self.classes if self.classes is not None else tuple(range(min(num_classes, 8)))


@dataclass
class DebugConfig:
    """Testing hooks; leave unset in real runs."""

    kill_after_checkpoint_step: int | None = None  # SIGKILL every rank right after this checkpoint
    nonfinite_loss_steps: tuple[int, ...] = ()  # steps whose loss is replaced by NaN on rank 0


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: MVARConfig = field(default_factory=MVARConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # SLURM resources (mvar-dist submit)

    @property
    def peak_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.train.global_batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# Keys that may change between a checkpoint and its resumption; everything else defines the run.
# File locations may move (a new cluster): the data loader checks the shards' sample count and
# seed, the manifest check the tokenizer's weights, and init_from is not read on resume.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "run.dir", "train.total_steps", "train.log_every", "train.max_consecutive_nonfinite", "train.init_from",
    "train.val_every_steps", "train.val_max_batches",
    "checkpoint", "tracking", "sample", "debug", "launch", "data.num_workers", "data.prefetch_windows",
    "data.train_manifest", "data.val_manifest", "data.shard_url_template", "tokenizer.checkpoint",
)


def compatibility_hash(config_dict: Mapping[str, Any]) -> str:
    """Hash of everything a resumed run must share with its checkpoint."""
    return hashlib.sha256(json.dumps(_fixed_part(config_dict), sort_keys=True).encode()).hexdigest()


def incompatible_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring RESUMABLE_CHANGES."""
    a, b = _flatten(_fixed_part(saved)), _flatten(_fixed_part(current))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _fixed_part(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat = _flatten(config_dict)
    return {
        k: v for k, v in flat.items()
        if not any(k == key or k.startswith(key + ".") for key in RESUMABLE_CHANGES)
    }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name.count(".") < 1:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the dict round-trips through YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----- loading -----


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML or TOML experiment file, apply ``key=value`` overrides, build and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse: {err}") from err
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    apply_overrides(raw, overrides)
    try:
        return build(ExperimentConfig, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    return build(ExperimentConfig, dict(raw), "")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """``train.total_steps=20`` style overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types of every field."""
    label = where or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {_dotted(where, close[0])!r}?" if close else ""
        raise ConfigError(
            f"unknown key {_dotted(where, key)!r}{hint} (valid keys here: {', '.join(names)})"
        )
    kwargs = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{label}: {err}") from None


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries, got {list(value)}")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


# ----- validation that needs the launch environment -----


def validate(config: ExperimentConfig, world_size: int) -> None:
    """Checks that do not fit one field: batch arithmetic, schedules, files. Before any compute."""
    train, model = config.train, config.model
    for name in ("total_steps", "global_batch_size", "micro_batch_size", "ratio_k", "log_every",
                 "max_consecutive_nonfinite"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}; "
            f"choose a global batch that is a multiple of {per_step}"
        )
    if train.schedule == "paper" and model.mode != "mvar":
        raise ConfigError(
            "train.schedule='paper' rotates scale groups, which only mode='mvar' allows; "
            "use train.schedule='all' with model.mode='var'"
        )
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    optim = config.optim
    if optim.warmup_steps < 0 or optim.warmup_steps >= train.total_steps:
        raise ConfigError(
            f"optim.warmup_steps must be in 0..train.total_steps-1 ({train.total_steps - 1}), got {optim.warmup_steps}"
        )
    if config.peak_lr <= 0 or optim.grad_clip < 0 or optim.weight_decay < 0:
        raise ConfigError("optim: lr must be positive, grad_clip and weight_decay non-negative")
    if config.checkpoint.every_steps < 1 or config.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
    _validate_eval(config)
    try:
        config.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name, value in (("train.init_from", train.init_from), ("tokenizer.checkpoint", config.tokenizer.checkpoint)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}: file {value} does not exist")


def _validate_eval(config: ExperimentConfig) -> None:
    """Periodic validation and sample grids (trainer + mvar_dist.evaluation)."""
    train, sample = config.train, config.sample
    for name, value in (("train.val_every_steps", train.val_every_steps), ("train.val_max_batches", train.val_max_batches),
                        ("sample.every_steps", sample.every_steps)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {value}")
    if train.val_every_steps > 0 and not config.data.val_manifest:
        raise ConfigError(
            f"train.val_every_steps={train.val_every_steps} needs data.val_manifest (the validation split's "
            f"manifest.json); set it or use train.val_every_steps=0"
        )
    if sample.every_steps > 0:
        if sample.per_class < 1:
            raise ConfigError(f"sample.per_class must be >= 1, got {sample.per_class}")
        classes = sample.grid_classes(config.model.num_classes)
        bad = [c for c in classes if not 0 <= c <= config.model.num_classes]
        if not classes or bad:
            raise ConfigError(
                f"sample.classes must be a non-empty list of labels in 0..{config.model.num_classes} "
                f"(model.num_classes = unconditional), got {list(classes)}"
            )


def save_resolved(config: ExperimentConfig, path: Path) -> None:
    """Write the fully resolved config (every default spelled out) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)
