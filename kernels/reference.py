"""Torch reference of 2-D neighbourhood attention (NATTEN's na2d, dilation 1, non-causal).

Per axis of length n, the window of query coordinate q starts at clamp(q - k//2, 0, n - k) and
covers k positions; the 2-D window is the product of both axes, so every query sees k*k keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_starts(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(length,) start of each coordinate's window on one axis."""
    coords = torch.arange(length, device=device)
    return (coords - kernel_size // 2).clamp(0, length - kernel_size)


def neighbor_index(grid: tuple[int, int], kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, k*k) flat key positions each query attends to, in raster order of the window."""
    height, width = grid
    rows = window_starts(height, kernel_size, device)[:, None] + torch.arange(kernel_size, device=device)
    cols = window_starts(width, kernel_size, device)[:, None] + torch.arange(kernel_size, device=device)
    # (H, W, k, k): key (rows[i, a], cols[j, b]) for query (i, j)
    index = rows[:, None, :, None] * width + cols[None, :, None, :]
    return index.reshape(height * width, kernel_size * kernel_size)


def neighborhood_mask(grid: tuple[int, int], kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, H*W) boolean mask, True where a query may attend to a key."""
    n = grid[0] * grid[1]
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask.scatter_(1, neighbor_index(grid, kernel_size, device), True)
    return mask


def neighborhood_attention_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int, scale: float
) -> torch.Tensor:
    """Dense SDPA with the neighbourhood mask: O(N^2) memory, fine for small grids."""
    mask = neighborhood_mask(grid, kernel_size, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def neighborhood_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int, scale: float
) -> torch.Tensor:
    """Scores only for the k*k keys of each query: O(N k^2) scores instead of O(N^2)."""
    index = neighbor_index(grid, kernel_size, q.device)  # (N, K)
    keys = k[:, :, index]  # (B, h, N, K, d)
    values = v[:, :, index]
    scores = torch.einsum("bhnd,bhnkd->bhnk", q.float(), keys.float()) * scale
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhnk,bhnkd->bhnd", probs, values.float())
    return out.to(q.dtype)


def neighborhood_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int, scale: float
) -> torch.Tensor:
    """The torch path: whichever of the two formulations needs less memory for this grid."""
    n = grid[0] * grid[1]
    if n <= kernel_size * kernel_size * q.shape[-1]:
        return neighborhood_attention_masked(q, k, v, grid, kernel_size, scale)
    return neighborhood_attention_gather(q, k, v, grid, kernel_size, scale)
