"""One tokenizer-training run on one rank: the checks before compute, distributed init, the lock
on the run directory, the VQVAE and (with a GAN loss) the discriminator as two DeepSpeed
engines, resume, tracking; then :class:`mvar_dist.tokenizer_training.loop.TokenizerLoop`. The
shared steps are :mod:`mvar_dist.training.run_setup`'s, as for the transformer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mvar_dist.atomic import write_bytes
from mvar_dist.config import ConfigError
from mvar_dist.data.images import build_image_train_loader, build_image_val_loader
from mvar_dist.run_dir import ResumePoint, RunDir
from mvar_dist.state_files import load_state_dict_file
from mvar_dist.tokenizer import MultiScaleVQVAE
from mvar_dist.tokenizer_training.config import (
    RESUMABLE_CHANGES,
    TokenizerExperiment,
    compatibility_hash,
    incompatible_keys,
    validate_tokenizer_experiment,
)
from mvar_dist.tokenizer_training.discriminator import PatchDiscriminator
from mvar_dist.tokenizer_training.loop import TokenizerLoop
from mvar_dist.tokenizer_training.perceptual import PerceptualLoss
from mvar_dist.training import checkpoint as checkpoints
from mvar_dist.training import engine as engine_lib
from mvar_dist.training import run_setup
from mvar_dist.training.distributed import read_rank_env
from mvar_dist.training.step import StopFlag

logger = logging.getLogger(__name__)

DISCRIMINATOR = "discriminator"  # the sub-directory of every checkpoint tag that holds it


class TokenizerTrainer:
    def __init__(self, config: TokenizerExperiment) -> None:
        self.config = config
        self.rank_env = read_rank_env()
        self.rank, self.world = self.rank_env.rank, self.rank_env.world_size
        self.run_dir = RunDir(Path(config.run.dir))
        self.config_dict = config.to_dict()
        self.stop = StopFlag()
        self.damaged: list[tuple[str, str]] = []

    def _check_resumable(self, point: ResumePoint) -> None:
        if point.run_state.get("config", {}).get("kind") != "tokenizer":
            raise ConfigError(f"{self.run_dir.path} holds a transformer run ({point.tag}); use another run.dir")
        changed = incompatible_keys(point.run_state["config"], self.config)
        if changed:
            raise ConfigError(
                f"{self.run_dir.path} holds a checkpoint ({point.tag}) of a different tokenizer experiment: "
                f"{', '.join(changed)} changed. Only {', '.join(RESUMABLE_CHANGES)} may change on resume"
            )
        run_setup.check_world_size(point, self.world)

    def _build_data(self) -> tuple[Any, Any]:
        batch = self.config.train.micro_batch_size
        try:
            train = build_image_train_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch,
                                             seed=self.config.run.seed)
            val = None
            if self.config.train.val_every_steps:
                val = build_image_val_loader(self.config.data, rank=self.rank, world_size=self.world, batch_size=batch,
                                             classes=train.index.classes)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from None
        return train, val

    def _build_models(self, resuming: bool, device: torch.device) -> tuple[MultiScaleVQVAE, Any, Any]:
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
        loss = self.config.loss
        discriminator = PatchDiscriminator(3, loss.disc_channels, loss.disc_layers) if loss.gan else None
        perceptual = None
        if loss.perceptual:
            try:
                perceptual = PerceptualLoss(loss.vgg_weights, loss.lpips_weights).to(device)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"loss.vgg_weights / loss.lpips_weights: {err}") from None
        return vqvae, discriminator, perceptual

    def _engine(self, model: torch.nn.Module, lr: float) -> Any:
        optim, train = self.config.optim, self.config.train
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay, foreach=False)
        ds = engine_lib.deepspeed_json(self.config.deepspeed.template, self.config.deepspeed.precision,
                                       train.global_batch_size, train.micro_batch_size, self.world, optim.grad_clip)
        return engine_lib.initialize(model, optimizer, ds)

    def run(self) -> int:
        validate_tokenizer_experiment(self.config, self.world)
        point, self.damaged = run_setup.resume_point(self.run_dir, self._check_resumable)
        loader, val_loader = self._build_data()
        device = run_setup.init_distributed(self.rank_env, self.config.deepspeed.backend)

        def save_config() -> None:
            import yaml

            write_bytes(self.run_dir.config_file, yaml.safe_dump(self.config_dict, sort_keys=False).encode())

        lock = run_setup.claim_run_dir(self.run_dir, self.rank, save_config, point, self.damaged,
                                       self.config.checkpoint.keep_last)
        try:
            return self._train(point, loader, val_loader, device, lock)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, point: ResumePoint | None, loader: Any, val_loader: Any, device: torch.device, lock: Any) -> int:
        vqvae, discriminator, perceptual = self._build_models(point is not None, device)
        optim = self.config.optim
        generator = self._engine(vqvae, optim.lr)
        critic = self._engine(discriminator, optim.disc_lr or optim.lr) if discriminator is not None else None
        others = {DISCRIMINATOR: critic} if critic is not None else {}
        step, rank_state = 0, None
        if point is not None:
            rank_state = checkpoints.load_checkpoint(generator, self.run_dir, point, others)
            run_setup.restore_loader(loader, rank_state["loader"], self.run_dir, point)
            step = point.step
            logger.info("resumed from %s at step %d", point.tag, step)
        tracker = run_setup.start_tracking(self.config_dict, self.run_dir, self.config.tracking, point, self.rank,
                                           compatibility_hash(self.config))
        loop = TokenizerLoop(self.config, self.run_dir, self.rank, self.world, generator, critic, perceptual, loader,
                             val_loader, tracker, self.stop, lock, device)
        if point is not None:
            loop.restore(point.run_state, rank_state)
        tracker.set_tags({"mvar_dist.world_size": self.world, "mvar_dist.kind": "tokenizer",
                          "mvar_dist.start_step": step})
        rng = rank_state["rng"] if rank_state is not None else None
        seed = self.config.run.seed * 1000 + self.rank + 1
        return run_setup.run_loop(loop, step, tracker, self.stop, rng, seed, device)
