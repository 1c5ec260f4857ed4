"""The experiment of ``mvar-dist train-tokenizer``: VAR's multi-scale VQVAE trained with the
VQGAN recipe (reconstruction, VQ, perceptual and adversarial losses). A file is a tokenizer
experiment when its top level says ``kind: tokenizer`` (:mod:`mvar_dist.config.kinds` decides);
``run``, ``deepspeed``, ``checkpoint``, ``tracking``, ``debug`` and ``launch`` are the sections of
the transformer's experiment, so submitting, checkpoints, tracking and the run directory work
the same. Field reference: docs/tokenizer_training.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mvar_dist.config.batch_split import BatchSplit, MicroBatch, resolve_batch_split
from mvar_dist.config.loading import plain
from mvar_dist.config.sections import (
    CheckpointConfig,
    DebugConfig,
    DeepSpeedSection,
    LaunchConfig,
    RunConfig,
    TrackingConfig,
)
from mvar_dist.images import ImageDataConfig
from mvar_dist.scales import DEFAULT_PATCH_NUMS

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
    micro_batch_size: MicroBatch = 8  # or auto, as in the transformer's train section
    max_micro_batch_size: int | None = None
    log_every: int = 1
    max_consecutive_nonfinite: int = 10
    hang_timeout_s: float = 1800.0  # as the transformer's train.hang_timeout_s
    val_every_steps: int = 0  # reconstruction L1/PSNR on data.val and a grid, every N steps and at the end
    val_max_batches: int = 0  # per-rank validation batches; 0: the whole split
    grid_images: int = 8  # originals in the validation grid (one row each: original, then each scale count)

    def batch_split(self, world_size: int) -> BatchSplit:
        return resolve_batch_split(self.global_batch_size, self.micro_batch_size, world_size, self.max_micro_batch_size)


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
TOKENIZER_RESUMABLE_CHANGES: tuple[str, ...] = (
    "run.dir", "train.total_steps", "optim.warmup_steps", "train.micro_batch_size", "train.max_micro_batch_size", "train.log_every", "train.max_consecutive_nonfinite", "train.hang_timeout_s",
    "train.val_every_steps",
    "train.val_max_batches", "train.grid_images", "tokenizer.init_from", "checkpoint", "tracking", "debug", "launch",
    "data.num_workers", "data.train", "data.val", "data.bad_data", "data.max_bad_fraction", "loss.vgg_weights",
    "loss.lpips_weights", "codebook.warn_usage_below",
)
