"""The experiment file of ``mvar-dist train-tokenizer``: VAR's multi-scale VQVAE trained with the
VQGAN recipe (reconstruction, VQ, perceptual and adversarial losses). A file is a tokenizer
experiment when its top level says ``kind: tokenizer``; ``run``, ``deepspeed``, ``checkpoint``,
``tracking``, ``debug`` and ``launch`` are the sections of the transformer's experiment, so
submitting, checkpoints, tracking and the run directory work the same. Field reference:
docs/tokenizer_training.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from mvar_dist.config.compatibility import changed_keys, config_hash
from mvar_dist.config.deepspeed_templates import read_template
from mvar_dist.config.loading import ConfigError, build, plain, read_config_file
from mvar_dist.config.sections import (
    CheckpointConfig,
    DebugConfig,
    DeepSpeedSection,
    LaunchConfig,
    RunConfig,
    TrackingConfig,
)
from mvar_dist.config.validation import finite_at_least
from mvar_dist.data.images import ImageDataConfig
from mvar_dist.scales import DEFAULT_PATCH_NUMS
from mvar_dist.tokenizer.vqvae import TokenizerConfig

KIND = "tokenizer"


@dataclass
class VQVAESection:
    """The architecture of :class:`mvar_dist.tokenizer.MultiScaleVQVAE`; defaults are the released
    ``vae_ch160v4096z32``. ``init_from`` starts from weights (.pth/.safetensors) instead of scratch."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    init_from: str | None = None

    def architecture(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "init_from"}


@dataclass
class LossSection:
    """Loss weights (0 turns a term off). The published VQGAN ImageNet recipe: l1 1, perceptual 1,
    vq 1 with beta 0.25, gan 0.8 from step 250,001 with the adaptive weight."""

    l1: float = 1.0  # mean |x - x_hat|
    l2: float = 0.0  # mean (x - x_hat)^2
    vq: float = 1.0  # codebook + beta x commitment, averaged over the scales
    beta: float = 0.25  # commitment weight inside the VQ loss
    perceptual: float = 0.0  # LPIPS-style distance over VGG16 features; needs vgg_weights
    vgg_weights: str | None = None  # torchvision's vgg16 state dict file (nothing is downloaded)
    lpips_weights: str | None = None  # LPIPS's learned linear layers (vgg.pth); None: plain channel mean
    gan: float = 0.0  # hinge adversarial loss of a patch discriminator; 0: no discriminator
    gan_start_step: int = 0  # the discriminator trains, and its loss counts, from this step on
    adaptive_gan_weight: bool = True  # scale the GAN loss by |grad nll| / |grad gan| at the decoder's last layer
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class CodebookSection:
    """Codebook health: usage statistics every step, optional restart of dead codes."""

    usage_decay: float = 0.99  # EMA of per-scale code hits (exported as quantize.ema_vocab_hit_SV)
    dead_threshold: float = 1e-3  # a code is dead when its EMA hit rate is below this fraction of uniform
    restart_dead_every: int = 0  # steps between restarts of dead codes from the batch's residuals; 0: never
    warn_usage_below: float = 0.1  # warn when fewer than this fraction of codes are used in a step


@dataclass
class TokenizerTrainSection:
    total_steps: int = 1000
    global_batch_size: int = 64
    micro_batch_size: int = 8
    log_every: int = 1
    max_consecutive_nonfinite: int = 10
    val_every_steps: int = 0  # reconstruction L1/PSNR on data.val and a grid, every N steps and at the end
    val_max_batches: int = 0  # per-rank validation batches; 0: the whole split
    grid_images: int = 8  # originals in the validation grid (one row each: original, then each scale count)


@dataclass
class TokenizerOptimSection:
    lr: float = 1e-4  # the autoencoder's (encoder, decoder, codebook, phi)
    disc_lr: float | None = None  # the discriminator's; None: lr
    betas: tuple[float, float] = (0.5, 0.9)  # VQGAN's Adam betas
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables
    warmup_steps: int = 0  # linear warmup of both learning rates from 0


@dataclass
class TokenizerExperiment:
    kind: Literal["tokenizer"] = KIND
    run: RunConfig = field(default_factory=RunConfig)
    tokenizer: VQVAESection = field(default_factory=VQVAESection)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: LossSection = field(default_factory=LossSection)
    codebook: CodebookSection = field(default_factory=CodebookSection)
    train: TokenizerTrainSection = field(default_factory=TokenizerTrainSection)
    optim: TokenizerOptimSection = field(default_factory=TokenizerOptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=lambda: DeepSpeedSection(template="zero1", precision="fp32"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="mvar-dist-tokenizer"))
    debug: DebugConfig = field(default_factory=DebugConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


# what a resumed tokenizer run may change; everything else defines the run
RESUMABLE_CHANGES = (
    "run.dir", "train.total_steps", "optim.warmup_steps", "train.log_every", "train.max_consecutive_nonfinite",
    "train.val_every_steps",
    "train.val_max_batches", "train.grid_images", "tokenizer.init_from", "checkpoint", "tracking", "debug", "launch",
    "data.num_workers", "data.train", "data.val", "data.bad_data", "data.max_bad_fraction", "loss.vgg_weights",
    "loss.lpips_weights", "codebook.warn_usage_below",
)


def is_tokenizer_file(path: str | Path, overrides: Sequence[str] = ()) -> bool:
    """True when an experiment file (with overrides) says ``kind: tokenizer``."""
    return read_config_file(path, overrides).get("kind") == KIND


def load_tokenizer_experiment(path: str | Path, overrides: Sequence[str] = ()) -> TokenizerExperiment:
    raw = read_config_file(path, overrides)
    try:
        return build(TokenizerExperiment, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def tokenizer_experiment_from_dict(raw: Mapping[str, Any]) -> TokenizerExperiment:
    return build(TokenizerExperiment, dict(raw), "")


def compatibility_hash(config: TokenizerExperiment) -> str:
    return config_hash(config.to_dict(), RESUMABLE_CHANGES)


def incompatible_keys(saved: Mapping[str, Any], current: TokenizerExperiment) -> list[str]:
    """Keys that differ between a checkpoint's config and ``current``, outside RESUMABLE_CHANGES."""
    try:
        saved = tokenizer_experiment_from_dict(saved).to_dict()  # fields added later: their defaults
    except ConfigError:
        pass
    return changed_keys(saved, current.to_dict(), RESUMABLE_CHANGES)


def validate_tokenizer_experiment(config: TokenizerExperiment, world_size: int) -> None:
    """Everything a tokenizer run can get wrong before compute, naming the field and the value."""
    train, loss, optim = config.train, config.loss, config.optim
    for name in ("total_steps", "global_batch_size", "micro_batch_size", "log_every", "max_consecutive_nonfinite",
                 "grid_images"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    if train.global_batch_size % (train.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size "
            f"({train.micro_batch_size}) x world size ({world_size})"
        )
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
