"""Exact activation memory of VAR and MVAR training passes: the bytes autograd saves for backward.

Counted by ``mvar_dist.memory.count_activations`` on the meta device (nothing is computed, so
the paper's shapes take seconds and no GPU): one training forward with the trainer's loss,
every saved tensor's storage counted once, parameters excluded. The same command prints the
same bytes on any machine (the run time goes to stderr, so stdout is byte-identical).

Per depth, one row per pass a step can run, at the published layout (10 scales, 680 tokens):

- VAR: one block-causal pass over all 680 tokens;
- MVAR, all scales in one pass: the same 680 tokens, block-diagonal (per token, the same cost);
- MVAR groups 0..7 | 8 | 9: the passes a step runs, under either schedule (``all``: every group
  each step; ``paper``: one group per step); a step's peak is its largest group's.

Columns: kept (held from the forward until backward) without and with activation
checkpointing of every block (``ckpt 1``), and with it the peak (kept + the largest one block
recomputed in backward), for the torch neighbourhood path and the fused Triton kernel (the same
for passes without neighbourhood attention: VAR and group 0..7).

    python benchmarks/activation_memory.py                   # d16, d20, d24 at batch 32, bf16
    python benchmarks/activation_memory.py --depths 16 --batch 8 --dtype fp32 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mvar_dist.memory import count_activations, paper_model_config, pass_groups

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("torch", "triton")
GIB = 2**30


def passes(depth: int) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(label, mode, scales) of every row: VAR, MVAR in one pass, then MVAR's scale groups."""
    rows: list[tuple[str, str, tuple[int, ...] | None]] = [("VAR, all scales", "var", None),
                                                           ("MVAR, all scales, one pass", "mvar", None)]
    for group in pass_groups(paper_model_config(depth)):
        name = f"{group[0]}..{group[-1]}" if len(group) > 1 else str(group[0])
        rows.append((f"MVAR group {name}", "mvar", group))
    return rows


def measure(depths: list[int], batch: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    for depth in depths:
        for label, mode, scales in passes(depth):
            config = paper_model_config(depth, mode)
            tokens = config.layout.num_tokens if scales is None else sum(config.layout.scale_len(s) for s in scales)
            row = {"depth": depth, "pass": label, "mode": mode, "scales": None if scales is None else list(scales),
                   "tokens": tokens, "batch": batch}
            for backend in BACKENDS:
                plain = count_activations(config, batch, dtype=dtype, scales=scales, attention_backend=backend)
                ckpt = count_activations(config, batch, dtype=dtype, scales=scales, attention_backend=backend,
                                         checkpointing=1)
                row[backend] = {"kept": plain.kept_bytes, "ckpt_kept": ckpt.kept_bytes, "ckpt_peak": ckpt.peak_bytes}
            rows.append(row)
    return rows


def gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def print_tables(rows: list[dict], batch: int, dtype_name: str) -> None:
    print(f"Activation memory: exact bytes autograd saves for backward in one training pass (loss included,"
          f" parameters excluded), batch {batch}, {dtype_name}, per GPU; GiB = 2^30 bytes")
    print("kept = held from the forward until backward; ckpt 1 = every block checkpointed; "
          "peak = kept + one block recomputed in backward")
    for depth in sorted({r["depth"] for r in rows}):
        config = paper_model_config(depth)
        print(f"\ndepth {depth}, width {config.embed_dim}, {config.num_heads} heads")
        print(f"{'pass':<27} {'tokens':>6} | {'torch path: kept':>16} {'ckpt kept':>9} {'ckpt peak':>9} |"
              f" {'fused: kept':>11} {'ckpt kept':>9} {'ckpt peak':>9} | {'KiB/token':>9}")
        for r in (r for r in rows if r["depth"] == depth):
            t, f = r["torch"], r["triton"]
            per_token = f["kept"] / (r["tokens"] * batch) / 1024
            print(f"{r['pass']:<27} {r['tokens']:>6} | {gib(t['kept']):>16} {gib(t['ckpt_kept']):>9} "
                  f"{gib(t['ckpt_peak']):>9} | {gib(f['kept']):>11} {gib(f['ckpt_kept']):>9} "
                  f"{gib(f['ckpt_peak']):>9} | {per_token:>9.1f}")
    print("\nA training step's activation peak, fused kernel: VAR's one pass vs MVAR's largest group "
          "(both schedules, `all` and `paper`, run the groups as separate passes)")
    print(f"{'depth':>5} | {'VAR':>7} {'MVAR':>7} {'VAR/MVAR':>8} | {'VAR ckpt':>8} {'MVAR ckpt':>9} {'VAR/MVAR':>8} |"
          f" {'VAR ckpt peak':>13} {'MVAR ckpt peak':>14} {'VAR/MVAR':>8}")
    for depth in sorted({r["depth"] for r in rows}):
        var = next(r["triton"] for r in rows if r["depth"] == depth and r["mode"] == "var")
        groups = [r["triton"] for r in rows if r["depth"] == depth and r["mode"] == "mvar" and r["scales"] is not None]
        mvar = {key: max(g[key] for g in groups) for key in ("kept", "ckpt_kept", "ckpt_peak")}
        print(f"{depth:>5} | {gib(var['kept']):>7} {gib(mvar['kept']):>7} {var['kept'] / mvar['kept']:>7.2f}x |"
              f" {gib(var['ckpt_kept']):>8} {gib(mvar['ckpt_kept']):>9} {var['ckpt_kept'] / mvar['ckpt_kept']:>7.2f}x |"
              f" {gib(var['ckpt_peak']):>13} {gib(mvar['ckpt_peak']):>14} {var['ckpt_peak'] / mvar['ckpt_peak']:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="16,20,24", help="comma-separated model depths (width 64 x depth)")
    parser.add_argument("--batch", type=int, default=32, help="samples per pass (per GPU)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--json", help="also write the rows, exact bytes, to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = measure([int(d) for d in args.depths.split(",")], args.batch, DTYPES[args.dtype])
    print_tables(rows, args.batch, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    # stderr, so that stdout is the same on every run and machine
    print(f"counted in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
