"""Will an experiment fit on a cluster's GPUs, with which ZeRO stage and per-GPU batch?
(``mvar-dist plan``, docs/training.md, "Planning a run: mvar-dist plan").

Per rank and ZeRO setup (the project's templates zero1, zero2, zero3 and zero3_offload in the
experiment's precision, and the experiment's own JSON if it names one), the peak of a step is the
larger of two moments:

- a backward: model state (:mod:`mvar_dist.memory.model_state`: weights, gradients, optimizer,
  reduce buckets or ZeRO-3's gathered weights) + the activations autograd saved for the largest
  pass of the schedule (:func:`mvar_dist.memory.activations.activation_peak_bytes`, exact, with the
  experiment's activation checkpointing) + the logits and loss gradients of that pass: the
  logits the trainer keeps (model dtype) and the two fp32 gradients the loss's backward holds at
  once, (b + 8) bytes per token and vocabulary entry;
- the optimizer step: model state with the step's fp32 gradients and AdamW temporaries, and the
  last pass's logits.

Both include the frozen tokenizer's fp32 weights, which the trainer keeps on every GPU to turn
codes into the teacher input (the released VQVAE: 109M parameters, 416 MiB).

What the plan does not count (CUDA context, NCCL's buffers, the allocator's caching and
fragmentation, the gradients flowing between layers during backward) is what the reserve is for.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mvar_dist.config import ConfigError, ExperimentConfig
from mvar_dist.config.batch_split import (
    AUTO,
    BatchSplit,
    resolve_batch_split,
    split_for,
)
from mvar_dist.config.deepspeed_templates import read_template, resolve_template
from mvar_dist.memory.activations import (
    count_activations,
    pass_groups,
    resolve_attention_backend,
)
from mvar_dist.memory.model_state import (
    PRECISION_BYTES,
    ModelState,
    ParamLayout,
    ZeroSetup,
    model_state,
)
from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.tokenizer.factory import KINDS as TOKENIZER_KINDS
from mvar_dist.training.optimizer import param_groups

logger = logging.getLogger(__name__)

TEMPLATES = ("zero1", "zero2", "zero3", "zero3_offload")  # in the order the plan prefers them
DEFAULT_RESERVE_PERCENT = 10  # of a GPU's memory, for what the plan does not count
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_GRADIENT_BYTES = 8  # two fp32 (B, n, V) gradients at the start of the loss's backward
OFFLOAD_NOTE = ("DeepSpeed refuses torch's AdamW with offload_optimizer unless the DeepSpeed JSON sets "
                '"zero_force_ds_cpu_optimizer": false')


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    reserve: int  # bytes per GPU left for what the plan does not count
    write_bandwidth: float  # bytes/s into the run directory, all ranks together

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpu_memory <= 0 or not 0 <= self.reserve < self.gpu_memory:
            raise ValueError(f"the reserve ({self.reserve} bytes) must be below the GPU memory ({self.gpu_memory} bytes)")
        if self.write_bandwidth <= 0:
            raise ValueError(f"write bandwidth must be > 0, got {self.write_bandwidth}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def budget(self) -> int:
        return self.gpu_memory - self.reserve


@dataclass(frozen=True)
class PassMemory:
    """The largest pass of a step at one micro batch: what autograd saves (exact) and the logits."""

    scales: tuple[int, ...]
    tokens: int
    micro_batch: int
    activations: int  # saved for backward, peak while checkpointed blocks are recomputed
    logits: int  # the logits the trainer keeps: model dtype
    loss_gradients: int  # two fp32 gradients of the logits at the start of backward

    @property
    def backward(self) -> int:
        return self.activations + self.logits + self.loss_gradients


class PassCounter:
    """Counts passes on the meta device, once per (scales, micro batch)."""

    def __init__(self, model: MVARConfig, precision: str, checkpointing: int) -> None:
        self.model, self.precision, self.checkpointing = model, precision, checkpointing
        self.groups = pass_groups(model)
        self._cache: dict[tuple[tuple[int, ...], int], PassMemory] = {}

    def largest(self, micro_batch: int) -> PassMemory:
        return max((self.count(group, micro_batch) for group in self.groups), key=lambda p: p.backward)

    def count(self, scales: tuple[int, ...], micro_batch: int) -> PassMemory:
        key = (scales, micro_batch)
        if key not in self._cache:
            saved = count_activations(self.model, micro_batch, dtype=DTYPES[self.precision],
                                      checkpointing=self.checkpointing, scales=scales).peak_bytes
            tokens = sum(self.model.layout.scale_len(s) for s in scales)
            logit_values = micro_batch * tokens * self.model.vocab_size
            self._cache[key] = PassMemory(scales, tokens, micro_batch, saved, PRECISION_BYTES[self.precision] * logit_values,
                                          LOSS_GRADIENT_BYTES * logit_values)
        return self._cache[key]


@dataclass
class StagePlan:
    template: str  # a template name or the path of the experiment's JSON
    state: ModelState
    largest_micro_batch: int  # 0: not even one sample fits; capped at the rank's share of the global batch
    split: BatchSplit | None  # the recipe's split under this stage's limit; None: it does not fit
    at_split: PassMemory | None
    peak: int | None  # at the split's micro batch
    fixed: int = 0  # what every stage holds besides ZeRO's state: the tokenizer's weights
    configured: bool = False  # the experiment's deepspeed.template
    memory_split: BatchSplit | None = None  # with micro_batch_size auto: the split memory alone would allow
    notes: list[str] = field(default_factory=list)

    def peak_at(self, one_pass: PassMemory) -> int:
        return _peak(self.state, one_pass, self.fixed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template, "name": self.state.setup.name, "configured": self.configured,
            "model_state": self.state.to_dict(), "largest_micro_batch": self.largest_micro_batch,
            "split": None if self.split is None else dataclasses.asdict(self.split),
            "memory_split": None if self.memory_split is None else dataclasses.asdict(self.memory_split),
            "pass": None if self.at_split is None else {**dataclasses.asdict(self.at_split), "backward": self.at_split.backward},
            "peak": self.peak, "fits": self.split is not None, "notes": self.notes,
        }


@dataclass
class Plan:
    config_path: str
    cluster: Cluster
    model: MVARConfig
    parameters: int
    precision: str
    schedule: str
    checkpointing: int
    attention_backend: str
    tokenizer: int  # bytes of the frozen tokenizer's weights on every GPU
    global_batch: int
    recipe_split: BatchSplit  # the experiment's own split, memory aside
    per_sample: PassMemory  # the largest pass at micro batch 1
    stages: list[StagePlan]
    recommended: int | None  # index into stages; None: nothing fits

    @property
    def fits(self) -> bool:
        return self.recommended is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_path, "cluster": {**dataclasses.asdict(self.cluster), "world_size": self.cluster.world_size,
                                                    "budget": self.cluster.budget},
            "model": {"mode": self.model.mode, "depth": self.model.depth, "width": self.model.embed_dim,
                      "parameters": self.parameters},
            "precision": self.precision, "schedule": self.schedule, "activation_checkpointing": self.checkpointing,
            "attention_backend": self.attention_backend, "tokenizer": self.tokenizer, "global_batch": self.global_batch,
            "recipe_split": dataclasses.asdict(self.recipe_split),
            "per_sample": {**dataclasses.asdict(self.per_sample), "backward": self.per_sample.backward},
            "stages": [stage.to_dict() for stage in self.stages],
            "recommended": None if self.recommended is None else self.stages[self.recommended].template,
            "fits": self.fits,
        }


def param_layout(model_config: MVARConfig, weight_decay: float = 0.05) -> ParamLayout:
    """The exact parameter layout: the model built on the meta device, in the trainer's groups."""
    with torch.device("meta"):
        model = MVAR(model_config)
    return ParamLayout.of_model(model, param_groups(model, weight_decay))


def tokenizer_bytes(config: ExperimentConfig) -> int:
    """Bytes of the experiment's tokenizer weights (built on the meta device, fp32 as loaded)."""
    section = config.tokenizer
    try:
        with torch.device("meta"):
            tokenizer = TOKENIZER_KINDS[section.kind](**section.options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"tokenizer.options {section.options} do not fit the {section.kind} tokenizer: {error}") from None
    return sum(p.numel() * p.element_size() for p in [*tokenizer.parameters(), *tokenizer.buffers()])


def plan_run(config: ExperimentConfig, cluster: Cluster, config_path: str = "") -> Plan:
    """The plan of ``config`` on ``cluster``; ConfigError when the global batch cannot be split
    over its ranks (the message lists world sizes that work) or a template is unusable."""
    world, train = cluster.world_size, config.train
    recipe = train.batch_split(world)  # raises the batch-split error with its alternatives
    precision = config.deepspeed.precision
    layout = param_layout(config.model, config.optim.weight_decay)
    counter = PassCounter(config.model, precision, train.recompute_every)
    fixed = tokenizer_bytes(config)
    templates = list(TEMPLATES)
    if config.deepspeed.template not in templates:
        templates.append(config.deepspeed.template)
    configured = resolve_template(config.deepspeed.template, precision)
    stages = []
    for name in templates:
        ds = read_template(name, precision)
        setup = ZeroSetup.from_deepspeed(ds, precision)
        state = model_state(layout, setup, world)
        largest = _largest_micro_batch(state, counter, cluster.budget - fixed, recipe.global_batch // world)
        stage = StagePlan(name, state, largest, None, None, None, fixed, resolve_template(name, precision) == configured)
        if setup.offload_optimizer and ds.get("zero_force_ds_cpu_optimizer", True):
            stage.notes.append(OFFLOAD_NOTE)
        stage.split = _split_within(config, world, largest)
        if train.micro_batch_size == AUTO and largest:
            stage.memory_split = split_for(train.global_batch_size, world, AUTO, largest)
        if stage.split is not None:
            stage.at_split = counter.largest(stage.split.micro_batch)
            stage.peak = stage.peak_at(stage.at_split)
        stages.append(stage)
    fitting = [i for i, stage in enumerate(stages) if stage.split is not None]
    # fewest accumulation passes first (the recipe's split as closely as memory allows), then
    # the lowest stage (least communication), offload last
    recommended = min(fitting, key=lambda i: (stages[i].split.accumulation, i)) if fitting else None  # type: ignore[union-attr]
    backend = resolve_attention_backend(config.model.attention_backend, torch.device("meta"))
    logger.debug("plan on %d ranks: %s", world, [(s.template, s.largest_micro_batch, s.peak) for s in stages])
    return Plan(config_path, cluster, config.model, layout.total, precision, train.schedule if config.model.mode == "mvar" else "var",
                train.recompute_every, backend, fixed, train.global_batch_size, recipe, counter.largest(1), stages,
                recommended)


def _peak(state: ModelState, one_pass: PassMemory, fixed: int = 0) -> int:
    return fixed + max(state.backward_peak + one_pass.backward, state.step_peak + one_pass.logits)


def _largest_micro_batch(state: ModelState, counter: PassCounter, budget: int, cap: int) -> int:
    """The largest micro batch in 1..cap whose peak fits ``budget`` (0: none). Activations and
    logits grow (almost exactly) linearly with the batch: guess from the lines through batches
    1 and 2, then settle it with exact counts (bisecting from the guess)."""
    def fits(batch: int) -> bool:
        return _peak(state, counter.largest(batch)) <= budget

    if cap < 1 or not fits(1):
        return 0
    one, two = counter.largest(1), counter.largest(min(2, cap))
    guesses = [cap]
    for fixed, first, second in ((state.backward_peak, one.backward, two.backward), (state.step_peak, one.logits, two.logits)):
        slope = second - first
        if slope > 0:
            guesses.append(1 + (budget - fixed - first) // slope)
    guess = max(1, min(guesses))
    # bisect with fits(low) (low 0: none yet) and not fits(high) (high cap + 1: beyond the cap);
    # the guess is nearly exact, so its neighbour is probed first and usually settles it
    if fits(guess):
        low, high, probe = guess, cap + 1, guess + 1
    else:
        low, high, probe = 0, guess, guess - 1
    while high - low > 1:
        low, high = (probe, high) if fits(probe) else (low, probe)
        probe = (low + high) // 2
    return low


def _split_within(config: ExperimentConfig, world: int, largest: int) -> BatchSplit | None:
    """The experiment's split when at most ``largest`` samples fit per pass: ``auto`` takes the
    largest divisor of the rank's share within both limits; an explicit micro batch fits or not."""
    train = config.train
    if largest < 1:
        return None
    if train.micro_batch_size == AUTO:
        limit = min(largest, train.max_micro_batch_size or largest)
        return split_for(train.global_batch_size, world, AUTO, limit)
    try:
        split = resolve_batch_split(train.global_batch_size, train.micro_batch_size, world)
    except ConfigError:
        return None
    return split if split.micro_batch <= largest else None
