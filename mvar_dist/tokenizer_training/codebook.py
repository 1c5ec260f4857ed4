"""Codebook health while a tokenizer trains: which codes each scale uses (per step and as an
exponential average, the released ``quantize.ema_vocab_hit_SV``), perplexity, dead codes, and
restarting dead codes from the batch's residual vectors.

Counts are summed over ranks, so every rank holds the same statistics and takes the same
restart decision; the replacement vectors are gathered from every rank and drawn with a
generator seeded by the step, so the new codebook is the same everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CODEBOOK = "codebook"  # the key of the usage statistics in a tokenizer run's per-rank checkpoint state
CANDIDATES_PER_RANK = 256  # residual vectors each rank offers for restarting dead codes


class CodebookUsage:
    """Per-scale code statistics; state_dict/load_state_dict for exact resume."""

    def __init__(self, num_scales: int, vocab_size: int, decay: float, dead_threshold: float) -> None:
        self.decay, self.dead_threshold = decay, dead_threshold
        self.ema = torch.zeros(num_scales, vocab_size, dtype=torch.float64)  # hit rate per code, sums to 1 per scale
        self.steps = 0

    def update(self, counts: torch.Tensor) -> dict[str, float]:
        """``counts`` (S, V): this step's code hits, summed over ranks. Returns the step's metrics."""
        counts = counts.double().cpu()
        rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        # the first step sets the average: a zero start would call every code dead for a while
        self.ema = rates.clone() if self.steps == 0 else self.decay * self.ema + (1 - self.decay) * rates
        self.steps += 1
        vocab = counts.shape[1]
        used = (counts > 0).double().mean(dim=1)
        entropy = -(rates * rates.clamp(min=1e-12).log()).sum(dim=1)
        metrics = {f"codebook/usage/scale_{s}": float(used[s]) for s in range(counts.shape[0])}
        metrics.update({f"codebook/perplexity/scale_{s}": float(entropy[s].exp()) for s in range(counts.shape[0])})
        metrics["codebook/usage"] = float((counts.sum(dim=0) > 0).double().mean())
        metrics["codebook/dead_codes"] = float(self.dead().numel())
        metrics["codebook/perplexity_last_scale"] = float(entropy[-1].exp())
        metrics["codebook/vocab_size"] = float(vocab)
        return metrics

    def dead(self) -> torch.Tensor:
        """Codes no scale uses: average hit rate below dead_threshold x the uniform rate, everywhere."""
        uniform = 1.0 / self.ema.shape[1]
        return torch.nonzero(self.ema.max(dim=0).values < self.dead_threshold * uniform).flatten()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.steps = state["ema"].double().clone(), int(state["steps"])


def restart_dead_codes(engine: Any, usage: CodebookUsage, targets: list[torch.Tensor], step: int, seed: int) -> int:
    """Move every dead code onto a residual vector of this step's batches (all ranks', drawn
    alike everywhere) and clear its optimizer moments. Collective; returns how many moved."""
    dead = usage.dead()
    if dead.numel() == 0:
        return 0
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    pool = torch.cat(targets).detach().float()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    local = pool[torch.randint(0, pool.shape[0], (CANDIDATES_PER_RANK,), generator=generator)]
    if dist.is_initialized():  # every rank offers the same number of vectors, so all_gather fits
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.contiguous())
        local = torch.cat(gathered)
    chosen = local[torch.randint(0, local.shape[0], (dead.numel(),), generator=generator)]
    weight = engine.module.quantize.embedding.weight
    # ZeRO keeps its own fp32 copy of the parameter: change it there, or the next step undoes it
    full = safe_get_full_fp32_param(weight).clone()
    full[dead] = chosen.to(full)
    safe_set_full_fp32_param(weight, full)
    for name in ("exp_avg", "exp_avg_sq"):
        state = safe_get_full_optimizer_state(weight, name)
        if state is not None:
            state = state.clone()
            state[dead] = 0
            safe_set_full_optimizer_state(weight, state, name)
    usage.ema[:, dead] = 1.0 / usage.ema.shape[1]  # a fresh code gets a fair chance before it counts as dead
    logger.info("step %d: restarted %d dead codes from the batch's residuals", step, dead.numel())
    return int(dead.numel())
