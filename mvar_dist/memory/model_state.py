"""Model-state memory of one rank under DeepSpeed ZeRO 1, 2 and 3: parameters, gradients, the
optimizer's fp32 master weights and Adam moments, DeepSpeed's buffers, and the checkpoint files.

Computed from the exact parameter layout (the model built on the meta device, split into the
trainer's two AdamW groups) and the ZeRO settings of the DeepSpeed JSON, following what
DeepSpeed (0.19) allocates rather than a rule of thumb; tests/test_plan.py compares every figure
with the tensors of a real 2-rank engine on CPU. What DeepSpeed keeps, per rank of ``w``, for a
parameter group of N elements (``b`` = 2 bytes in bf16/fp16, 4 in fp32):

ZeRO 1 and 2 (``DeepSpeedZeroOptimizer``): the module's weights as one flat tensor of the group,
padded to a multiple of 2 x w elements (b x N, on every rank); the rank's partition P = padded
N / w of fp32 master weights (4 P, also in fp32 mode: a separate copy) and Adam's two moments
(8 P, plus a 4-byte step counter per group). Gradients: ZeRO-2 keeps, from the first backward
of a step to the optimizer step, the gradients of every parameter that overlaps the rank's
partition (whole parameters, so a little more than P); ZeRO-1 keeps full gradients (b x N) in
``param.grad`` between micro-batches and reduces them into that same partition buffer at the
last one. Every backward stages gradients in a reduce bucket of ``reduce_bucket_size`` elements
(two with ``overlap_comm``); under ZeRO-1 it stays allocated between micro-batches. The
optimizer step converts one group's gradient partition to fp32 (4 P) and torch's AdamW makes
two temporaries of that size (``exp_avg_sq.sqrt() / c``). The updated weights are gathered in
place (``all_gather_into_tensor``), so ``allgather_bucket_size`` allocates nothing.

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): each parameter is split into ceil(n / w) elements
per rank (b x P), except parameters of at most ``stage3_param_persistence_threshold`` elements,
which every rank keeps whole; the same fp32 master weights and moments over P; a gradient
partition buffer (b x P) and one reduce bucket, both allocated when the engine starts. During
forward and backward the weights being used are gathered: an estimate, one transformer block
plus ``stage3_prefetch_bucket_size`` elements. Offload (``offload_optimizer`` /
``offload_param``) moves the master weights, the moments, the gradient partition and a
persistent fp32 copy of it (4 P), respectively the parameter partitions, to host memory (the
templates offload only under ZeRO-3; ZeRO-1/2 offload follows DeepSpeed's code, untested).

Checkpoint files: every rank writes its optimizer partition (fp32 master weights and both
moments, 12 P); under ZeRO-1/2 rank 0 also writes the module's weights (b x N), under ZeRO-3 the
per-rank module files hold no weights. Pickle framing adds a few KiB per file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# DeepSpeed's defaults (DeepSpeedZeroConfig) for keys a template leaves out; tests/test_plan.py
# checks them against the installed DeepSpeed
DEFAULTS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": sys.maxsize,
}
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_ALIGNMENT = 2  # ZeRO-1/2 pad each group to a multiple of this x world size (nccl_start_alignment_factor)
FP32 = 4
ADAM_STEP_BYTES = 4  # torch AdamW's per-parameter step counter: one fp32 scalar per flat group


@dataclass(frozen=True)
class ZeroSetup:
    """The ZeRO settings of a DeepSpeed JSON that decide what a rank holds."""

    stage: int
    precision: str
    reduce_bucket_size: int = DEFAULTS["reduce_bucket_size"]
    allgather_bucket_size: int = DEFAULTS["allgather_bucket_size"]
    prefetch_bucket_size: int = DEFAULTS["stage3_prefetch_bucket_size"]
    persistence_threshold: int = DEFAULTS["stage3_param_persistence_threshold"]
    model_persistence_threshold: int = DEFAULTS["stage3_model_persistence_threshold"]
    overlap_comm: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False

    @classmethod
    def from_deepspeed(cls, ds: Mapping[str, Any], precision: str) -> ZeroSetup:
        """From a DeepSpeed JSON (a template): its ``zero_optimization`` section."""
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        if precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {precision!r}")

        def number(key: str) -> int:
            return int(zero.get(key, DEFAULTS[key]))

        def offloaded(key: str) -> bool:
            section = zero.get(key)
            return isinstance(section, dict) and section.get("device", "none") not in ("none", None)

        overlap = zero.get("overlap_comm")
        return cls(
            stage=stage, precision=precision, reduce_bucket_size=number("reduce_bucket_size"),
            allgather_bucket_size=number("allgather_bucket_size"),
            prefetch_bucket_size=number("stage3_prefetch_bucket_size"),
            persistence_threshold=number("stage3_param_persistence_threshold"),
            model_persistence_threshold=number("stage3_model_persistence_threshold"),
            # DeepSpeed's dynamic default: on for stage 3 only
            overlap_comm=bool(stage == 3 if overlap is None else overlap),
            offload_optimizer=offloaded("offload_optimizer"), offload_param=stage == 3 and offloaded("offload_param"),
        )

    @property
    def bytes_per_value(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def name(self) -> str:
        if self.offload_optimizer or self.offload_param:
            return f"ZeRO-{self.stage}+offload" + ("" if self.offload_optimizer else "(params)")
        return f"ZeRO-{self.stage}"


@dataclass(frozen=True)
class ParamLayout:
    """The element counts of every parameter, per optimizer group, in the order DeepSpeed
    flattens them, and the largest transformer block (what ZeRO-3 gathers at once)."""

    groups: tuple[tuple[int, ...], ...]
    largest_block: int = 0

    @property
    def total(self) -> int:
        return sum(sum(group) for group in self.groups)

    @classmethod
    def of_model(cls, model: torch.nn.Module, groups: Sequence[Mapping[str, Any]]) -> ParamLayout:
        """From a model (meta is fine) and its optimizer's parameter groups."""
        blocks = getattr(model, "blocks", ())
        largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
        return cls(tuple(tuple(int(p.numel()) for p in group["params"]) for group in groups if group["params"]), largest)


@dataclass(frozen=True)
class ModelState:
    """Bytes one rank holds for the model under one ZeRO setup (device memory; ``host``: offloaded).

    Between steps: ``parameters`` + ``master_weights`` + ``adam_states`` + ``persistent_buffers``.
    ``gradients``: held from the first backward of a step to its optimizer step (between
    micro-batches); ``boundary_gradients``: extra while the last backward reduces them (ZeRO-1's
    partition buffer beside the full gradients). ``backward_buffers``: transient in each backward
    (reduce buckets; ZeRO-3's gathered weights, an estimate). ``step_buffers``: transient in the
    optimizer step (one group's fp32 gradients and AdamW's two temporaries)."""

    setup: ZeroSetup
    world_size: int
    parameters: int
    master_weights: int
    adam_states: int
    gradients: int
    boundary_gradients: int
    persistent_buffers: int
    backward_buffers: int
    step_buffers: int
    host: dict[str, int] = field(default_factory=dict)
    partitions: tuple[int, ...] = ()  # elements of each optimizer group on one rank
    checkpoint_rank0: int = 0  # DeepSpeed's files of rank 0 (the largest): optimizer partition + module weights
    checkpoint_total: int = 0  # all ranks' files of one checkpoint

    @property
    def optimizer(self) -> int:
        return self.master_weights + self.adam_states

    @property
    def between_steps(self) -> int:
        return self.parameters + self.optimizer + self.persistent_buffers

    @property
    def backward_peak(self) -> int:
        """Model state at the worst moment of a backward (activations not included)."""
        return self.between_steps + self.gradients + self.boundary_gradients + self.backward_buffers

    @property
    def step_peak(self) -> int:
        return self.between_steps + self.gradients + self.step_buffers

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "setup"}
        out.update(setup=asdict(self.setup), name=self.setup.name, optimizer=self.optimizer,
                   between_steps=self.between_steps, backward_peak=self.backward_peak, step_peak=self.step_peak,
                   host_total=self.host_total)
        return out


def model_state(layout: ParamLayout, setup: ZeroSetup, world_size: int) -> ModelState:
    """What one rank holds (the rank holding the most, where ranks differ) for ``layout`` under
    ``setup`` on ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if setup.stage == 3:
        return _stage3(layout, setup, world_size)
    return _stage12(layout, setup, world_size)


def _stage12(layout: ParamLayout, setup: ZeroSetup, w: int) -> ModelState:
    b = setup.bytes_per_value
    padded = [math.ceil(sum(group) / (_ALIGNMENT * w)) * _ALIGNMENT * w for group in layout.groups]
    partitions = [p // w for p in padded]
    partition = sum(partitions)
    # whole parameters overlapping the rank's partition: the gradient buffer DeepSpeed allocates
    overlapping = max(sum(_overlapping(group, part, rank) for group, part in zip(layout.groups, partitions))
                      for rank in range(w))
    bucket = b * setup.reduce_bucket_size * (2 if setup.overlap_comm else 1)
    params = b * sum(padded)
    master, adam = FP32 * partition, 2 * FP32 * partition + ADAM_STEP_BYTES * len(partitions)
    step = (FP32 + 2 * FP32) * max(partitions)  # one group at a time: fp32 gradients + 2 AdamW temporaries
    host: dict[str, int] = {}
    if setup.stage == 1:
        # full gradients in param.grad between micro-batches (the bucket stays allocated too); the
        # last backward reduces them into the partition buffer
        gradients, boundary = b * layout.total, b * overlapping
    else:
        gradients, boundary = b * overlapping, 0
    if setup.offload_optimizer:  # master, moments and the reduced gradients (fp32) live on the host
        host = {"master_weights": master, "adam_states": adam, "fp32_gradients": FP32 * partition}
        master = adam = step = boundary = 0
        if setup.stage == 2:
            gradients = 0
    rank0_files = 3 * FP32 * partition + b * layout.total  # optimizer partition + the module's weights
    total_files = 3 * FP32 * partition * w + b * layout.total
    return ModelState(setup, w, params, master, adam, gradients, boundary, 0, bucket, step, host, tuple(partitions),
                      rank0_files, total_files)


def _stage3(layout: ParamLayout, setup: ZeroSetup, w: int) -> ModelState:
    b = setup.bytes_per_value
    partitions = [sum(math.ceil(n / w) for n in group) for group in layout.groups]
    partition = sum(partitions)
    persistent_numel, budget = 0, setup.model_persistence_threshold // w
    for n in (n for group in layout.groups for n in group):
        if n <= setup.persistence_threshold and persistent_numel + n <= budget:
            persistent_numel += n
    gathered = min(layout.total - persistent_numel, setup.prefetch_bucket_size + layout.largest_block)
    bucket = b * setup.reduce_bucket_size  # one per gradient dtype, allocated at start
    params = b * partition + b * persistent_numel
    master, adam = FP32 * partition, 2 * FP32 * partition + ADAM_STEP_BYTES * len(partitions)
    gradients = b * partition
    step = (FP32 + 2 * FP32) * max(partitions)
    host: dict[str, int] = {}
    if setup.offload_optimizer:
        host = {"master_weights": master, "adam_states": adam, "gradients": gradients, "fp32_gradients": FP32 * partition}
        master = adam = gradients = step = 0
    if setup.offload_param:
        host["parameters"] = b * partition
        params -= b * partition
    files = 3 * FP32 * partition  # the optimizer partition (the module file of each rank holds no weights)
    return ModelState(setup, w, params, master, adam, gradients, 0, bucket, b * gathered, step, host, tuple(partitions),
                      files, files * w)


def _overlapping(numels: Sequence[int], partition: int, rank: int) -> int:
    """Elements of the parameters that overlap [rank x partition, (rank + 1) x partition)."""
    begin, end, offset, total = rank * partition, (rank + 1) * partition, 0, 0
    for n in numels:
        if offset < end and offset + n > begin:
            total += n
        offset += n
    return total
