"""Neighbourhood attention, side by side: fused Triton kernel, torch path, dense SDPA, masked SDPA,
FlexAttention with a neighbourhood block mask, NATTEN.

    python benchmarks/neighborhood_attention.py            # GPU: B=64 heads=16 d=64 bf16
    python benchmarks/neighborhood_attention.py --sweep    # also try Triton tile sizes

On CPU it runs the torch-side methods at a smaller size (and says so). Times are medians of
torch.utils.benchmark; GB/s counts the minimum traffic (fwd: read q, k, v, write o; fwd+bwd adds
reading q, k, v, o, dO and writing dq, dk, dv). The memory table reports peak bytes of one
forward+backward: CUDA allocator peak on GPU, peak RSS growth of a fresh process on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from mvar_dist.kernels.reference import (
    neighborhood_attention_torch,
    neighborhood_attention_windowed,
    neighborhood_mask,
)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flex_method(grid: tuple[int, int], kernel_size: int, device: torch.device) -> Attention | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    height, width = grid

    def in_window(batch, head, query, key):
        top = (query // width - kernel_size // 2).clamp(0, height - kernel_size)
        left = (query % width - kernel_size // 2).clamp(0, width - kernel_size)
        rows_ok = (key // width >= top) & (key // width < top + kernel_size)
        cols_ok = (key % width >= left) & (key % width < left + kernel_size)
        return rows_ok & cols_ok

    n = height * width
    block_mask = create_block_mask(in_window, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def natten_method(grid: tuple[int, int], kernel_size: int) -> Attention | None:
    if importlib.util.find_spec("natten") is None:
        return None
    from natten.functional import na2d

    # NATTEN wants (B, H, W, heads, d); the permute is part of what a caller of our layout pays.
    def natten(q, k, v):
        to_natten = [x.unflatten(2, grid).permute(0, 2, 3, 1, 4) for x in (q, k, v)]
        return na2d(*to_natten, kernel_size=kernel_size).permute(0, 3, 1, 2, 4).flatten(2, 3)

    return natten


def methods(grid, kernel_size, device, scale, blocks=None) -> dict[str, Attention | None]:
    found: dict[str, Attention | None] = {}
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from mvar_dist.kernels.neighborhood import neighborhood_attention_triton

        found["triton (fused)"] = lambda q, k, v: neighborhood_attention_triton(
            q, k, v, grid, kernel_size, scale, blocks)
    found["torch path"] = lambda q, k, v: neighborhood_attention_torch(q, k, v, grid, kernel_size, scale)
    found["torch windowed"] = lambda q, k, v: neighborhood_attention_windowed(q, k, v, grid, kernel_size, scale)
    found["dense SDPA (no mask)"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)
    found["masked SDPA"] = lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=neighborhood_mask(grid, kernel_size, device), scale=scale)
    # Compiled flex on CPU would cost minutes of compilation on a small machine; uncompiled flex
    # materialises the dense scores and says nothing about the fused kernel.
    found["flex (block mask)"] = flex_method(grid, kernel_size, device) if device.type == "cuda" else None
    found["natten na2d"] = natten_method(grid, kernel_size)
    return found


def median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # compile / warm up
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_method(attend: Attention, q, k, v, min_run_time: float) -> tuple[float, float | None, str]:
    """Median fwd ms, fwd+bwd ms (None if the method has no backward here), and a note."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward():
        torch.autograd.grad(attend(*leaves), leaves, grad_out)

    fwd = median_ms(forward, min_run_time)
    try:
        return fwd, median_ms(forward_backward, min_run_time), ""
    except (NotImplementedError, RuntimeError) as error:
        return fwd, None, f"no backward: {str(error)[:60]}"


def speed_lines(args, side: int, device: torch.device, dtype: torch.dtype, record: dict | None = None) -> list[str]:
    """Markdown table of every method on one side x side grid (rows also into ``record``)."""
    grid = (side, side)
    shape = (args.batch, args.heads, side * side, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    tensor_bytes = q.numel() * q.element_size()
    rows = []
    for name, attend in methods(grid, args.kernel_size, device, args.head_dim ** -0.5).items():
        if attend is None:
            rows.append((name, None, None, "not available"))
            continue
        try:
            rows.append((name, *time_method(attend, q, k, v, args.min_run_time)))
        except Exception as error:  # a method that cannot run here is reported, not fatal
            rows.append((name, None, None, f"failed: {type(error).__name__}: {str(error)[:80]}"))
    if record is not None:
        record[f"{side}x{side}"] = [{"method": n, "fwd_ms": f, "fwd_bwd_ms": fb, "note": note} for n, f, fb, note in rows]
    reference = next(r for r in rows if r[1] is not None and r[2] is not None)
    lines = [f"### {side}x{side} grid ({side * side} tokens); ratio = method time / {reference[0]} time",
             "", "| method | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | fwd ratio | fwd+bwd ratio | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, fwd, fwd_bwd, note in rows:
        cells = ["", "", "", "", "", ""]
        if fwd is not None:
            cells[0:2] = [f"{fwd:.3f}", f"{4 * tensor_bytes / fwd / 1e6:.3g}"]
            cells[4] = f"{fwd / reference[1]:.2f}x"
        if fwd_bwd is not None:
            cells[2:4] = [f"{fwd_bwd:.3f}", f"{12 * tensor_bytes / fwd_bwd / 1e6:.3g}"]
            cells[5] = f"{fwd_bwd / reference[2]:.2f}x"
        lines.append(f"| {name} | {' | '.join(cells)} | {note} |")
    return lines + [""]


def run_fwd_bwd(name: str, side: int, args, device: torch.device, dtype: torch.dtype) -> None:
    shape = (args.memory_batch, args.memory_heads, side * side, args.head_dim)
    leaves = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    attend = methods((side, side), args.kernel_size, device, args.head_dim ** -0.5)[name]
    torch.autograd.grad(attend(*leaves), leaves, torch.randn(shape, device=device, dtype=dtype))


def peak_bytes(name: str, side: int, args, device: torch.device, dtype: torch.dtype) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_fwd_bwd(name, side, args, device, dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # ru_maxrss only grows, so each CPU measurement gets a fresh process.
    command = [sys.executable, __file__, "--measure-rss", name, str(side), *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def measure_rss(name: str, side: int, args, dtype: torch.dtype) -> int:
    run_fwd_bwd(name, 8, args, torch.device("cpu"), dtype)  # warm up lazily loaded kernels
    try:  # reset the peak-RSS mark so import-time peaks do not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    with open("/proc/self/statm") as statm:
        resident_before = int(statm.read().split()[1]) * resource.getpagesize()
    run_fwd_bwd(name, side, args, torch.device("cpu"), dtype)
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return peak_kib * 1024 - resident_before


def memory_table(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    names = [n for n in ("triton (fused)", "torch path", "torch windowed", "dense SDPA (no mask)", "masked SDPA")
             if n != "triton (fused)" or device.type == "cuda"]
    how = "CUDA allocator peak" if device.type == "cuda" else "peak RSS growth of a fresh process"
    lines = [f"## Peak memory of one fwd+bwd ({how}), B={args.memory_batch} heads={args.memory_heads} "
             f"head_dim={args.head_dim} {dtype}", "",
             "| method | " + " | ".join(f"{s}x{s} MiB" for s in args.memory_grids) + " | growth "
             f"{args.memory_grids[0]}->{args.memory_grids[-1]} |", "|---|" + "---:|" * (len(args.memory_grids) + 1)]
    for name in names:
        peaks = [peak_bytes(name, side, args, device, dtype) for side in args.memory_grids]
        cells = " | ".join(f"{p / 2**20:.1f}" for p in peaks)
        lines.append(f"| {name} | {cells} | {peaks[-1] / max(peaks[0], 1):.0f}x |")
    tokens = [s * s for s in args.memory_grids]
    growth = tokens[-1] / tokens[0]
    lines += ["", f"(tokens grow {growth:.0f}x, so an N^2 score matrix grows {growth ** 2:.0f}x; measured growth "
              "also contains the O(N d) inputs, outputs and gradients, which dominate on small grids)", ""]
    return lines


def sweep_table(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    from mvar_dist.kernels.neighborhood import BlockSizes

    lines = ["## Triton tile sweep", "", "| grid | block_m | block_n | warps | stages | fwd ms | fwd+bwd ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for side in args.sweep_grids:
        shape = (args.batch, args.heads, side * side, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        for block_m, block_n, warps, stages in [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3),
                                                 (128, 32, 4, 2), (32, 64, 4, 2), (128, 128, 8, 2)]:
            blocks = BlockSizes(block_m, block_n, warps, stages)
            attend = methods((side, side), args.kernel_size, device, args.head_dim ** -0.5, blocks)
            try:
                fwd, fwd_bwd, _ = time_method(attend["triton (fused)"], q, k, v, args.min_run_time)
                lines.append(f"| {side}x{side} | {block_m} | {block_n} | {warps} | {stages} | {fwd:.3f} | {fwd_bwd:.3f} |")
            except Exception as error:
                lines.append(f"| {side}x{side} | {block_m} | {block_n} | {warps} | {stages} | failed: "
                             f"{type(error).__name__} | |")
    return lines + [""]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64 if cuda else 2)
    parser.add_argument("--heads", type=int, default=16 if cuda else 4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument("--grids", type=int, nargs="+", default=[13, 16, 32])
    parser.add_argument("--memory-grids", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--memory-batch", type=int, default=4 if cuda else 1)
    parser.add_argument("--memory-heads", type=int, default=16 if cuda else 2)
    parser.add_argument("--min-run-time", type=float, default=0.3 if cuda else 1.0, help="seconds per timing")
    parser.add_argument("--sweep", action="store_true", help="also time several Triton tile sizes (GPU)")
    parser.add_argument("--sweep-grids", type=int, nargs="+", default=[16])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the speed rows to this file")
    parser.add_argument("--measure-rss", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="torch.nn.attention.flex_attention")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.measure_rss:
        print(measure_rss(args.measure_rss[0], int(args.measure_rss[1]), args, dtype))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("**No GPU: CPU run at a smaller size; the Triton kernel and compiled FlexAttention are "
              "skipped (run on a GPU for the real comparison).**\n", flush=True)
    print(f"## Speed: B={args.batch} heads={args.heads} head_dim={args.head_dim} {dtype} "
          f"k={args.kernel_size} on {device_name(device)}\n", flush=True)
    record: dict = {"device": device_name(device), "dtype": str(dtype), "batch": args.batch, "heads": args.heads,
                    "head_dim": args.head_dim, "kernel_size": args.kernel_size, "speed": {}}
    for side in args.grids:  # printed grid by grid so partial results survive a timeout
        print("\n".join(speed_lines(args, side, device, dtype, record["speed"])), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
    if not args.skip_memory:
        print("\n".join(memory_table(args, device, dtype)), flush=True)
    if args.sweep and device.type == "cuda":
        print("\n".join(sweep_table(args, device, dtype)), flush=True)


if __name__ == "__main__":
    main()
