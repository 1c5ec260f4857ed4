"""One optimizer step: forward/backward of every (micro-batch, scale group) pair into one
accumulated gradient, the loss, per-scale statistics, the per-step all-reduce, stop signals.

Which scales a step trains is its schedule (:mod:`mvar_dist.training.schedule`): with ``all``,
scale groups (e.g. 0..7 | 8 | 9) run as separate micro-steps, so peak activation memory is that
of the largest group and the gradient is that of the full per-token loss.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mvar_dist.scales import ScaleLayout

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


# ----- loss and per-scale statistics -----


def token_loss(logits: torch.Tensor, targets: torch.Tensor, num_tokens: int, label_smoothing: float) -> torch.Tensor:
    """docs/semantics.md, section 4: CE per token weighted 1/L, summed over the pass's tokens, mean over the batch."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing)
    return ce * (targets.shape[1] / num_tokens)


class ScaleStats:
    """Per-scale sums (CE, correct tokens, tokens) of one rank for one step, kept on the
    device so that a step synchronises with the host once, in :func:`reduce_step`."""

    def __init__(self, num_scales: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(num_scales, 3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, layout: ScaleLayout, scales: Sequence[int], logits: torch.Tensor, targets: torch.Tensor) -> None:
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        correct = logits.argmax(-1) == targets
        begin = 0
        for s in scales:
            n = layout.scale_len(s)
            self.sums[s, 0] += ce[:, begin : begin + n].sum(dtype=torch.float64)
            self.sums[s, 1] += correct[:, begin : begin + n].sum(dtype=torch.float64)
            self.sums[s, 2] += targets.shape[0] * n
            begin += n


def scale_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Reduced (S, 3) sums -> loss/accuracy per scale, over all scales of the step, last scale."""
    out: dict[str, float] = {}
    present = sums[:, 2] > 0
    for s in torch.nonzero(present).flatten().tolist():
        out[f"loss/scale_{s}"] = float(sums[s, 0] / sums[s, 2])
        out[f"acc/scale_{s}"] = float(100 * sums[s, 1] / sums[s, 2])
    total = sums[present].sum(0)
    out["loss/mean"] = float(total[0] / total[2])
    out["acc/mean"] = float(100 * total[1] / total[2])
    last = sums.shape[0] - 1
    if present[last]:
        out["loss/last"] = out[f"loss/scale_{last}"]
        out["acc/last"] = out[f"acc/scale_{last}"]
    return out


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
) -> StepResult:
    """Forward/backward every (micro-batch, scale group) pair; one optimizer step at the end.

    DeepSpeed is told the accumulation boundary explicitly: only the very last backward of the
    global batch is a boundary, so there is exactly one optimizer step (and one gradient
    reduction) per global batch however many groups and micro-batches there are. DeepSpeed
    divides each loss by gradient_accumulation_steps (= micro-batches), which averages over
    micro-batches; groups add up, giving the full loss.
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
            codes, labels = next(batches)
        codes, labels = codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        result.data_wait += time.perf_counter() - wait
        teacher = tokenizer.codes_to_teacher_input(codes).to(dtype)
        result.images += codes.shape[0]
        for group in groups:
            done += 1
            engine.set_gradient_accumulation_boundary(done == total_passes)
            logits = engine(labels, teacher, group)
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


# ----- stopping on signals -----


class StopFlag:
    """Set by SIGTERM/SIGUSR2/SIGINT; ranks agree on stopping through the per-step all-reduce."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.requested = True
        self.signal_name = reason


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reduce_step(
    result: StepResult, stats: ScaleStats, stop: bool, skipped_samples: int, step_time: float, peak_mb: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Two all-reduces per step (on the stats' device, as NCCL needs): sums (metrics, agreement
    flags) and maxima (time, memory). Returns host tensors/floats."""
    device = stats.sums.device
    host = torch.tensor([result.micro_batches, float(result.nonfinite), float(stop), result.images,
                         result.tokens, skipped_samples], dtype=torch.float64, device=device)
    sums = torch.cat([stats.sums.flatten(), result.loss_sum.reshape(1), host])
    maxima = torch.tensor([step_time, result.data_wait, peak_mb], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    sums, maxima = sums.cpu(), maxima.cpu()
    scalars = sums[-7:].tolist()
    names = ("loss_sum", "micro_batches", "nonfinite_ranks", "stop_ranks", "images", "tokens", "skipped_samples")
    reduced = dict(zip(names, scalars))
    reduced.update(step_time=float(maxima[0]), data_wait=float(maxima[1]), peak_mb=float(maxima[2]))
    return sums[:-7].view(-1, 3), reduced
