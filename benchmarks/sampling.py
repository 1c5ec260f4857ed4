"""Sampling cost of VAR (KV cache over every earlier scale) vs MVAR (no cache: each scale sees
only its own tokens, the largest with k x k neighbourhood attention), side by side.

Same model size, batch, classifier-free guidance and top-k / top-p. Each variant runs ``--runs``
times (default 3), every run in a fresh process so that its peak memory is its own, the two
variants interleaved; each figure is printed as the median and the min-max over the runs, ratios
are ratios of medians. Reported per variant:

- peak memory while sampling: CUDA max allocated minus the weights on GPU; on CPU the growth of
  peak RSS over the process's RSS before the first sample (the first call's: caches, activations);
- images/s: batch / seconds per generate call (after a warm-up call), tokenizer decode included;
- where the time goes, per scale (``--profile``): seconds of each scale's transformer pass.

    python benchmarks/sampling.py                          # CPU defaults: depth 8, width 512, batch 16
    python benchmarks/sampling.py --depth 16 --batch 32    # the paper's d16 shape (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from fresh_runs import current_rss_mb, measure_rounds, median_row, spread


def measure(args: argparse.Namespace) -> dict:
    """Child process: one variant."""
    import torch

    from mvar_dist.model import MVAR, MVARConfig
    from mvar_dist.tokenizer import MultiScaleVQVAE

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = MVARConfig(depth=args.depth, embed_dim=args.width, num_heads=args.heads, mode=args.variant)
    model = MVAR(config).to(device).eval()
    # only the quantiser matters for the scale loop; a small decoder keeps the final decode cheap
    tokenizer = MultiScaleVQVAE(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1).to(device)
    labels = torch.arange(args.batch, device=device) % 1000
    settings = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    timings: dict[int, float] = {}
    if args.profile:
        _time_scales(model, timings, cuda)

    def sample(seed: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(labels, tokenizer, seed=seed, **settings)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    sample(0)  # the memory of a cold call: caches and activations as sampling allocates them
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 - weights_mb if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
    timings.clear()
    seconds = [sample(seed) for seed in range(1, args.repeats + 1)]
    mean = sum(seconds) / len(seconds)
    return {
        "variant": args.variant, "peak_memory_mb": peak, "images_per_s": args.batch / mean, "seconds_per_call": mean,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "device": str(device),
        "scale_seconds": {s: t / args.repeats for s, t in sorted(timings.items())},
    }


def _time_scales(model, timings: dict[int, float], cuda: bool) -> None:
    """Wrap the model's per-scale pass (``logits``) to add its time to ``timings[scale]``."""
    import torch

    original = model.logits
    counter = {"scale": 0}

    def timed(x, cond, plan=None, caches=None):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(x, cond, plan=plan, caches=caches)
        if cuda:
            torch.cuda.synchronize()
        scale = counter["scale"] % model.layout.num_scales
        timings[scale] = timings.get(scale, 0.0) + time.perf_counter() - start
        counter["scale"] += 1
        return out

    model.logits = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=None, help="default 64 x depth (the released shapes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed generate calls per process")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant (median and min-max)")
    parser.add_argument("--cfg", type=float, default=2.7)
    parser.add_argument("--top-k", type=int, default=1200)
    parser.add_argument("--top-p", type=float, default=0.99)
    parser.add_argument("--profile", action="store_true", help="also time every scale's transformer pass")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--variant", choices=("var", "mvar"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.width = args.width or 64 * args.depth
    args.heads = max(1, args.width // 64)
    if args.variant:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    def command(variant: str) -> list[str]:
        return [sys.executable, __file__, "--variant", variant, "--depth", str(args.depth),
                "--width", str(args.width), "--batch", str(args.batch), "--repeats", str(args.repeats),
                "--cfg", str(args.cfg), "--top-k", str(args.top_k), "--top-p", str(args.top_p),
                *(["--profile"] if args.profile else [])]

    rows = measure_rounds(command, ("var", "mvar"), args.runs, summarise, args.json)
    var, mvar = rows
    print(f"sampling, 256px layout (10 scales, 680 tokens), depth {args.depth}, width {args.width}, batch {args.batch}, "
          f"cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p}, {var['params_m']:.0f}M params, {var['device']}; "
          f"{args.runs} fresh processes per variant: median [min-max]; ratios of medians")
    print(f"{'variant':<8} {'peak MB':>20} {'images/s':>20} {'s/call':>8}")
    for row in rows:
        print(f"{row['variant']:<8} {spread(row, 'peak_memory_mb', '.0f'):>20} "
              f"{spread(row, 'images_per_s', '.2f'):>20} {row['seconds_per_call']:>8.2f}")
    print(f"memory VAR/MVAR: {var['peak_memory_mb'] / mvar['peak_memory_mb']:.2f}x; "
          f"speed MVAR/VAR: {mvar['images_per_s'] / var['images_per_s']:.2f}x (medians)")
    if args.profile:
        print("seconds per scale pass (medians):  " + "  ".join(f"s{s}" for s in var["scale_seconds"]))
        for row in rows:
            print(f"{row['variant']:<8} " + " ".join(f"{t:.3f}" for t in row["scale_seconds"].values()))


FIGURES = ("peak_memory_mb", "images_per_s", "seconds_per_call")


def summarise(runs: list[dict]) -> dict:
    row = median_row(runs, FIGURES)
    row["scale_seconds"] = {s: statistics.median(run["scale_seconds"][s] for run in runs) for s in row["scale_seconds"]}
    return row


if __name__ == "__main__":
    main()
