"""Training MVAR or VAR (``mvar-dist train``): what this kind of training supplies to the run
skeleton of :mod:`mvar_dist.runtime.loop` (a :class:`~mvar_dist.runtime.task.TrainingTask`):
the code-shard loaders checked against the model and tokenizer, the transformer in a DeepSpeed
engine, one optimizer step (:func:`train_step`) with its metrics, and periodic validation and
sample grids (:mod:`mvar_dist.training.evaluation`).

Which scales a step trains is its schedule (:mod:`mvar_dist.training.schedule`): with ``all``,
scale groups (e.g. 0..7 | 8 | 9) run as separate forward/backward passes, so peak activation
memory is that of the largest group and the gradient is that of the full per-token loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mvar_dist.config import ConfigError, ExperimentConfig
from mvar_dist.model.released import load_released_weights
from mvar_dist.model.transformer import MVAR
from mvar_dist.runtime.checkpoint import Engines
from mvar_dist.runtime.loop import is_due
from mvar_dist.runtime.memory import peak_memory_mb
from mvar_dist.runtime.task import RankContext, StepOutcome
from mvar_dist.scales import ScaleLayout
from mvar_dist.tokenizer import Tokenizer, load_tokenizer
from mvar_dist.tracking import Tracker
from mvar_dist.training import evaluation
from mvar_dist.training.losses import ScaleStats, scale_metrics, token_loss
from mvar_dist.training.optimizer import build_engine, set_lr
from mvar_dist.training.sample_noise import sample_uniforms
from mvar_dist.training.schedule import step_groups

logger = logging.getLogger(__name__)


def build_tokenizer(config: ExperimentConfig, device: torch.device) -> Tokenizer:
    """The experiment's tokenizer (``tokenizer`` section); ConfigError naming the file if it fails."""
    section = config.tokenizer
    if section.checkpoint is None:
        raise ConfigError("tokenizer.checkpoint is required: the teacher input is computed from the codes with it")
    try:
        return load_tokenizer(section.checkpoint, section.kind, section.options, device)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"tokenizer.checkpoint {section.checkpoint}: {err}") from None


# ----- one optimizer step -----


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # sum over this rank's micro-batches of the (weighted) loss
    micro_batches: int
    nonfinite: bool
    images: int
    tokens: int
    data_wait: float


def train_step(
    engine: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    micro_batches: int,
    groups: list[tuple[int, ...]],
    stats: ScaleStats,
    label_smoothing: float,
    device: torch.device,
    poison: bool = False,
    noise_key: tuple[int, int] | None = None,
) -> StepResult:
    """Forward/backward every (micro-batch, scale group) pair; one optimizer step at the end.

    DeepSpeed is told the accumulation boundary explicitly: only the very last backward of the
    global batch is a boundary, so there is exactly one optimizer step (and one gradient
    reduction) per global batch however many groups and micro-batches there are. DeepSpeed
    divides each loss by gradient_accumulation_steps (= micro-batches), which averages over
    micro-batches; groups add up, giving the full loss. ``noise_key`` = (seed, step): draw label
    drop and drop-path per sample (:mod:`mvar_dist.training.sample_noise`); None: torch's RNG.
    """
    layout: ScaleLayout = model.layout
    num_tokens = layout.num_tokens
    dtype = next(model.parameters()).dtype
    result = StepResult(torch.zeros((), dtype=torch.float64, device=device), micro_batches, False, 0, 0, 0.0)
    total_passes, done = micro_batches * len(groups), 0
    for _ in range(micro_batches):
        wait = time.perf_counter()
        # the loader may draw from torch's global RNG (a DataLoader seeds its workers from it when
        # it starts, which a resumed run does at another step): keep it off the training stream
        with torch.random.fork_rng(devices=[]):
            codes, labels, ids = next(batches)
        codes, labels = codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        result.data_wait += time.perf_counter() - wait
        teacher = tokenizer.codes_to_teacher_input(codes).to(dtype)
        result.images += codes.shape[0]
        for number, group in enumerate(groups):
            done += 1
            engine.set_gradient_accumulation_boundary(done == total_passes)
            noise = None
            if noise_key is not None:
                columns = 1 + 2 * len(model.blocks)
                noise = sample_uniforms(noise_key[0], noise_key[1], ids, number, columns).to(device)
            logits = engine(labels, teacher, group, noise)
            targets = model.targets_for(codes, group)
            loss = token_loss(logits, targets, num_tokens, label_smoothing)
            if poison:  # testing hook: a non-finite loss whose gradients are non-finite too
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            stats.add(layout, group, logits.detach(), targets)
            result.loss_sum += loss.detach()
            result.tokens += targets.numel()
    result.nonfinite = not bool(torch.isfinite(result.loss_sum))
    return result


def reduce_step(
    result: StepResult, stats: ScaleStats, skipped_samples: int, step_time: float, peak_mb: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Two all-reduces per step (on the stats' device, as NCCL needs): sums (metrics, counts) and
    maxima (time, memory). Returns host tensors/floats."""
    device = stats.sums.device
    host = torch.tensor([result.micro_batches, float(result.nonfinite), result.images,
                         result.tokens, skipped_samples], dtype=torch.float64, device=device)
    sums = torch.cat([stats.sums.flatten(), result.loss_sum.reshape(1), host])
    maxima = torch.tensor([step_time, result.data_wait, peak_mb], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    sums, maxima = sums.cpu(), maxima.cpu()
    names = ("loss_sum", "micro_batches", "nonfinite_ranks", "images", "tokens", "skipped_samples")
    reduced = dict(zip(names, sums[-len(names):].tolist()))
    reduced.update(step_time=float(maxima[0]), data_wait=float(maxima[1]), peak_mb=float(maxima[2]))
    return sums[:-len(names)].view(-1, 3), reduced


# ----- the task -----


class TransformerTask:
    """MVAR (scale-Markov) or VAR (block-causal) on code shards; see docs/training.md."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.loader: Any = None
        self.val_loader: Any = None
        self.engine: Any = None
        self.model: MVAR | None = None
        self.context: RankContext | None = None
        self.fid: Any = None  # mvar_dist.training.fid.TrainingFID, loaded at the first FID

    # ----- before the first step -----

    def build_loader(self, rank: int, world_size: int) -> Any:
        """The train loader (and, with ``train.val_every_steps``, the validation loader), after
        checking that the shards were made with this tokenizer for this model."""
        from mvar_dist import data as data_lib
        from mvar_dist.shards.manifest import check_manifest_matches, check_same_classes

        self.tokenizer = build_tokenizer(self.config, torch.device("cpu"))
        model, batch = self.config.model, self.config.train.batch_split(world_size).micro_batch
        loaders = []
        try:
            loaders.append(data_lib.build_train_loader(self.config.data, rank=rank, world_size=world_size, batch_size=batch,
                                                       global_batch=self.config.train.global_batch_size))
            if self.config.train.val_every_steps > 0:
                loaders.append(data_lib.build_val_loader(self.config.data, rank=rank, world_size=world_size, batch_size=batch))
            for loader in loaders:
                check_manifest_matches(loader.manifest, model.patch_nums, model.vocab_size, self.tokenizer.identity())
            if len(loaders) > 1:  # class indices are positions in the class list: it must be the same
                check_same_classes(loaders[0].manifest, loaders[1].manifest)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from None
        for loader in loaders:
            if int(loader.manifest.num_classes) > model.num_classes:
                raise ConfigError(
                    f"data: {loader.manifest.location} has {loader.manifest.num_classes} classes but "
                    f"model.num_classes is {model.num_classes}"
                )
        self.loader, self.val_loader = loaders[0], (loaders[1] if len(loaders) > 1 else None)
        return self.loader

    def build_engines(self, context: RankContext, resuming: bool) -> Engines:
        self.context = context
        assert self.tokenizer is not None, "build_loader() first"
        self.tokenizer = self.tokenizer.to(context.device)
        torch.manual_seed(self.config.run.seed)  # identical initial weights on every rank
        model = MVAR(self.config.model)
        model.set_activation_checkpointing(self.config.train.recompute_every)
        if self.config.train.compile:
            model.compile_blocks()
        if self.config.train.init_from and not resuming:
            try:
                load_released_weights(model, self.config.train.init_from)
            except ValueError as err:
                raise ConfigError(f"train.init_from: {err}") from None
        self.model = model
        self.engine = build_engine(model, self.config, context.world_size, context.resized_from is not None)
        return Engines(self.engine)

    def tags(self) -> dict[str, Any]:
        return {"mvar_dist.schedule": self.config.train.schedule if self.config.model.mode == "mvar" else "var"}

    def state_dict(self) -> dict[str, Any]:
        return {}  # the loader's position and the RNGs are the skeleton's; nothing else carries over

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ----- one step -----

    def train_step(self, step: int, batches: Iterator[Any]) -> StepOutcome:
        cfg, context = self.config, self.context
        assert context is not None and self.model is not None
        # from the step count, not from how many optimizer steps were applied: a step skipped for
        # non-finite gradients still moves the schedule (the run ends at total_steps)
        lr = set_lr(self.engine, cfg, step)
        start = time.perf_counter()
        stats = ScaleStats(len(cfg.model.patch_nums), context.device)
        poison = context.rank == 0 and step in cfg.debug.nonfinite_loss_steps
        result = train_step(
            self.engine, self.model, self.tokenizer, batches, self.engine.gradient_accumulation_steps(),
            step_groups(cfg, step), stats, cfg.train.label_smoothing, context.device, poison=poison,
            noise_key=(cfg.run.seed, step) if self.loader.per_sample_noise else None,
        )
        applied = bool(self.engine.was_step_applied())
        sums, reduced = reduce_step(result, stats, int(getattr(self.loader, "num_skipped", 0)),
                                    time.perf_counter() - start, peak_memory_mb(context.device))
        return StepOutcome(self.metrics(lr, sums, reduced, applied, step), applied)

    def metrics(self, lr: float, sums: torch.Tensor, reduced: dict[str, float], applied: bool,
                step: int) -> dict[str, float]:
        step_time = max(reduced["step_time"], 1e-9)
        metrics = {
            "train/loss": reduced["loss_sum"] / max(reduced["micro_batches"], 1),
            "train/images_seen": float(step * self.config.train.global_batch_size),
            "lr": lr,
            "images_per_s": reduced["images"] / step_time,
            "tokens_per_s": reduced["tokens"] / step_time,
            "step_time_s": reduced["step_time"],
            "data_wait_s": reduced["data_wait"],
            "peak_memory_mb": reduced["peak_mb"],
            "skipped_samples": reduced["skipped_samples"],
            "nonfinite_steps": float(self.engine.skipped_steps),  # checkpointed by DeepSpeed
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and applied:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({f"train/{k}": v for k, v in scale_metrics(sums).items()})
        return metrics

    # ----- evaluation -----

    def evaluation_due(self, step: int) -> bool:
        train, total = self.config.train, self.config.train.total_steps
        validation = self.val_loader is not None and is_due(train.val_every_steps, step, total)
        return (validation or is_due(self.config.sample.every_steps, step, total)
                or is_due(self.config.eval.fid_every_steps, step, total))

    def evaluate(self, step: int, tracker: Tracker) -> None:
        """Validation (every rank) and the sample grid (rank 0) when due; see mvar_dist.training.evaluation."""
        train, total, context = self.config.train, self.config.train.total_steps, self.context
        assert context is not None
        if self.val_loader is not None and is_due(train.val_every_steps, step, total):
            metrics = evaluation.validate(self.engine, self.model, self.tokenizer, self.val_loader,
                                          train.val_max_batches, context.device)
            tracker.log_metrics(metrics, step)
            logger.info("step %d: val/loss %.4f val/acc %.2f", step, metrics.get("val/loss", float("nan")),
                        metrics.get("val/acc", float("nan")))
        if is_due(self.config.sample.every_steps, step, total):
            evaluation.log_sample_grid(self.engine, self.model, self.tokenizer, self.config, tracker, step,
                                       context.rank, context.device)
        if is_due(self.config.eval.fid_every_steps, step, total):
            self.log_fid(step, tracker)

    def log_fid(self, step: int, tracker: Tracker) -> None:
        """FID of ``eval.fid_samples`` images (all ranks sample; rank 0 logs ``eval/fid_<samples>``)."""
        from mvar_dist.training.fid import TrainingFID, metric_name

        context = self.context
        assert context is not None
        if self.fid is None:
            self.fid = TrainingFID(self.config, context.device)
        started = time.perf_counter()
        value = self.fid.compute(self.engine, self.model, self.tokenizer, context.rank, context.world_size)
        if value is not None:
            tracker.log_metrics({metric_name(self.config): value}, step)
            logger.info("step %d: %s %.4f (%.1f s)", step, metric_name(self.config), value, time.perf_counter() - started)
