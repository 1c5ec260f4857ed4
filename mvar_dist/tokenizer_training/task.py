"""Training the multi-scale VQVAE (``mvar-dist train-tokenizer``): what this kind of training
supplies to the run skeleton of :mod:`mvar_dist.runtime.loop` (a
:class:`~mvar_dist.runtime.task.TrainingTask`): image loaders, the VQVAE and (with a GAN loss)
the patch discriminator as two DeepSpeed engines, one optimizer step of both (:func:`train_step`)
with codebook statistics and dead-code restarts, and reconstruction validation with a grid.

One optimizer step of each engine per global batch (VQGAN's recipe). Per micro-batch: the
autoencoder's loss, reconstruction (L1/L2) + perceptual + VQ (codebook + beta x commitment) + the
adaptive-weighted hinge GAN loss once ``loss.gan_start_step`` is reached, with the discriminator
frozen while it judges for the generator; then the discriminator's hinge loss on real images and
on the detached reconstructions. The sums and code counts are reduced over ranks by
:func:`reduce_step`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mvar_dist.config import ConfigError, TokenizerExperiment
from mvar_dist.config.tokenizer_experiment import LossSection
from mvar_dist.images import build_image_train_loader, build_image_val_loader
from mvar_dist.runtime import deepspeed_engine
from mvar_dist.runtime.checkpoint import Engines
from mvar_dist.runtime.loop import is_due
from mvar_dist.runtime.memory import peak_memory_mb
from mvar_dist.runtime.task import RankContext, StepOutcome
from mvar_dist.state_files import load_state_dict_file
from mvar_dist.tokenizer import MultiScaleVQVAE
from mvar_dist.tokenizer_training import evaluation
from mvar_dist.tokenizer_training.codebook import CODEBOOK, CodebookUsage, restart_dead_codes
from mvar_dist.tokenizer_training.discriminator import PatchDiscriminator
from mvar_dist.tokenizer_training.losses import (
    adaptive_weight,
    gan_factor,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from mvar_dist.tokenizer_training.perceptual import PerceptualLoss
from mvar_dist.tracking import Tracker

logger = logging.getLogger(__name__)

DISCRIMINATOR = "discriminator"  # the sub-directory of every checkpoint tag that holds it


# ----- one optimizer step -----

# per-step sums reduced over ranks, in this order
TERMS = ("loss", "reconstruction", "perceptual", "vq", "gan_g", "gan_weight", "gan_d", "logits_real", "logits_fake")


@dataclass
class StepSums:
    sums: torch.Tensor  # (len(TERMS),) float64: this rank's sums over its micro-batches, then over ranks
    counts: torch.Tensor  # (S, V) code hits
    targets: list[torch.Tensor]  # the last micro-batch's residual targets (restarting dead codes)
    images: int


def train_step(generator: Any, critic: Any, perceptual_net: Any, loss: LossSection, step: int, batches: Iterator[Any],
               device: torch.device) -> StepSums:
    """Both engines' optimizer steps on one global batch (this rank's micro-batches): the loss
    sums of :data:`TERMS`, the code counts (S, V) and the last micro-batch's residual targets."""
    vqvae = generator.module
    sums = torch.zeros(len(TERMS), dtype=torch.float64)
    counts = torch.zeros(vqvae.layout.num_scales, vqvae.vocab_size, dtype=torch.float64)
    gan_on = loss.gan > 0 and gan_factor(step, loss.gan_start_step) > 0
    targets: list[torch.Tensor] = []
    images_seen = 0
    micro_batches = generator.gradient_accumulation_steps()
    for index in range(micro_batches):
        with torch.random.fork_rng(devices=[]):  # the loader's workers must not shift the training RNG
            images, _ = next(batches)
        images = images.to(device)
        images_seen += images.shape[0]
        recon, quantized = generator(images, loss.beta)
        reconstruction = reconstruction_loss(recon.float(), images.float(), loss.l1, loss.l2)
        nll = reconstruction
        perceptual = torch.zeros(())
        if perceptual_net is not None:
            perceptual = perceptual_net(recon.float(), images.float()).mean()
            nll = nll + loss.perceptual * perceptual
        total = nll + loss.vq * quantized.vq_loss
        g_loss, weight = torch.zeros(()), torch.zeros(())
        if gan_on:
            critic.module.requires_grad_(False)  # its gradients come from its own step only
            g_loss = hinge_g_loss(critic.module(recon))
            critic.module.requires_grad_(True)
            # the weight's autograd.grad calls are no backward of the step: at an accumulation
            # boundary DeepSpeed would reduce gradients after them (and fail on empty buckets)
            generator.set_gradient_accumulation_boundary(False)
            weight = (adaptive_weight(nll, g_loss, vqvae.decoder.conv_out.weight) if loss.adaptive_gan_weight
                      else torch.ones(()))
            total = total + loss.gan * weight * g_loss
            generator.set_gradient_accumulation_boundary(index == micro_batches - 1)
        generator.backward(total)
        generator.step()
        d_loss, real, fake = torch.zeros(()), torch.zeros(()), torch.zeros(())
        if gan_on:
            logits_real, logits_fake = critic(images), critic(recon.detach())  # separate BN batches
            d_loss = hinge_d_loss(logits_real, logits_fake)
            critic.backward(d_loss)
            critic.step()
            real, fake = logits_real.detach().mean(), logits_fake.detach().mean()
        counts += torch.stack([torch.bincount(c.flatten(), minlength=vqvae.vocab_size) for c in quantized.codes]).double().cpu()
        targets = [t.detach() for t in quantized.targets]
        values = (total, reconstruction, perceptual, quantized.vq_loss, g_loss, weight, d_loss, real, fake)
        sums += torch.tensor([float(v.detach()) for v in values], dtype=torch.float64)
    return StepSums(sums, counts, targets, images_seen)


def reduce_step(result: StepSums, applied: bool, skipped_samples: int) -> tuple[StepSums, dict[str, float]]:
    """All-reduce the step's sums, code counts and counters (non-finite ranks, images, skipped
    samples); returns the reduced sums and the counters."""
    flags = torch.tensor([float(not applied), float(result.images), float(skipped_samples)], dtype=torch.float64)
    sums, counts = result.sums, result.counts
    if dist.is_initialized():
        packed = torch.cat([sums, flags])
        dist.all_reduce(packed)
        sums, flags = packed[: len(TERMS)], packed[len(TERMS):]
        dist.all_reduce(counts)
    counters = {"nonfinite_ranks": float(flags[0]), "images": float(flags[1]), "skipped_samples": float(flags[2])}
    return StepSums(sums, counts, result.targets, result.images), counters


# ----- the task -----


class TokenizerTask:
    """VQGAN's recipe on VAR's multi-scale VQVAE; see docs/tokenizer_training.md."""

    def __init__(self, config: TokenizerExperiment) -> None:
        self.config = config
        self.loader: Any = None
        self.val_loader: Any = None
        self.generator: Any = None  # the VQVAE's engine
        self.critic: Any = None  # the discriminator's engine (None without a GAN loss)
        self.perceptual: Any = None
        self.context: RankContext | None = None
        self.usage: CodebookUsage | None = None
        self.grid_images: torch.Tensor | None = None

    # ----- before the first step -----

    def build_loader(self, rank: int, world_size: int) -> Any:
        batch = self.config.train.batch_split(world_size).micro_batch
        try:
            self.loader = build_image_train_loader(self.config.data, rank=rank, world_size=world_size, batch_size=batch,
                                                   seed=self.config.run.seed)
            if self.config.train.val_every_steps:
                self.val_loader = build_image_val_loader(self.config.data, rank=rank, world_size=world_size,
                                                         batch_size=batch, classes=self.loader.index.classes)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from None
        return self.loader

    def build_engines(self, context: RankContext, resuming: bool) -> Engines:
        self.context = context
        torch.manual_seed(self.config.run.seed)  # identical initial weights on every rank
        vqvae = MultiScaleVQVAE(**self.config.tokenizer.architecture())
        if self.config.tokenizer.init_from and not resuming:
            try:
                state = load_state_dict_file(self.config.tokenizer.init_from, "cpu", what="tokenizer.init_from")
                state.pop("quantize.ema_vocab_hit_SV", None)  # usage statistics: restarted with training
                vqvae.load_state_dict(state, strict=True)
            except (ValueError, RuntimeError) as err:
                raise ConfigError(f"tokenizer.init_from: {err}") from None
        vqvae.requires_grad_(True).train()
        loss, optim = self.config.loss, self.config.optim
        discriminator = PatchDiscriminator(3, loss.disc_channels, loss.disc_layers) if loss.gan else None
        if loss.perceptual:
            try:
                self.perceptual = PerceptualLoss(loss.vgg_weights, loss.lpips_weights).to(context.device)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"loss.vgg_weights / loss.lpips_weights: {err}") from None
        self.generator = self._engine(vqvae, optim.lr)
        others = {}
        if discriminator is not None:
            self.critic = others[DISCRIMINATOR] = self._engine(discriminator, optim.disc_lr or optim.lr)
        self.usage = CodebookUsage(vqvae.layout.num_scales, vqvae.vocab_size, self.config.codebook.usage_decay,
                                   self.config.codebook.dead_threshold)
        return Engines(self.generator, others)

    def _engine(self, model: torch.nn.Module, lr: float) -> Any:
        optim, train = self.config.optim, self.config.train
        assert self.context is not None
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay, foreach=False)
        ds = deepspeed_engine.deepspeed_json(self.config.deepspeed.template, self.config.deepspeed.precision,
                                             train.batch_split(self.context.world_size), optim.grad_clip,
                                             self.context.resized_from is not None)
        return deepspeed_engine.initialize(model, optimizer, ds)

    def tags(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        assert self.usage is not None
        return {CODEBOOK: self.usage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.usage is not None
        self.usage.load_state_dict(state[CODEBOOK])

    # ----- one step -----

    def _set_lrs(self, step: int) -> float:
        optim = self.config.optim
        factor = min(1.0, step / optim.warmup_steps) if optim.warmup_steps else 1.0
        for engine, lr in ((self.generator, optim.lr), (self.critic, optim.disc_lr or optim.lr)):
            if engine is not None:
                deepspeed_engine.set_lr(engine, lr * factor)
        return optim.lr * factor

    def train_step(self, step: int, batches: Iterator[Any]) -> StepOutcome:
        cfg, context, usage = self.config, self.context, self.usage
        assert context is not None and usage is not None
        lr = self._set_lrs(step)
        start = time.perf_counter()
        result = train_step(self.generator, self.critic, self.perceptual, cfg.loss, step, batches, context.device)
        result, counters = reduce_step(result, bool(self.generator.was_step_applied()), int(self.loader.num_skipped))
        micro = self.generator.gradient_accumulation_steps()
        metrics = {f"train/{name}": float(v) / (micro * context.world_size) for name, v in zip(TERMS, result.sums)}
        metrics.update(usage.update(result.counts))
        step_time = time.perf_counter() - start
        metrics.update({"lr": lr, "images_per_s": counters["images"] / max(step_time, 1e-9), "step_time_s": step_time,
                        "peak_memory_mb": peak_memory_mb(context.device), "skipped_samples": counters["skipped_samples"]})
        if metrics["codebook/usage"] < cfg.codebook.warn_usage_below:
            logger.warning("step %d: only %.1f%% of the codes were used (codebook collapse?)", step,
                           100 * metrics["codebook/usage"])
        every = cfg.codebook.restart_dead_every
        if every and step % every == 0:
            metrics["codebook/restarted"] = float(restart_dead_codes(self.generator, usage, result.targets, step,
                                                                     cfg.run.seed))
        return StepOutcome(metrics, applied=counters["nonfinite_ranks"] == 0)

    # ----- evaluation -----

    def evaluation_due(self, step: int) -> bool:
        return self.val_loader is not None and is_due(self.config.train.val_every_steps, step, self.config.train.total_steps)

    def evaluate(self, step: int, tracker: Tracker) -> None:
        if not self.evaluation_due(step):
            return
        context = self.context
        assert context is not None
        vqvae = self.generator.module
        metrics = evaluation.validate(vqvae, self.val_loader, self.config.train.val_max_batches, context.device)
        tracker.log_metrics(metrics, step)
        logger.info("step %d: val/l1 %.4f val/psnr %.2f dB", step, metrics["val/l1"], metrics["val/psnr"])
        if context.rank == 0:
            if self.grid_images is None:
                with torch.random.fork_rng(devices=[]):
                    images = next(iter(self.val_loader))[0]
                self.grid_images = images[: self.config.train.grid_images].to(context.device)
            evaluation.log_scale_grid(vqvae, self.grid_images, tracker, step, context.rank)
