"""The torch neighbourhood-attention path against the na2d window rule, NATTEN and gradcheck."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mvar_dist.attention import neighborhood_attention
from mvar_dist.kernels import reference
from mvar_dist.kernels.reference import (
    neighborhood_attention_gather,
    neighborhood_attention_lse,
    neighborhood_attention_masked,
    neighborhood_attention_torch,
    neighborhood_attention_windowed,
)

FORMULATIONS = [
    neighborhood_attention_torch,
    neighborhood_attention_windowed,
    neighborhood_attention_masked,
    neighborhood_attention_gather,
]


def naive_neighborhood_attention(q, k, v, grid, kernel_size, scale):
    """One query at a time, window computed straight from the rule clamp(c - k//2, 0, n - k)."""
    height, width = grid
    out = torch.empty_like(q)
    for i in range(height):
        for j in range(width):
            top = min(max(i - kernel_size // 2, 0), height - kernel_size)
            left = min(max(j - kernel_size // 2, 0), width - kernel_size)
            keys = [(top + a) * width + left + b for a in range(kernel_size) for b in range(kernel_size)]
            scores = torch.einsum("bhd,bhkd->bhk", q[:, :, i * width + j], k[:, :, keys]) * scale
            out[:, :, i * width + j] = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v[:, :, keys])
    return out


def random_qkv(grid, head_dim=8, batch=2, heads=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, grid[0] * grid[1], head_dim)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("grid,kernel_size", [
    ((8, 8), 3), ((9, 9), 5), ((7, 7), 7), ((6, 11), 5), ((11, 6), 3), ((8, 8), 4), ((7, 10), 2),
])
@pytest.mark.parametrize("formulation", FORMULATIONS, ids=lambda f: f.__name__)
def test_formulations_match_naive_loop(formulation, grid, kernel_size):
    q, k, v = random_qkv(grid)
    expected = naive_neighborhood_attention(q, k, v, grid, kernel_size, 0.4)
    torch.testing.assert_close(formulation(q, k, v, grid, kernel_size, 0.4), expected, atol=1e-5, rtol=1e-5)


def test_kernel_equal_to_grid_is_dense_attention():
    q, k, v = random_qkv((6, 6))
    dense = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(neighborhood_attention_windowed(q, k, v, (6, 6), 6, 0.3), dense)


def test_windowed_lse_matches_dense_logsumexp():
    q, k, _ = random_qkv((5, 7))
    mask = reference.neighborhood_mask((5, 7), 3)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(neighborhood_attention_lse(q, k, None, (5, 7), 3, 0.5), scores.logsumexp(-1))


@pytest.mark.parametrize("grid,kernel_size", [((3, 4), 3), ((4, 3), 2)])
def test_windowed_gradcheck_float64(grid, kernel_size):
    q, k, v = (x.requires_grad_() for x in random_qkv(grid, head_dim=4, batch=1, heads=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b, c: neighborhood_attention_windowed(a, b, c, grid, kernel_size, 0.7), (q, k, v)
    )


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_windowed_gradients_match_gather(dtype, tolerance):
    grid = (13, 16)
    inputs = [x.to(dtype).requires_grad_() for x in random_qkv(grid, head_dim=16)]
    out = neighborhood_attention_windowed(*inputs, grid, 5, 0.25)
    assert out.dtype == dtype
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
    ref_out = neighborhood_attention_gather(*ref_inputs, grid, 5, 0.25)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.float())
    torch.testing.assert_close(out.float(), ref_out, atol=tolerance, rtol=tolerance)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), ref_grad, atol=tolerance, rtol=tolerance)


def test_torch_path_switches_to_windowed_above_budget(monkeypatch):
    q, k, v = random_qkv((9, 9))
    calls = []
    monkeypatch.setattr(reference, "DENSE_SCORE_BUDGET", 0)
    monkeypatch.setattr(reference, "neighborhood_attention_masked", lambda *a: calls.append(a))
    out = neighborhood_attention(q, k, v, (9, 9), kernel_size=3, scale=0.5, backend="torch")
    assert calls == []
    torch.testing.assert_close(out, naive_neighborhood_attention(q, k, v, (9, 9), 3, 0.5))


def test_dispatch_torch_backend_and_default_scale():
    q, k, v = random_qkv((8, 8), head_dim=16)
    out = neighborhood_attention(q, k, v, (8, 8), kernel_size=3)  # auto on CPU: torch path
    torch.testing.assert_close(out, naive_neighborhood_attention(q, k, v, (8, 8), 3, 16 ** -0.5))


def natten_na2d(q, k, v, grid, kernel_size, scale):
    """NATTEN 0.21 takes (batch, H, W, heads, head_dim)."""
    from natten.functional import na2d

    def to_natten(x):
        return x.unflatten(2, grid).permute(0, 2, 3, 1, 4)

    out = na2d(to_natten(q), to_natten(k), to_natten(v), kernel_size=kernel_size, scale=scale)
    return out.permute(0, 3, 1, 2, 4).flatten(2, 3)


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("grid,kernel_size", [((9, 7), 3), ((6, 10), 4)])
def test_torch_path_matches_natten_na2d(grid, kernel_size):
    q, k, v = random_qkv(grid, head_dim=16)
    expected = natten_na2d(q, k, v, grid, kernel_size, 0.3)
    for formulation in (neighborhood_attention_windowed, neighborhood_attention_masked):
        torch.testing.assert_close(formulation(q, k, v, grid, kernel_size, 0.3), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q, k, v, (8, 8), 9), "kernel_size 9 is larger than the 8x8 grid"),
    (lambda q, k, v: (q, k, v, (16, 4), 5), "it must be <= min\\(H, W\\) = 4"),
    (lambda q, k, v: (q[0], k[0], v[0], (8, 8), 3), "shape \\(batch, heads, H\\*W, head_dim\\)"),
    (lambda q, k, v: (q, k[:, :1], v, (8, 8), 3), "same shape"),
    (lambda q, k, v: (q, k, v, (8, 7), 3), "q has 64 tokens but grid 8x7 needs 56"),
    (lambda q, k, v: (q, k.half(), v, (8, 8), 3), "share one dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long(), (8, 8), 3), "floating point"),
    (lambda q, k, v: (q, k.to("meta"), v, (8, 8), 3), "on one device"),
    (lambda q, k, v: (q, k, v, (8, 8), 0), "kernel_size must be >= 1"),
    (lambda q, k, v: (q, k, v, (0, 8), 3), "positive sides"),
])
def test_bad_inputs_get_clear_errors(change, message):
    q, k, v, grid, kernel_size = change(*random_qkv((8, 8)))
    with pytest.raises(ValueError, match=message):
        neighborhood_attention(q, k, v, grid, kernel_size=kernel_size, backend="torch")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be"):
        neighborhood_attention(*random_qkv((4, 4)), (4, 4), kernel_size=3, backend="cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from mvar_dist.kernels import neighborhood

    if neighborhood.triton.knobs.runtime.interpret:
        pytest.skip("this process runs triton in interpreter mode")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        neighborhood_attention(*random_qkv((4, 4)), (4, 4), kernel_size=3, backend="triton")
