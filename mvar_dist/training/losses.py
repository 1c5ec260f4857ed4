"""The transformer's loss (docs/semantics.md, section 4) and the per-scale statistics of a step
(loss and accuracy of every scale it trained), summed on the device and turned into metrics once
reduced over ranks."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mvar_dist.scales import ScaleLayout


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
