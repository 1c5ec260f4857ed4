"""Fused 2-D neighbourhood attention in Triton: flash-style forward, deterministic backward.

Tensors are (batch, heads, H*W, head_dim) in raster order. A tile of BLOCK_M consecutive query
tokens spans a few grid rows; since window starts are monotone in the row, those rows reach one
contiguous band of key rows, and the kernels loop over that band only. Every score is then masked
by the exact per-query window (see kernels/reference.py for the rule).

Backward follows FlashAttention-2 without atomics: delta = rowsum(dO * O), one kernel per key
tile accumulates dK, dV over the query rows that can reach it, one kernel per query tile
accumulates dQ. Probabilities are recomputed from the saved natural-log log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels may only read globals that are constexpr.
KERNEL_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535  # CUDA limit of the launch grid's second axis, which indexes (batch, head)


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16, as tl.dot needs) and warps per program."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {size}")


def default_block_sizes(head_dim: int, backward: bool = False) -> BlockSizes:
    # Chosen so no kernel spills registers on sm_90 (ptxas resource usage, bf16): the backward
    # kernels hold two fp32 accumulators and need 8 warps, and half-height query tiles at d=128.
    if backward:
        return BlockSizes(block_m=32 if head_dim > 64 else 64, block_n=64, num_warps=8)
    return BlockSizes(num_warps=8 if head_dim > 64 else 4)


@triton.jit
def _window_start(coord, length, KERNEL: tl.constexpr):
    return tl.minimum(tl.maximum(coord - KERNEL // 2, 0), length - KERNEL)


@triton.jit
def _in_window(query_tokens, key_tokens, height, width, KERNEL: tl.constexpr):
    """Exact na2d window test; pass (M, 1) queries and (1, N) keys or the transpose of that."""
    row_start = _window_start(query_tokens // width, height, KERNEL)
    col_start = _window_start(query_tokens % width, width, KERNEL)
    key_row = key_tokens // width
    key_col = key_tokens % width
    rows_ok = (key_row >= row_start) & (key_row < row_start + KERNEL)
    cols_ok = (key_col >= col_start) & (key_col < col_start + KERNEL)
    return rows_ok & cols_ok


@triton.jit
def _load_rows(base, tokens, stride, valid, head_dim, BLOCK_D: tl.constexpr):
    """(len(tokens), BLOCK_D) rows of one (N, head_dim) matrix; zeros past the grid or head_dim."""
    dims = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (dims[None, :] < head_dim)
    return tl.load(base + tokens[:, None] * stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, tokens, stride, valid, head_dim, value, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (dims[None, :] < head_dim)
    tl.store(base + tokens[:, None] * stride + dims[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _key_band(tile_start, num_tokens, height, width, BLOCK: tl.constexpr, KERNEL: tl.constexpr):
    """[lo, hi) key tokens reachable by the query tokens [tile_start, tile_start + BLOCK)."""
    first_row = tile_start // width
    last_row = tl.minimum(tile_start + BLOCK - 1, num_tokens - 1) // width
    lo = _window_start(first_row, height, KERNEL) * width
    hi = (_window_start(last_row, height, KERNEL) + KERNEL) * width
    return lo, hi


@triton.jit
def _query_band(tile_start, num_tokens, height, width, BLOCK: tl.constexpr, KERNEL: tl.constexpr):
    """[lo, hi) query tokens whose windows reach a key in [tile_start, tile_start + BLOCK)."""
    first_row = tile_start // width
    last_row = tl.minimum(tile_start + BLOCK - 1, num_tokens - 1) // width
    # Smallest query row whose window ends at or after first_row, largest whose window starts at
    # or before last_row (window starts are clamp(row - KERNEL // 2, 0, height - KERNEL)).
    needed_start = first_row - KERNEL + 1
    lo_row = tl.where(needed_start > 0, needed_start + KERNEL // 2, 0)
    hi_row = tl.where(last_row >= height - KERNEL, height - 1, last_row + KERNEL // 2)
    return lo_row * width, (hi_row + 1) * width


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    num_heads, height, width, head_dim, scale_log2,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_start = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    num_tokens = height * width
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    Out += batch * stride_ob + head * stride_oh
    Lse += batch_head.to(tl.int64) * num_tokens

    offs_m = tile_start + tl.arange(0, BLOCK_M)
    query_ok = offs_m < num_tokens
    q = _load_rows(Q, offs_m, stride_qn, query_ok, head_dim, BLOCK_D)

    # A finite start for the running max keeps exp2(m_old - m_new) finite while a row has seen
    # only masked (-inf) scores.
    row_max = tl.full([BLOCK_M], -1.0e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_lo, kv_hi = _key_band(tile_start, num_tokens, height, width, BLOCK_M, KERNEL)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = kv_start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < kv_hi
        k = _load_rows(K, offs_n, stride_kn, key_ok, head_dim, BLOCK_D)
        v = _load_rows(V, offs_n, stride_vn, key_ok, head_dim, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = _in_window(offs_m[:, None], offs_n[None, :], height, width, KERNEL) & key_ok[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    # Padding rows past the grid may have seen no key; keep them finite (they are not stored).
    row_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    out = acc / row_sum[:, None]
    _store_rows(Out, offs_m, stride_on, query_ok, head_dim, out, BLOCK_D)
    lse = (row_max + tl.log2(row_sum)) / KERNEL_LOG2E
    tl.store(Lse + offs_m, lse, mask=query_ok)


@triton.jit
def _delta_kernel(
    Out, DOut, Delta, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
    num_heads, num_tokens, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, the softmax-backward correction term."""
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_m < num_tokens
    out = _load_rows(Out + batch * stride_ob + head * stride_oh, offs_m, stride_on, valid, head_dim, BLOCK_D)
    grad = _load_rows(DOut + batch * stride_db + head * stride_dh, offs_m, stride_dn, valid, head_dim, BLOCK_D)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(Delta + batch_head.to(tl.int64) * num_tokens + offs_m, delta, mask=valid)


@triton.jit
def _backward_kv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
    num_heads, height, width, head_dim, scale, scale_log2,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key tile, summed over the query rows that can reach it (no atomics)."""
    tile_start = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    num_tokens = height * width
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DOut += batch * stride_db + head * stride_dh
    Lse += batch_head.to(tl.int64) * num_tokens
    Delta += batch_head.to(tl.int64) * num_tokens
    # dK and dV are allocated contiguous: (batch * heads, N, head_dim).
    DK += batch_head.to(tl.int64) * num_tokens * head_dim
    DV += batch_head.to(tl.int64) * num_tokens * head_dim

    offs_n = tile_start + tl.arange(0, BLOCK_N)
    key_ok = offs_n < num_tokens
    k = _load_rows(K, offs_n, stride_kn, key_ok, head_dim, BLOCK_D)
    v = _load_rows(V, offs_n, stride_vn, key_ok, head_dim, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_lo, q_hi = _query_band(tile_start, num_tokens, height, width, BLOCK_N, KERNEL)
    for q_start in range(q_lo, q_hi, BLOCK_M):
        offs_m = q_start + tl.arange(0, BLOCK_M)
        query_ok = offs_m < q_hi
        q = _load_rows(Q, offs_m, stride_qn, query_ok, head_dim, BLOCK_D)
        grad = _load_rows(DOut, offs_m, stride_dn, query_ok, head_dim, BLOCK_D)
        lse_log2 = tl.load(Lse + offs_m, mask=query_ok, other=0.0) * KERNEL_LOG2E
        delta = tl.load(Delta + offs_m, mask=query_ok, other=0.0)
        # Work on transposed (keys x queries) blocks so dK, dV come out of plain dots.
        scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
        allowed_t = _in_window(offs_m[None, :], offs_n[:, None], height, width, KERNEL)
        allowed_t = allowed_t & query_ok[None, :] & key_ok[:, None]
        probs_t = tl.where(allowed_t, tl.exp2(scores_t - lse_log2[None, :]), 0.0)
        dv += tl.dot(probs_t.to(grad.dtype), grad, input_precision=PRECISION)
        dprobs_t = tl.dot(v, tl.trans(grad), input_precision=PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=PRECISION)

    _store_rows(DK, offs_n, head_dim, key_ok, head_dim, dk * scale, BLOCK_D)
    _store_rows(DV, offs_n, head_dim, key_ok, head_dim, dv, BLOCK_D)


@triton.jit
def _backward_q_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
    num_heads, height, width, head_dim, scale, scale_log2,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one query tile over its key band."""
    tile_start = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    num_tokens = height * width
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DOut += batch * stride_db + head * stride_dh
    Lse += batch_head.to(tl.int64) * num_tokens
    Delta += batch_head.to(tl.int64) * num_tokens
    DQ += batch_head.to(tl.int64) * num_tokens * head_dim

    offs_m = tile_start + tl.arange(0, BLOCK_M)
    query_ok = offs_m < num_tokens
    q = _load_rows(Q, offs_m, stride_qn, query_ok, head_dim, BLOCK_D)
    grad = _load_rows(DOut, offs_m, stride_dn, query_ok, head_dim, BLOCK_D)
    lse_log2 = tl.load(Lse + offs_m, mask=query_ok, other=0.0) * KERNEL_LOG2E
    delta = tl.load(Delta + offs_m, mask=query_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_lo, kv_hi = _key_band(tile_start, num_tokens, height, width, BLOCK_M, KERNEL)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = kv_start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < kv_hi
        k = _load_rows(K, offs_n, stride_kn, key_ok, head_dim, BLOCK_D)
        v = _load_rows(V, offs_n, stride_vn, key_ok, head_dim, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = _in_window(offs_m[:, None], offs_n[None, :], height, width, KERNEL) & key_ok[None, :] & query_ok[:, None]
        probs = tl.where(allowed, tl.exp2(scores - lse_log2[:, None]), 0.0)
        dprobs = tl.dot(grad, tl.trans(v), input_precision=PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)

    _store_rows(DQ, offs_m, head_dim, query_ok, head_dim, dq * scale, BLOCK_D)


def _check_triton_inputs(q: torch.Tensor, kernel_size: int) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton neighbourhood kernel supports fp16, bf16 and fp32, got {q.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton neighbourhood kernel supports head_dim 1..{MAX_HEAD_DIM}, got {q.shape[-1]}")
    # meta tensors carry shapes only (mvar_dist.memory counts what autograd saves): nothing runs
    if not q.is_cuda and not q.is_meta and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"the Triton neighbourhood kernel needs CUDA tensors (got {q.device}); use backend='torch' "
            "on CPU, or set TRITON_INTERPRET=1 before importing triton to run it in the interpreter"
        )


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_args(q: torch.Tensor, kernel_size: int, blocks: BlockSizes) -> dict:
    return dict(
        KERNEL=kernel_size, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        # tf32 would cost fp32 inputs ~1e-3 of accuracy; half inputs ignore the setting.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _batch_chunks(batch: int, heads: int) -> list[slice]:
    """Batch slices small enough that (batch * heads) fits the launch grid's second axis."""
    per_chunk = max(1, MAX_GRID_Y // heads)
    return [slice(start, min(start + per_chunk, batch)) for start in range(0, batch, per_chunk)]


def neighborhood_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int,
    scale: float, blocks: BlockSizes | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, h, N, d) and natural-log log-sum-exp (B, h, N) in fp32, without autograd."""
    _check_triton_inputs(q, kernel_size)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    blocks = blocks or default_block_sizes(q.shape[-1])
    batch, heads, num_tokens, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_tokens), dtype=torch.float32, device=q.device)
    if q.is_meta:  # shapes only: the outputs are allocated as on a GPU, no kernel is launched
        return out, lse
    for part in _batch_chunks(batch, heads):
        launch = (triton.cdiv(num_tokens, blocks.block_m), (part.stop - part.start) * heads)
        _forward_kernel[launch](
            q[part], k[part], v[part], out[part], lse[part],
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, grid[0], grid[1], head_dim, scale * LOG2E,
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **_launch_args(q, kernel_size, blocks),
        )
    return out, lse


def neighborhood_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, grid: tuple[int, int], kernel_size: int, scale: float, blocks: BlockSizes | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, input dtype); deterministic: every element is written by one program."""
    grad_out = _unit_last_stride(grad_out)
    blocks = blocks or default_block_sizes(q.shape[-1], backward=True)
    batch, heads, num_tokens, head_dim = q.shape
    args = _launch_args(q, kernel_size, blocks)
    delta = torch.empty_like(lse)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=v.dtype, device=q.device)
    if q.is_meta:  # shapes only, as in neighborhood_forward
        return dq, dk, dv
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    for part in _batch_chunks(batch, heads):
        programs = (part.stop - part.start) * heads
        _delta_kernel[(triton.cdiv(num_tokens, blocks.block_m), programs)](
            out[part], grad_out[part], delta[part], *_strides(out), *_strides(grad_out),
            heads, num_tokens, head_dim, BLOCK_M=blocks.block_m, BLOCK_D=args["BLOCK_D"],
            num_warps=blocks.num_warps,
        )
        inputs = (q[part], k[part], v[part], grad_out[part], lse[part], delta[part])
        common = (*strides, heads, grid[0], grid[1], head_dim, scale, scale * LOG2E)
        _backward_kv_kernel[(triton.cdiv(num_tokens, blocks.block_n), programs)](
            *inputs, dk[part], dv[part], *common, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **args,
        )
        _backward_q_kernel[(triton.cdiv(num_tokens, blocks.block_m), programs)](
            *inputs, dq[part], *common, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, **args,
        )
    return dq, dk, dv


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grid, kernel_size, scale, blocks):  # type: ignore[override]
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        out, lse = neighborhood_forward(q, k, v, grid, kernel_size, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grid, ctx.kernel_size, ctx.scale, ctx.blocks = grid, kernel_size, scale, blocks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = neighborhood_backward(
            grad_out, q, k, v, out, lse, ctx.grid, ctx.kernel_size, ctx.scale, ctx.blocks
        )
        return dq, dk, dv, None, None, None, None


def neighborhood_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], kernel_size: int,
    scale: float, blocks: BlockSizes | None = None,
) -> torch.Tensor:
    """Fused na2d (dilation 1, non-causal) with autograd; inputs validated by
    mvar_dist.attention.neighborhood_attention. ``blocks`` overrides the tile sizes."""
    _check_triton_inputs(q, kernel_size)
    return _NeighborhoodAttention.apply(
        q, k, v, (int(grid[0]), int(grid[1])), int(kernel_size), float(scale), blocks
    )
