"""Every attention pattern of MVAR and VAR, behind one module.

- ``neighborhood_attention``: k x k window attention inside one scale (the spatial-Markov
  scales), dispatched to the fused Triton kernel on CUDA or the torch path elsewhere.
- ``AttentionPlan``: for one forward pass over a selection of scales, which tokens attend to
  which. ``markov`` plans are block-diagonal over scales (MVAR), with neighbourhood attention on
  scales >= refine_step; ``causal`` plans are block-causal over scales (VAR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from mvar_dist.kernels.reference import neighborhood_attention_torch
from mvar_dist.scales import ScaleLayout

Backend = Literal["auto", "triton", "torch"]
AttentionMode = Literal["markov", "causal"]


def _check_neighborhood_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, heads, H*W, head_dim), got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k and v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f"grid must be (H, W) with positive sides, got {grid}")
    height, width = int(grid[0]), int(grid[1])
    if q.shape[2] != height * width:
        raise ValueError(
            f"q has {q.shape[2]} tokens but grid {height}x{width} needs {height * width}"
        )
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    if kernel_size > min(height, width):
        raise ValueError(
            f"kernel_size {kernel_size} is larger than the {height}x{width} grid; "
            f"it must be <= min(H, W) = {min(height, width)}"
        )


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    kernel_size: int = 7,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """2-D neighbourhood attention with NATTEN's na2d semantics (dilation 1, non-causal).

    q, k, v: (batch, heads, H*W, head_dim) in raster order. Returns the same shape.
    """
    _check_neighborhood_inputs(q, k, v, grid, kernel_size)
    grid = (int(grid[0]), int(grid[1]))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    if use_triton:
        from mvar_dist.kernels.neighborhood import neighborhood_attention_triton

        return neighborhood_attention_triton(q, k, v, grid, kernel_size, scale)
    return neighborhood_attention_torch(q, k, v, grid, kernel_size, scale)


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens of one scale inside the tokens of a pass."""

    scale: int
    begin: int
    end: int
    grid: tuple[int, int]
    neighborhood: bool


class AttentionPlan:
    """Who attends to whom for one forward pass over ``scales`` (built once, used by every block)."""

    def __init__(
        self,
        layout: ScaleLayout,
        scales: Sequence[int],
        mode: AttentionMode,
        kernel_size: int,
        refine_step: int,
        backend: Backend = "auto",
    ) -> None:
        self.scales = layout.check_scales(scales)
        self.mode = mode
        self.kernel_size = kernel_size
        self.backend = backend
        if mode == "causal" and self.scales != tuple(range(len(self.scales))):
            raise ValueError(
                f"var (block-causal) mode needs a prefix of scales 0..s-1, got {list(self.scales)}"
            )
        if mode not in ("markov", "causal"):
            raise ValueError(f"attention mode must be 'markov' or 'causal', got {mode!r}")
        segments, begin = [], 0
        for s in self.scales:
            n = layout.scale_len(s)
            neighborhood = mode == "markov" and s >= refine_step and kernel_size < layout.patch_nums[s]
            segments.append(Segment(s, begin, begin + n, layout.grid(s), neighborhood))
            begin += n
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.num_tokens = begin
        # Neighbourhood scales are the largest ones, so the dense tokens always form a prefix;
        # they are attended with one masked SDPA (block-diagonal or block-causal).
        dense = [seg for seg in segments if not seg.neighborhood]
        self.dense_end = dense[-1].end if dense else 0
        self._dense_mask = self._build_dense_mask(dense) if dense else None
        self._mask_on_device: dict[torch.device, torch.Tensor | None] = {}

    def _build_dense_mask(self, dense: list[Segment]) -> torch.Tensor | None:
        if len(dense) == 1:
            return None  # one scale alone: plain dense attention
        ids = torch.cat([torch.full((seg.end - seg.begin,), seg.scale) for seg in dense])
        if self.mode == "causal":
            return ids[:, None] >= ids[None, :]
        return ids[:, None] == ids[None, :]

    def dense_mask(self, device: torch.device) -> torch.Tensor | None:
        if device not in self._mask_on_device:
            mask = self._dense_mask
            self._mask_on_device[device] = None if mask is None else mask.to(device)
        return self._mask_on_device[device]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v: (batch, heads, n, head_dim) for the n tokens of this plan's scales."""
        if q.shape[2] != self.num_tokens:
            raise ValueError(
                f"attention plan for scales {list(self.scales)} expects {self.num_tokens} tokens, "
                f"got {q.shape[2]}"
            )
        outputs = []
        if self.dense_end:
            dense = slice(0, self.dense_end)
            outputs.append(F.scaled_dot_product_attention(
                q[:, :, dense], k[:, :, dense], v[:, :, dense],
                attn_mask=self.dense_mask(q.device), scale=scale,
            ))
        for seg in self.segments:
            if seg.neighborhood:
                part = slice(seg.begin, seg.end)
                outputs.append(neighborhood_attention(
                    q[:, :, part], k[:, :, part], v[:, :, part],
                    grid=seg.grid, kernel_size=self.kernel_size, scale=scale, backend=self.backend,
                ))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
