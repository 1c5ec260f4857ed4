"""Training-step cost of VAR vs MVAR ``schedule: all`` vs MVAR ``schedule: paper``, side by side,
and what activation checkpointing (``+ckpt``: every block recomputed) and ``torch.compile``
(``+compile``: the blocks compiled) buy.

Same model size, same global batch, the real DeepSpeed engine and
``mvar_dist.training.task.train_step`` (one rank). Each variant runs ``--runs`` times (default 3),
every run in a fresh process so that peak memory is its own; the runs of the variants are
interleaved (run 1 of every variant, then run 2, ...) so that a slow spell of the machine hits
them alike. Each figure is printed as the median and the min-max over the runs; ratios are
ratios of medians. Reported:

- time per image with *all scales covered*: VAR and ``all`` cover every scale of every image in
  one optimizer step; the paper rotation trains one scale group per step, so covering all scales
  of B images costs one step of each group (t_low + t_8 + t_9) / B. Its mean optimizer step
  (ratio_k steps of the low group, then one per refine scale) is shown too;
- peak memory while stepping: CUDA max allocated on GPU; on CPU the growth of peak RSS over the
  process's RSS before the first step (activations and gradients; weights are excluded);
- tokens/s: trained tokens per second of step time.

    python benchmarks/train_step.py                      # CPU defaults: depth 2, width 128, 256px layout
    python benchmarks/train_step.py --depth 16 --batch 32 --precision bf16    # on a GPU
    python benchmarks/train_step.py --variants mvar-all,mvar-all+ckpt --depth 2 --width 1024 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fresh_runs import current_rss_mb, measure_rounds, median_row, spread

# name -> (mode, schedule, recompute every n-th block (0: none), torch.compile the blocks)
VARIANTS = {
    "var": ("var", "all", 0, False), "mvar-all": ("mvar", "all", 0, False), "mvar-paper": ("mvar", "paper", 0, False),
    "var+ckpt": ("var", "all", 1, False), "mvar-all+ckpt": ("mvar", "all", 1, False),
    "mvar-all+compile": ("mvar", "all", 0, True),
}
DEFAULT_VARIANTS = "var,mvar-all,mvar-paper,var+ckpt,mvar-all+ckpt,mvar-all+compile"


def build_config(args: argparse.Namespace, mode: str, schedule: str):
    from mvar_dist.config import ExperimentConfig, OptimConfig, TrainConfig
    from mvar_dist.model import MVARConfig

    config = ExperimentConfig()
    config.model = MVARConfig(
        depth=args.depth, embed_dim=args.width, num_heads=max(1, args.width // 64), num_classes=1000,
        vocab_size=4096, z_channels=32, mode=mode, cond_drop_rate=0.1,
    )
    config.train = TrainConfig(schedule=schedule, ratio_k=8, total_steps=1000, global_batch_size=args.batch,
                               micro_batch_size=args.batch)
    config.optim = OptimConfig(lr=1e-4, warmup_steps=0, lr_schedule="constant")
    config.deepspeed.template, config.deepspeed.precision = "zero2", args.precision
    return config


def measure(args: argparse.Namespace) -> dict:
    """Child process: one variant, one rank."""
    import resource

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from mvar_dist.model import MVAR
    from mvar_dist.tokenizer import MultiScaleVQVAE
    from mvar_dist.training.optimizer import build_engine
    from mvar_dist.training.schedule import step_groups
    from mvar_dist.training.losses import ScaleStats
    from mvar_dist.training.task import train_step

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", init_method="env://")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    mode, schedule, recompute_every, compiled = VARIANTS[args.variant]
    config = build_config(args, mode, schedule)
    torch.manual_seed(0)
    model = MVAR(config.model)
    model.set_activation_checkpointing(recompute_every)
    if compiled:
        model.compile_blocks()
    engine = build_engine(model, config, world_size=1)
    # only the quantiser (codebook, phi convs) computes the teacher input; a small encoder/decoder
    tokenizer = MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1).to(device)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            codes = torch.randint(0, 4096, (args.batch, model.layout.num_tokens), generator=generator)
            yield codes, torch.randint(0, 1000, (args.batch,), generator=generator), torch.arange(args.batch)

    stream = batches()

    def one_step(step: int) -> tuple[float, int, tuple]:
        groups = step_groups(config, step)
        stats = ScaleStats(model.layout.num_scales, device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(engine, model, tokenizer, stream, 1, groups, stats, 0.0, device)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result.tokens, tuple(groups)

    refine_steps = model.layout.num_scales - config.model.refine_step
    cycle = list(range(1, 9)) + [9 + i for i in range(refine_steps)] if schedule == "paper" else [1]
    # warm-up: allocator, DeepSpeed buffers, and compilation of every group's shapes; compiled
    # blocks get a second round, since a shape seen again after others may be recompiled as dynamic
    for _ in range(2 if compiled else 1):
        for step in (cycle[0], *cycle[8:]) if schedule == "paper" else (cycle[0],):
            one_step(step)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    times: dict[tuple, list[float]] = {}
    tokens, total_time = 0, 0.0
    for _ in range(args.repeats):
        # the paper rotation: time the first low-group step and every refine step of a cycle
        for step in ([cycle[0]] + cycle[8:] if schedule == "paper" else cycle):
            seconds, n, groups = one_step(step)
            times.setdefault(groups, []).append(seconds)
            tokens, total_time = tokens + n, total_time + seconds
    mean = {g: sum(t) / len(t) for g, t in times.items()}
    if schedule == "paper":
        low = mean[(tuple(range(config.model.refine_step)),)]
        covered = sum(mean.values())
        mean_step = (8 * low + sum(t for g, t in mean.items() if len(g[0]) == 1)) / (8 + refine_steps)
    else:
        covered = mean_step = next(iter(mean.values()))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
    return {
        "variant": args.variant, "time_per_image_all_scales_ms": 1000 * covered / args.batch,
        "mean_step_s": mean_step, "peak_memory_mb": peak, "tokens_per_s": tokens / total_time,
        "device": str(device), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps (cycles for paper) per process")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant (median and min-max)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29555, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    from mvar_dist.runtime.distributed import free_port

    variants = args.variants.split(",")

    def command(variant: str) -> list[str]:
        return [sys.executable, __file__, "--variant", variant, "--port", str(free_port()),
                "--depth", str(args.depth), "--width", str(args.width), "--batch", str(args.batch),
                "--repeats", str(args.repeats), "--precision", args.precision]

    rows = measure_rounds(command, variants, args.runs, summarise, args.json)
    base = rows[0]
    print(f"train step, 256px layout (680 tokens), depth {args.depth}, width {args.width}, "
          f"batch {args.batch}, {args.precision}, {base['params_m']:.1f}M params, {base['device']}; "
          f"{args.runs} fresh processes per variant: median [min-max]; ratios of medians")
    print(f"{'variant':<17} {'ms/img all scales':>26} {'x first':>8} {'mean step s':>12} "
          f"{'peak MB':>20} {'x first':>8} {'tokens/s':>10}")
    for row in rows:
        print(f"{row['variant']:<17} {spread(row, 'time_per_image_all_scales_ms', '.1f'):>26} "
              f"{row['time_per_image_all_scales_ms'] / base['time_per_image_all_scales_ms']:>8.2f} "
              f"{row['mean_step_s']:>12.3f} {spread(row, 'peak_memory_mb', '.0f'):>20} "
              f"{row['peak_memory_mb'] / base['peak_memory_mb']:>8.2f} {row['tokens_per_s']:>10.0f}")
    by_name = {row["variant"]: row for row in rows}
    for plain, other in (("var", "var+ckpt"), ("mvar-all", "mvar-all+ckpt"), ("mvar-all", "mvar-all+compile")):
        if plain in by_name and other in by_name:
            a, b = by_name[plain], by_name[other]
            print(f"{other} vs {plain}: memory x{b['peak_memory_mb'] / a['peak_memory_mb']:.2f}, "
                  f"step time x{b['time_per_image_all_scales_ms'] / a['time_per_image_all_scales_ms']:.2f} (medians)")


FIGURES = ("time_per_image_all_scales_ms", "mean_step_s", "peak_memory_mb", "tokens_per_s")


def summarise(runs: list[dict]) -> dict:
    return median_row(runs, FIGURES)


if __name__ == "__main__":
    main()
