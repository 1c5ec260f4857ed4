"""The step loop of tokenizer training on one rank (VQGAN's recipe on VAR's multi-scale VQVAE).

One optimizer step of each engine per global batch. Per micro-batch: the autoencoder's loss,
reconstruction (L1/L2) + perceptual + VQ (codebook + beta x commitment) + the adaptive-weighted
hinge GAN loss once ``loss.gan_start_step`` is reached, with the discriminator frozen while it
judges for the generator; then the discriminator's hinge loss on real images and on the detached
reconstructions. Code usage is summed over ranks every step; dead codes restart on schedule.
Checkpoints, stops and postponed evaluation behave as in :mod:`mvar_dist.training.loop`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from mvar_dist.run_dir import RunDir
from mvar_dist.tokenizer_training import evaluation
from mvar_dist.tokenizer_training.codebook import CodebookUsage, restart_dead_codes
from mvar_dist.tokenizer_training.config import TokenizerExperiment, compatibility_hash
from mvar_dist.tokenizer_training.losses import (
    adaptive_weight,
    gan_factor,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from mvar_dist.tracking import Tracker
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training.evaluation import is_due
from mvar_dist.training.step import StopFlag, peak_memory_mb

logger = logging.getLogger(__name__)

# per-step sums reduced over ranks, in this order
TERMS = ("loss", "reconstruction", "perceptual", "vq", "gan_g", "gan_weight", "gan_d", "logits_real", "logits_fake")


class TokenizerLoop:
    def __init__(self, config: TokenizerExperiment, run_dir: RunDir, rank: int, world: int, generator: Any, critic: Any,
                 perceptual: Any, loader: Any, val_loader: Any, tracker: Tracker, stop: StopFlag, lock: Any,
                 device: torch.device) -> None:
        self.config, self.run_dir, self.rank, self.world, self.device = config, run_dir, rank, world, device
        self.generator, self.critic, self.perceptual = generator, critic, perceptual
        self.loader, self.val_loader, self.tracker, self.stop, self.lock = loader, val_loader, tracker, stop, lock
        vqvae = generator.module
        self.usage = CodebookUsage(vqvae.layout.num_scales, vqvae.vocab_size, config.codebook.usage_decay,
                                   config.codebook.dead_threshold)
        self.consecutive_nonfinite = 0
        self.evaluation_pending = False
        self.grid_images: torch.Tensor | None = None

    def restore(self, run_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.consecutive_nonfinite = int(run_state.get("consecutive_nonfinite", 0))
        self.evaluation_pending = bool(run_state.get("evaluation_pending", False))
        self.usage.load_state_dict(rank_state["codebook"])
        if self.evaluation_pending:
            self.tracker.hold_from(int(run_state["step"]))

    # ----- one step -----

    def _set_lrs(self, step: int) -> float:
        optim = self.config.optim
        factor = min(1.0, step / optim.warmup_steps) if optim.warmup_steps else 1.0
        for engine, lr in ((self.generator, optim.lr), (self.critic, optim.disc_lr or optim.lr)):
            if engine is not None:
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr * factor
        return optim.lr * factor

    def _step(self, step: int, batches: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
        """Both engines' optimizer steps on one global batch; returns the loss sums, the code
        counts (S, V) and the last micro-batch's residual targets."""
        loss = self.config.loss
        vqvae = self.generator.module
        sums = torch.zeros(len(TERMS), dtype=torch.float64)
        counts = torch.zeros(vqvae.layout.num_scales, vqvae.vocab_size, dtype=torch.float64)
        gan_on = loss.gan > 0 and gan_factor(step, loss.gan_start_step) > 0
        targets: list[torch.Tensor] = []
        images_seen = 0
        for _ in range(self.generator.gradient_accumulation_steps()):
            with torch.random.fork_rng(devices=[]):  # the loader's workers must not shift the training RNG
                images, _ = next(batches)
            images = images.to(self.device)
            images_seen += images.shape[0]
            recon, quantized = self.generator(images, loss.beta)
            reconstruction = reconstruction_loss(recon.float(), images.float(), loss.l1, loss.l2)
            nll = reconstruction
            perceptual = torch.zeros(())
            if self.perceptual is not None:
                perceptual = self.perceptual(recon.float(), images.float()).mean()
                nll = nll + loss.perceptual * perceptual
            total = nll + loss.vq * quantized.vq_loss
            g_loss, weight = torch.zeros(()), torch.zeros(())
            if gan_on:
                self.critic.module.requires_grad_(False)  # its gradients come from its own step only
                g_loss = hinge_g_loss(self.critic.module(recon))
                self.critic.module.requires_grad_(True)
                weight = (adaptive_weight(nll, g_loss, vqvae.decoder.conv_out.weight) if loss.adaptive_gan_weight
                          else torch.ones(()))
                total = total + loss.gan * weight * g_loss
            self.generator.backward(total)
            self.generator.step()
            d_loss, real, fake = torch.zeros(()), torch.zeros(()), torch.zeros(())
            if gan_on:
                logits_real, logits_fake = self.critic(images), self.critic(recon.detach())  # separate BN batches
                d_loss = hinge_d_loss(logits_real, logits_fake)
                self.critic.backward(d_loss)
                self.critic.step()
                real, fake = logits_real.detach().mean(), logits_fake.detach().mean()
            counts += torch.stack([torch.bincount(c.flatten(), minlength=vqvae.vocab_size) for c in quantized.codes]).double().cpu()
            targets = [t.detach() for t in quantized.targets]
            values = (total, reconstruction, perceptual, quantized.vq_loss, g_loss, weight, d_loss, real, fake)
            sums += torch.tensor([float(v.detach()) for v in values], dtype=torch.float64)
        return sums, counts, targets, images_seen

    # ----- the loop -----

    def run(self, step: int) -> str:
        cfg = self.config
        if self.evaluation_pending:
            self.evaluate(step)
            self.evaluation_pending = False
            self.tracker.hold_from(None)
        batches = iter(self.loader)
        micro = self.generator.gradient_accumulation_steps()
        while step < cfg.train.total_steps:
            step += 1
            if cfg.debug.stop_at_step == step and self.rank == 0:
                self.stop.request("debug.stop_at_step")
            lr = self._set_lrs(step)
            start = time.perf_counter()
            sums, counts, targets, images = self._step(step, batches)
            applied = self.generator.was_step_applied()
            flags = torch.tensor([float(not applied), float(self.stop.requested), float(images),
                                  float(self.loader.num_skipped)], dtype=torch.float64)
            if dist.is_initialized():
                packed = torch.cat([sums, flags])
                dist.all_reduce(packed)
                sums, flags = packed[: len(TERMS)], packed[len(TERMS):]
                dist.all_reduce(counts)
            self.consecutive_nonfinite = 0 if flags[0] == 0 else self.consecutive_nonfinite + 1
            metrics = {f"train/{name}": float(v) / (micro * self.world) for name, v in zip(TERMS, sums)}
            metrics.update(self.usage.update(counts))
            step_time = time.perf_counter() - start
            metrics.update({"lr": lr, "images_per_s": float(flags[2]) / max(step_time, 1e-9), "step_time_s": step_time,
                            "peak_memory_mb": peak_memory_mb(self.device), "skipped_samples": float(flags[3])})
            if metrics["codebook/usage"] < cfg.codebook.warn_usage_below:
                logger.warning("step %d: only %.1f%% of the codes were used (codebook collapse?)", step,
                               100 * metrics["codebook/usage"])
            every = cfg.codebook.restart_dead_every
            if every and step % every == 0:
                metrics["codebook/restarted"] = float(restart_dead_codes(self.generator, self.usage, targets, step, cfg.run.seed))
            if step % cfg.train.log_every == 0 or step == cfg.train.total_steps:
                self.tracker.log_metrics(metrics, step)
            if self.lock is not None:
                self.lock.heartbeat()
            too_many = self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite
            stopping = flags[1] > 0
            if stopping:  # the checkpoint first; the evaluation due now runs on resume
                self.evaluation_pending = self.evaluation_due(step)
                if self.evaluation_pending:
                    self.tracker.hold_from(step)
            else:
                self.evaluate(step)
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.total_steps or stopping or too_many:
                self.save(step)
            if too_many:
                logger.error("stopping: %d consecutive non-finite steps; checkpoint saved at step %d",
                             self.consecutive_nonfinite, step)
                return "FAILED"
            if stopping:
                logger.warning("stopping on %s at step %d; checkpoint saved", self.stop.signal_name or "a peer's signal", step)
                return "KILLED"
        return "FINISHED"

    def evaluation_due(self, step: int) -> bool:
        return self.val_loader is not None and is_due(self.config.train.val_every_steps, step, self.config.train.total_steps)

    def evaluate(self, step: int) -> None:
        if not self.evaluation_due(step):
            return
        vqvae = self.generator.module
        metrics = evaluation.validate(vqvae, self.val_loader, self.config.train.val_max_batches, self.device)
        self.tracker.log_metrics(metrics, step)
        logger.info("step %d: val/l1 %.4f val/psnr %.2f dB", step, metrics["val/l1"], metrics["val/psnr"])
        if self.rank == 0:
            if self.grid_images is None:
                with torch.random.fork_rng(devices=[]):
                    images = next(iter(self.val_loader))[0]
                self.grid_images = images[: self.config.train.grid_images].to(self.device)
            evaluation.log_scale_grid(vqvae, self.grid_images, self.tracker, step, self.rank)

    def save(self, step: int) -> None:
        self.tracker.flush()
        run_state = {
            "step": step, "config": self.config.to_dict(), "config_hash": compatibility_hash(self.config),
            "mlflow_run_id": self.tracker.run_id if self.rank == 0 else None, "world_size": self.world,
            "consecutive_nonfinite": self.consecutive_nonfinite, "evaluation_pending": self.evaluation_pending,
            "undelivered_metrics": {str(s): m for s, m in self.tracker.undelivered().items()},
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoints.rng_states(self.device),
                      "codebook": self.usage.state_dict()}
        others = {"discriminator": self.critic} if self.critic is not None else None
        checkpoints.save_checkpoint(self.generator, self.run_dir, step, run_state, rank_state,
                                    self.config.checkpoint.keep_last, others)
        if self.config.debug.kill_after_checkpoint_step == step:
            logger.warning("debug.kill_after_checkpoint_step=%d: SIGKILL", step)
            os.kill(os.getpid(), signal.SIGKILL)
