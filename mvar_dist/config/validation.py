"""Checks of a whole experiment that no single field can make, for both kinds (transformer and
tokenizer): batch arithmetic, schedules, files, SLURM resources. They run once, before any rank
starts, and name the field and value; :func:`mvar_dist.config.validate_experiment` picks the
checks of a config's kind."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import string
import zipfile
from pathlib import Path
from typing import Any

from mvar_dist.config.batch_split import check_micro_batch
from mvar_dist.config.deepspeed_templates import read_template
from mvar_dist.config.experiment import ExperimentConfig
from mvar_dist.config.loading import ConfigError
from mvar_dist.config.sizes import parse_size
from mvar_dist.config.sections import LaunchConfig, OptimConfig, SampleConfig
from mvar_dist.config.tokenizer_experiment import TokenizerExperiment
from mvar_dist.data.config import DataConfig
from mvar_dist.shards.manifest import load_manifest
from mvar_dist.tokenizer.factory import check_options
from mvar_dist.tokenizer.vqvae import TokenizerConfig

logger = logging.getLogger(__name__)

_MEM_PATTERN = re.compile(r"^[0-9]+[KMGT]?B?$", re.IGNORECASE)
# what mvar_dist.shards.manifest.load_manifest fills into data.shard_url_template
SHARD_URL_PLACEHOLDERS = ("name", "split")


class LaunchError(ValueError):
    """Bad launch input, found before anything is submitted."""


def validate(config: ExperimentConfig, world_size: int) -> None:
    """Checks that do not fit one field: batch arithmetic, schedules, files. Before any compute."""
    train, model = config.train, config.model
    for name in ("total_steps", "global_batch_size", "ratio_k", "log_every", "max_consecutive_nonfinite"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    check_micro_batch("train", train.micro_batch_size, train.max_micro_batch_size)
    train.batch_split(world_size)
    finite_at_least("train.hang_timeout_s", train.hang_timeout_s, 0.0, strict=False)
    try:  # the options are handed to the tokenizer's constructor on every rank: check them here
        check_options(config.tokenizer.kind, config.tokenizer.options)
    except ValueError as error:
        raise ConfigError(f"tokenizer.options: {error}") from None
    if train.schedule == "paper" and model.mode != "mvar":
        raise ConfigError(
            "train.schedule='paper' rotates scale groups, which only mode='mvar' allows; "
            "use train.schedule='all' with model.mode='var'"
        )
    if train.activation_checkpointing_every < 1:
        raise ConfigError(f"train.activation_checkpointing_every must be >= 1, got {train.activation_checkpointing_every}")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    _validate_optim(config.optim, train.total_steps)
    for name in ("every_steps", "keep_last"):
        if getattr(config.checkpoint, name) < 1:
            raise ConfigError(f"checkpoint.{name} must be >= 1, got {getattr(config.checkpoint, name)}")
    _validate_eval(config)
    _validate_sample(config.sample, config.model.num_classes)
    _validate_data(config.data)
    finite_at_least("tracking.timeout_s", config.tracking.timeout_s, 0.0, strict=True)
    finite_at_least("tracking.retry_interval_s", config.tracking.retry_interval_s, 0.0, strict=False)
    # the engine reads the template after distributed init: a bad name would fail every rank there
    read_template(config.deepspeed.template, config.deepspeed.precision)
    for name, value in (("train.init_from", train.init_from), ("tokenizer.checkpoint", config.tokenizer.checkpoint)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}: file {value} does not exist")
    check_run_dir(config.run.dir, checkpoint_bytes(config.model), config.checkpoint.keep_last)


# bytes a checkpoint keeps per parameter: fp32 master weights and both Adam moments in the ZeRO
# optimizer files (12), and the module's weights in the model-states file (at most 4)
CHECKPOINT_BYTES_PER_PARAMETER = 16


def checkpoint_bytes(model_config: Any) -> int:
    """About what one transformer checkpoint takes on disk (the model built on the meta device)."""
    import torch

    from mvar_dist.model import MVAR

    with torch.device("meta"):
        model = MVAR(model_config)
    return CHECKPOINT_BYTES_PER_PARAMETER * sum(p.numel() for p in model.parameters())


def check_run_dir(run_dir: str, one_checkpoint: int | None = None, keep: int = 1) -> None:
    """The run directory is, or can become, a writable directory with room for a checkpoint: a
    job must not compute for a whole checkpoint interval to find out at its first save."""
    path = Path(run_dir)
    for candidate in (path, path / "checkpoints"):
        if candidate.exists() and not candidate.is_dir():
            raise ConfigError(f"run.dir: {candidate} is a file, not a directory; choose another run.dir")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.dir: {existing} is a file: {path} cannot be created under it")
    for directory in (existing, path / "checkpoints"):
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"run.dir: cannot write in {directory} (read-only file system or no permission)")
    if one_checkpoint:
        free = shutil.disk_usage(existing).free
        needed = f"one checkpoint needs about {one_checkpoint / 2**20:,.1f} MiB"
        if free < one_checkpoint:
            raise ConfigError(f"run.dir: {free / 2**20:,.1f} MiB free on the file system of {existing}, {needed}; "
                              "free space or choose another run.dir")
        if free < (keep + 1) * one_checkpoint:
            logger.warning("run.dir: %.1f MiB free on the file system of %s, %s and checkpoint.keep_last=%d keeps %d: "
                           "a later save may fail", free / 2**20, existing, needed, keep, keep + 1)


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
    _validate_fid(config)


def _validate_fid(config: ExperimentConfig) -> None:
    """FID during training: the files it reads exist before any rank starts."""
    section = config.eval
    if section.fid_every_steps < 0:
        raise ConfigError(f"eval.fid_every_steps must be >= 0 (0 turns it off), got {section.fid_every_steps}")
    if section.fid_every_steps == 0:
        return
    for name in ("fid_samples", "fid_batch_size"):
        if getattr(section, name) < (2 if name == "fid_samples" else 1):
            raise ConfigError(f"eval.{name} must be >= {2 if name == 'fid_samples' else 1}, got {getattr(section, name)}")
    if not section.fid_reference:
        raise ConfigError("eval.fid_every_steps needs eval.fid_reference (the reference batch .npz, with mu and sigma)")
    if not Path(section.fid_reference).is_file():
        raise ConfigError(f"eval.fid_reference: file {section.fid_reference} does not exist")
    try:
        with zipfile.ZipFile(section.fid_reference) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile:
        raise ConfigError(f"eval.fid_reference: {section.fid_reference} is not an .npz file") from None
    if not {"mu.npy", "sigma.npy"} <= names:
        raise ConfigError(f"eval.fid_reference: {section.fid_reference} has no mu/sigma (the reference statistics "
                          f"of the ADM evaluator's batches); it holds {sorted(n.removesuffix('.npy') for n in names)}")
    inception = section.inception or os.environ.get("MVAR_DIST_INCEPTION")
    if not inception:
        raise ConfigError("eval.fid_every_steps needs the Inception weights: set eval.inception or $MVAR_DIST_INCEPTION "
                          "(pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    if not Path(inception).is_file():
        raise ConfigError(f"eval.inception: file {inception} does not exist")


def finite_at_least(name: str, value: float, low: float, strict: bool, note: str = "") -> None:
    """NaN fails every comparison, so ``value <= 0`` alone would let it through."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}{note}, got {value}")


def _validate_optim(optim: OptimConfig, total_steps: int) -> None:
    """Every optimizer value, checked here once: a NaN would otherwise only show as NaN weights."""
    if optim.warmup_steps < 0 or optim.warmup_steps >= total_steps:
        raise ConfigError(
            f"optim.warmup_steps must be in 0..train.total_steps-1 ({total_steps - 1}), got {optim.warmup_steps}"
        )
    if optim.lr is not None:
        finite_at_least("optim.lr", optim.lr, 0.0, strict=True)
    finite_at_least("optim.base_lr", optim.base_lr, 0.0, strict=True)
    for i, beta in enumerate(optim.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
    finite_at_least("optim.eps", optim.eps, 0.0, strict=True)
    for name in ("warmup_start", "final_lr_ratio"):  # fractions of the peak lr
        value = getattr(optim, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"optim.{name} must be in [0, 1], got {value}")
    finite_at_least("optim.grad_clip", optim.grad_clip, 0.0, strict=False, note=" (0 disables clipping)")
    finite_at_least("optim.weight_decay", optim.weight_decay, 0.0, strict=False)


def _validate_sample(sample: SampleConfig, num_classes: int) -> None:
    """The settings published with the model and used by grids: checked whether a grid is due or not."""
    finite_at_least("sample.cfg", sample.cfg, 0.0, strict=False)
    if not 0.0 <= sample.top_p <= 1.0:
        raise ConfigError(f"sample.top_p must be in [0, 1], got {sample.top_p}")
    if sample.top_k < 0:
        raise ConfigError(f"sample.top_k must be >= 0 (0 keeps every token), got {sample.top_k}")
    if sample.per_class < 1:
        raise ConfigError(f"sample.per_class must be >= 1, got {sample.per_class}")
    classes = sample.grid_classes(num_classes)
    bad = [c for c in classes if not 0 <= c <= num_classes]
    if not classes or bad:
        raise ConfigError(
            f"sample.classes must be a non-empty list of labels in 0..{num_classes} "
            f"(model.num_classes = unconditional), got {list(classes)}"
        )


def _validate_data(data: DataConfig) -> None:
    try:
        data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if data.seed < 0:  # numpy's generators refuse negative seeds, at the first batch
        raise ConfigError(f"data.seed must be >= 0, got {data.seed}")
    if data.shard_url_template:
        _validate_shard_url_template(data.shard_url_template)


def _validate_shard_url_template(template: str) -> None:
    """Only the placeholders load_manifest fills; else every rank fails reading the manifest."""
    name = "data.shard_url_template"
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ConfigError(f"{name} {template!r} is not a valid template: {err}") from None
    unknown = [field for field in fields if field not in SHARD_URL_PLACEHOLDERS]
    if unknown:
        raise ConfigError(
            f"{name}: unknown placeholder {{{unknown[0]}}} in {template!r}; only {{name}} and {{split}} exist "
            "(write {{ and }} for a literal brace)"
        )
    if "name" not in fields:
        raise ConfigError(
            f"{name} {template!r} must contain {{name}} (the shard's file name): without it every shard "
            "has the same URL"
        )
    try:  # format specs and nested fields ("{name:d}", "{name:{x}}") fail only when formatted
        template.format(name="shard-000000.tar", split="train")
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise ConfigError(f"{name} {template!r} is not a valid template: {err!r}") from None


def check_manifests(config: ExperimentConfig) -> None:
    """The data.*_manifest files a job would read, read here: a job must not queue for hours to
    fail on a typo. URLs (``s3://``, ``pipe:``) are left to the job, which may see other storage."""
    data = config.data
    if not data.train_manifest:
        raise ConfigError("data.train_manifest is not set: point it at the train split's manifest.json (or its directory)")
    for name, location in (("data.train_manifest", data.train_manifest), ("data.val_manifest", data.val_manifest)):
        if not location or "://" in location or location.startswith("pipe:"):
            continue
        try:
            load_manifest(location, data.shard_url_template)
        except FileNotFoundError as err:
            raise ConfigError(f"{name}: {err}") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{name}: {location} is not a readable manifest.json: {err!r}") from None


def validate_launch(launch: LaunchConfig) -> None:
    """Checks that need no cluster; messages name the flag and the config field."""
    for name in ("nodes", "cpus_per_task", "time"):
        value = getattr(launch, name)
        if value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 1, got {value}")
    for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
        value = getattr(launch, name)
        if value < 0:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 0, got {value}")
    if launch.tasks_per_node is not None:
        if launch.tasks_per_node < 1:
            raise LaunchError(f"--tasks-per-node (launch.tasks_per_node) must be >= 1, got {launch.tasks_per_node}")
        if launch.gpus_per_node and launch.tasks_per_node != launch.gpus_per_node:
            raise LaunchError(
                f"--tasks-per-node={launch.tasks_per_node} with --gpus-per-node={launch.gpus_per_node}: "
                "GPU jobs run one task per GPU; drop --tasks-per-node (it is for CPU ranks)"
            )
    if launch.gpu_memory is not None:
        try:
            parse_size(launch.gpu_memory)
        except ValueError as error:
            raise LaunchError(f"--gpu-memory (launch.gpu_memory): {error}") from None
    if launch.mem is not None and not _MEM_PATTERN.match(launch.mem):
        raise LaunchError(f"--mem (launch.mem) must look like 64G or 500M, got {launch.mem!r}")
    if launch.signal_delay_s >= launch.time * 60:
        raise LaunchError(
            f"--signal-delay={launch.signal_delay_s}s is not shorter than --time={launch.time} min: "
            "the job would be signalled before it starts working"
        )
    if launch.cluster not in ("slurm", "local", "debug"):
        raise LaunchError(f"--cluster (launch.cluster) must be slurm, local or debug, got {launch.cluster!r}")
    if launch.cluster != "slurm" and launch.nodes != 1:
        raise LaunchError(f"--cluster {launch.cluster} runs on this machine only: use --nodes 1")
    if launch.time <= 10:
        # submitit's has_timed_out() is always true then, so preemptions count as timeouts
        logger.warning("--time=%d min <= 10: every preemption counts against max_requeues as a timeout", launch.time)


def validate_tokenizer(config: TokenizerExperiment, world_size: int) -> None:
    """Everything a tokenizer run can get wrong before compute, naming the field and the value."""
    train, loss, optim = config.train, config.loss, config.optim
    check_run_dir(config.run.dir)
    finite_at_least("train.hang_timeout_s", train.hang_timeout_s, 0.0, strict=False)
    for name in ("total_steps", "global_batch_size", "log_every", "max_consecutive_nonfinite", "grid_images"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    check_micro_batch("train", train.micro_batch_size, train.max_micro_batch_size)
    train.batch_split(world_size)
    for name in ("val_every_steps", "val_max_batches"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 turns it off), got {getattr(train, name)}")
    if train.val_every_steps and not config.data.val:
        raise ConfigError(f"train.val_every_steps={train.val_every_steps} needs data.val (held-out images)")
    for name in ("l1", "l2", "vq", "beta", "perceptual", "gan"):
        finite_at_least(f"loss.{name}", getattr(loss, name), 0.0, strict=False)
    if loss.l1 == loss.l2 == loss.perceptual == 0:
        raise ConfigError("loss.l1, loss.l2 and loss.perceptual are all 0: nothing makes the decoder reconstruct")
    if loss.perceptual and not loss.vgg_weights:
        raise ConfigError("loss.perceptual > 0 needs loss.vgg_weights (torchvision's vgg16 state dict file); "
                          "mvar-dist downloads nothing")
    for name in ("vgg_weights", "lpips_weights"):
        value = getattr(loss, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"loss.{name}: file {value} does not exist")
    if loss.gan_start_step < 0 or loss.disc_channels < 1 or loss.disc_layers < 1:
        raise ConfigError("loss.gan_start_step must be >= 0, loss.disc_channels and loss.disc_layers >= 1")
    deepspeed = config.deepspeed
    if deepspeed.precision != "fp32":
        # DeepSpeed casts the whole VQVAE to 16 bits, and nearest-code search in 16-bit distances
        # picks wrong codes; the network is small, so fp32 costs little
        raise ConfigError(f"deepspeed.precision={deepspeed.precision}: tokenizer training runs in fp32 "
                          "(set deepspeed.precision=fp32)")
    if Path(deepspeed.template).stem.startswith("zero3"):
        # the adaptive GAN weight needs the decoder's last layer whole and the validation grid runs
        # the model on rank 0 alone, outside DeepSpeed's gathering forward
        raise ConfigError(f"deepspeed.template={deepspeed.template}: tokenizer training supports ZeRO stages 1 "
                          "and 2 (zero1, zero2); the VQVAE's weights fit on every GPU")
    read_template(deepspeed.template, deepspeed.precision)
    for name in ("lr", "eps"):
        finite_at_least(f"optim.{name}", getattr(optim, name), 0.0, strict=True)
    if optim.disc_lr is not None:
        finite_at_least("optim.disc_lr", optim.disc_lr, 0.0, strict=True)
    for index, beta in enumerate(optim.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{index}] must be in [0, 1), got {beta}")
    finite_at_least("optim.weight_decay", optim.weight_decay, 0.0, strict=False)
    finite_at_least("optim.grad_clip", optim.grad_clip, 0.0, strict=False)
    if not 0 <= optim.warmup_steps < train.total_steps:
        raise ConfigError(f"optim.warmup_steps must be in 0..{train.total_steps - 1}, got {optim.warmup_steps}")
    book = config.codebook
    if not 0.0 < book.usage_decay < 1.0:
        raise ConfigError(f"codebook.usage_decay must be in (0, 1), got {book.usage_decay}")
    if book.restart_dead_every < 0 or book.dead_threshold < 0:
        raise ConfigError("codebook.restart_dead_every and codebook.dead_threshold must be >= 0")
    for name in ("every_steps", "keep_last"):
        if getattr(config.checkpoint, name) < 1:
            raise ConfigError(f"checkpoint.{name} must be >= 1, got {getattr(config.checkpoint, name)}")
    if config.tokenizer.init_from and not Path(config.tokenizer.init_from).is_file():
        raise ConfigError(f"tokenizer.init_from: file {config.tokenizer.init_from} does not exist")
    if not config.data.train:
        raise ConfigError("data.train is empty: name the training images (a folder, .tar shards or a list)")
    try:
        config.data.validate()
        architecture = TokenizerConfig(**config.tokenizer.architecture())
        size = architecture.downsample_factor * architecture.patch_nums[-1]
        if config.data.image_size != size:
            raise ValueError(
                f"data.image_size={config.data.image_size} but the tokenizer's images are {size} px "
                f"(2^(len(ch_mult)-1) x patch_nums[-1]); set data.image_size={size}"
            )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    finite_at_least("tracking.timeout_s", config.tracking.timeout_s, 0.0, strict=True)
