"""The Triton neighbourhood kernels under TRITON_INTERPRET=1 on CPU, against the torch path.

Triton only interprets kernels if TRITON_INTERPRET=1 was set before triton.language was first
imported (its own helpers such as tl.zeros are jit functions too), and other test files or
deepspeed may import triton first. So this file runs in its own process: in a normal pytest run,
``test_interpreter_suite_in_subprocess`` re-runs this file with TRITON_INTERPRET=1 and the
kernel tests below skip; inside that subprocess (or under ``TRITON_INTERPRET=1 pytest
tests/test_triton_kernel.py``) the kernel tests run and the launcher skips. bf16 is not tested
in the interpreter (its bf16 dots are wrong); the ``gpu`` tests at the end cover bf16, NATTEN and
determinism on a CUDA device (benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar_dist.attention import neighborhood_attention
from mvar_dist.kernels.reference import neighborhood_attention_lse, neighborhood_attention_torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
OUTPUT_TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.interpreter
@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter process")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpreter", __file__]
    result = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True,
                            text=True, timeout=1200)
    output = f"{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, f"interpreter tests failed:\n{output}"
    assert " passed" in result.stdout.strip().splitlines()[-1], output


@pytest.fixture(scope="module")
def interpreted():
    if not INTERPRETING:
        pytest.skip("runs in a TRITON_INTERPRET=1 subprocess (test_interpreter_suite_in_subprocess)")
    from mvar_dist.kernels import neighborhood

    return neighborhood


def random_qkv(grid, head_dim, heads, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, heads, grid[0] * grid[1], head_dim)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]


def torch_path_with_grads(q, k, v, grid, kernel_size, scale, grad_out):
    """fp32 torch path on the same (rounded) inputs: output and dq, dk, dv."""
    inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = neighborhood_attention_torch(*inputs, grid, kernel_size, scale)
    return out, torch.autograd.grad(out, inputs, grad_out.float())


# Every grid, kernel size and head_dim at least once, both dtypes, several tile sizes (small tiles
# make the key/query bands span many tiles and cut rows in the middle).
CASES = [
    # grid, kernel_size, head_dim, heads, dtype, (block_m, block_n)
    ((8, 8), 3, 16, 2, torch.float32, (16, 16)),
    ((8, 8), 7, 32, 1, torch.float16, None),
    ((13, 13), 5, 64, 1, torch.float32, None),
    ((13, 13), 7, 16, 2, torch.float16, (32, 16)),
    ((16, 16), 7, 64, 1, torch.float16, None),
    ((16, 16), 3, 32, 1, torch.float32, (16, 32)),
    ((13, 16), 5, 16, 1, torch.float32, None),
    ((13, 16), 4, 32, 1, torch.float16, (32, 32)),
    ((32, 32), 7, 16, 1, torch.float32, None),
    ((32, 32), 3, 64, 1, torch.float16, (128, 64)),
    ((7, 7), 7, 24, 1, torch.float32, None),  # dense window, head_dim padded to 32
]


@pytest.mark.interpreter
@pytest.mark.parametrize("grid,kernel_size,head_dim,heads,dtype,blocks", CASES, ids=str)
def test_triton_matches_torch_path(interpreted, grid, kernel_size, head_dim, heads, dtype, blocks):
    q, k, v = (x.requires_grad_() for x in random_qkv(grid, head_dim, heads, dtype))
    scale = head_dim ** -0.5
    block_sizes = interpreted.BlockSizes(*blocks) if blocks else None
    out = interpreted.neighborhood_attention_triton(q, k, v, grid, kernel_size, scale, block_sizes)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    ref_out, ref_grads = torch_path_with_grads(q, k, v, grid, kernel_size, scale, grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref_out, **OUTPUT_TOLERANCE[dtype])
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.dtype == dtype, f"d{name}"
        torch.testing.assert_close(grad.float(), ref_grad, **TOLERANCE[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpreter
def test_forward_lse_matches_torch(interpreted):
    grid = (13, 16)
    q, k, v = random_qkv(grid, 16, 2, torch.float32)
    out, lse = interpreted.neighborhood_forward(q, k, v, grid, 5, 0.3, interpreted.BlockSizes(32, 16))
    torch.testing.assert_close(lse, neighborhood_attention_lse(q, k, v, grid, 5, 0.3))
    torch.testing.assert_close(out, neighborhood_attention_torch(q, k, v, grid, 5, 0.3))


@pytest.mark.interpreter
def test_strided_inputs_through_dispatch(interpreted):
    """Slices of a longer sequence (as AttentionPlan passes them) via backend='triton'."""
    grid, extra = (8, 8), 5
    whole = [torch.randn(1, 2, extra + 64, 32, requires_grad=True) for _ in range(3)]
    q, k, v = (x[:, :, extra:] for x in whole)
    out = neighborhood_attention(q, k, v, grid, kernel_size=5, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), whole)
    ref = neighborhood_attention(q, k, v, grid, kernel_size=5, backend="torch")
    ref_grads = torch.autograd.grad(ref.square().sum(), whole)
    torch.testing.assert_close(out, ref)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
        assert grad[:, :, :extra].abs().max() == 0


@pytest.mark.interpreter
def test_batches_beyond_the_launch_grid_are_split(interpreted, monkeypatch):
    """More (batch, head) pairs than CUDA's grid y-limit are launched in batch chunks."""
    monkeypatch.setattr(interpreted, "MAX_GRID_Y", 2)
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 36, 16, generator=generator).requires_grad_() for _ in range(3))
    out = interpreted.neighborhood_attention_triton(q, k, v, (6, 6), 3, 0.25)
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads = torch_path_with_grads(q, k, v, (6, 6), 3, 0.25, grad_out)
    torch.testing.assert_close(out, ref_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.interpreter
def test_kernel_rejects_what_it_cannot_run(interpreted):
    q, k, v = random_qkv((4, 4), 160, 1, torch.float32)
    with pytest.raises(ValueError, match="head_dim 1..128"):
        interpreted.neighborhood_attention_triton(q, k, v, (4, 4), 3, 0.1)
    q, k, v = random_qkv((4, 4), 16, 1, torch.float64)
    with pytest.raises(ValueError, match="fp16, bf16 and fp32"):
        interpreted.neighborhood_attention_triton(q, k, v, (4, 4), 3, 0.1)
    with pytest.raises(ValueError, match="power of two >= 16"):
        interpreted.BlockSizes(block_m=48)



# ---- Without a GPU: compile every kernel for sm_90 (what the interpreter cannot check) ----

SM90_COMPILER = HAS_TRITON and (Path(importlib.util.find_spec("triton").origin).parent
                                / "backends" / "nvidia" / "bin" / "ptxas").exists()


def kernel_signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton type of every argument, by the naming convention of kernels/neighborhood.py."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name[0].isupper():
            signature[name] = f"*{dtype}"
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING or not SM90_COMPILER, reason="needs triton's bundled ptxas, not the interpreter")
@pytest.mark.parametrize("dtype,head_dim", [("bf16", 64), ("bf16", 128), ("fp16", 64)])
def test_kernels_compile_for_sm90(dtype, head_dim):
    """Lowers each kernel to a cubin for an H100 at the default tile sizes: catches the type,
    layout and constexpr errors that only compiled kernels hit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mvar_dist.kernels import neighborhood as nb

    forward, backward = nb.default_block_sizes(head_dim), nb.default_block_sizes(head_dim, backward=True)
    precision = "ieee" if dtype == "fp32" else "tf32"
    block_d = triton.next_power_of_2(head_dim)
    builds = [(nb._forward_kernel, forward), (nb._backward_kv_kernel, backward),
              (nb._backward_q_kernel, backward), (nb._delta_kernel, backward)]
    for kernel, blocks in builds:
        constexprs = dict(KERNEL=7, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=block_d,
                          PRECISION=precision)
        constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=kernel_signature(kernel, dtype, constexprs),
                           constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages))
        assert compiled.asm["cubin"], kernel.fn.__name__


# ---- On a CUDA device (benchmarks/gpu_check.sh): compiled kernels, bf16, NATTEN, determinism ----

needs_cuda = pytest.mark.skipif(
    INTERPRETING or not HAS_TRITON or not torch.cuda.is_available(), reason="needs a CUDA device and triton"
)
GPU_TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
                 torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def cuda_qkv(grid, head_dim, dtype, batch=2, heads=4, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, grid[0] * grid[1], head_dim)
    return [torch.randn(shape, generator=generator, device="cuda").to(dtype).requires_grad_() for _ in range(3)]


def assert_grads_close(grads, ref_grads, tolerance):
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **tolerance, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("grid,kernel_size,head_dim", [
    ((13, 13), 7, 64), ((16, 16), 7, 64), ((32, 32), 7, 128), ((13, 16), 5, 32), ((8, 8), 4, 16), ((9, 9), 9, 48),
])
def test_cuda_matches_torch_path(grid, kernel_size, head_dim, dtype):
    from mvar_dist.kernels.neighborhood import neighborhood_attention_triton

    q, k, v = cuda_qkv(grid, head_dim, dtype)
    scale = head_dim ** -0.5
    out = neighborhood_attention_triton(q, k, v, grid, kernel_size, scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads = torch_path_with_grads(q, k, v, grid, kernel_size, scale, grad_out)
    torch.testing.assert_close(out.float(), ref_out, **GPU_TOLERANCE[dtype])
    assert_grads_close(grads, ref_grads, GPU_TOLERANCE[dtype])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grid,kernel_size", [((13, 13), 7), ((16, 16), 7), ((13, 16), 5), ((32, 32), 7)])
def test_cuda_matches_natten(grid, kernel_size, dtype):
    from natten.functional import na2d

    from mvar_dist.kernels.neighborhood import neighborhood_attention_triton

    q, k, v = cuda_qkv(grid, 64, dtype)
    out = neighborhood_attention_triton(q, k, v, grid, kernel_size, 0.125)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    heads_last = [x.detach().unflatten(2, grid).permute(0, 2, 3, 1, 4).contiguous().requires_grad_() for x in (q, k, v)]
    ref = na2d(*heads_last, kernel_size=kernel_size, scale=0.125)
    ref_grads = torch.autograd.grad(ref, heads_last, grad_out.unflatten(2, grid).permute(0, 2, 3, 1, 4).contiguous())
    back = [g.permute(0, 3, 1, 2, 4).flatten(2, 3) for g in ref_grads]  # dv on 13x13 included
    torch.testing.assert_close(out.float(), ref.permute(0, 3, 1, 2, 4).flatten(2, 3).float(), **GPU_TOLERANCE[dtype])
    assert_grads_close(grads, back, GPU_TOLERANCE[dtype])


@pytest.mark.gpu
@needs_cuda
def test_cuda_backward_is_deterministic_at_training_size():
    from mvar_dist.kernels.neighborhood import neighborhood_attention_triton

    grid = (16, 16)
    q, k, v = cuda_qkv(grid, 64, torch.bfloat16, batch=64, heads=16)
    grad_out = torch.randn_like(q)
    runs = [torch.autograd.grad(neighborhood_attention_triton(q, k, v, grid, 7, 0.125), (q, k, v), grad_out)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
        assert torch.isfinite(first).all()
    out = neighborhood_attention_triton(q, k, v, grid, 7, 0.125)
    ref = neighborhood_attention_torch(q.detach()[:4], k.detach()[:4], v.detach()[:4], grid, 7, 0.125)
    torch.testing.assert_close(out[:4].float(), ref.float(), **GPU_TOLERANCE[torch.bfloat16])
