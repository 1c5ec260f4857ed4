"""``mvar-dist plan``: will an experiment fit on a cluster's GPUs, with which ZeRO stage and
per-GPU batch? Per-rank memory of weights, gradients, optimizer state, buffers and activations
under ZeRO 1, 2, 3 and offload, the largest micro batch that fits each, the recommended stage
with its batch split, and the checkpoint size and write time (:mod:`mvar_dist.memory.plan`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.config import ConfigError, load_config
from mvar_dist.config import sizes as config_sizes
from mvar_dist.memory.plan import DEFAULT_RESERVE_PERCENT, Cluster, Plan, StagePlan, plan_run

GIB = 2**30
DEFAULT_RESERVE = f"{DEFAULT_RESERVE_PERCENT}%"


def parse_size(text: str) -> int:
    """:func:`mvar_dist.config.sizes.parse_size` as an argparse type."""
    try:
        return config_sizes.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_reserve(text: str) -> Callable[[int], int]:
    """``10%`` of the GPU's memory, or a size (``4GB``)."""
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a percentage; write e.g. 10%") from None
        if not 0 <= percent < 100:
            raise argparse.ArgumentTypeError(f"{text!r} must be in 0% .. 99%")
        return lambda memory: int(memory * percent / 100)
    size = parse_size(stripped)
    return lambda memory: size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist plan", formatter_class=HelpFormatter,
        description="Per-GPU memory of an experiment on a cluster under ZeRO 1, 2, 3 and offload: weights, gradients,\n"
                    "optimizer state, DeepSpeed's buffers, activations (counted exactly on the meta device), the\n"
                    "largest micro batch that fits each stage, the recommended stage and its batch split, and the\n"
                    "checkpoint size and write time. Nothing runs on a GPU; the data files need not exist.",
        epilog="Sizes are binary: 80GB = 80 GiB. What the plan counts and what the reserve covers:\n"
               "docs/training.md, \"Planning a run: mvar-dist plan\".\n\n"
               "exit status: 0 a stage fits; 1 no stage fits (the plan is printed all the same); 2 a user error\n"
               "(the config, a flag, a global batch the ranks cannot share).",
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. configs/mvar_d16.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.activation_checkpointing=blocks")
    parser.add_argument("--nodes", type=_positive, default=None, help="number of nodes (default: launch.nodes of the experiment)")
    parser.add_argument("--gpus-per-node", type=_positive, default=None,
                        help="GPUs per node, one rank each (default: launch.gpus_per_node of the experiment, else 8)")
    parser.add_argument("--gpu-memory", type=parse_size, default="80GB", help="memory of one GPU")
    parser.add_argument("--reserve", type=parse_reserve, default=DEFAULT_RESERVE,
                        help="per GPU, left for what the plan does not count (CUDA context, NCCL buffers, allocator "
                             "fragmentation): a percentage of --gpu-memory or a size")
    parser.add_argument("--write-bandwidth", type=parse_size, default="1GB/s",
                        help="write bandwidth into the run directory, all ranks together, e.g. 1GB/s")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


@reports("plan", ConfigError)
def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(list(argv))
    config = load_config(args.config, args.overrides)
    reserve = args.reserve(args.gpu_memory)
    if reserve >= args.gpu_memory:
        parser.error(f"--reserve ({reserve / GIB:.1f} GiB) must be less than --gpu-memory ({args.gpu_memory / GIB:.1f} GiB)")
    cluster = Cluster(
        nodes=args.nodes or config.launch.nodes, gpus_per_node=args.gpus_per_node or config.launch.gpus_per_node or 8,
        gpu_memory=args.gpu_memory, reserve=reserve, write_bandwidth=float(args.write_bandwidth),
    )
    plan = plan_run(config, cluster, args.config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


# ----- the text table -----


def _split(stage: StagePlan) -> str:
    if stage.split is None:
        return "does not fit"
    return f"{stage.split.micro_batch} x {stage.split.accumulation}"


def format_plan(plan: Plan) -> str:
    cluster, model, sample = plan.cluster, plan.model, plan.per_sample
    stages = plan.stages
    share = plan.global_batch // cluster.world_size  # the most one rank can take per pass
    # GiB for GPUs; MiB for the toy budgets of tests and CPU experiments
    unit, unit_name = (GIB, "GiB") if cluster.gpu_memory >= 4 * GIB else (2**20, "MiB")

    def size(value: int | None) -> str:
        return "-" if value is None else f"{value / unit:.2f}"

    names = [s.state.setup.name + (" *" if s.configured else "") for s in stages]
    rows: list[tuple[str, list[str]]] = [
        ("parameters", [size(s.state.parameters) for s in stages]),
        ("gradients", [size(s.state.gradients + s.state.boundary_gradients) for s in stages]),
        ("optimizer: fp32 master + Adam m, v", [size(s.state.optimizer) for s in stages]),
        ("buffers: reduce bucket / ZeRO-3 gathered", [size(s.state.persistent_buffers + s.state.backward_buffers) for s in stages]),
        ("buffers: optimizer step", [size(s.state.step_buffers) for s in stages]),
        ("model state at its peak", [size(max(s.state.backward_peak, s.state.step_peak)) for s in stages]),
        ("tokenizer weights (frozen, fp32)", [size(s.fixed) for s in stages]),
        (f"largest micro batch that fits (of {share})", [str(s.largest_micro_batch) for s in stages]),
        ("batch split: micro x accumulation", [_split(s) for s in stages]),
        ("activations + logits at that micro batch", [size(None if s.at_split is None else s.at_split.backward) for s in stages]),
        ("peak per GPU at that micro batch", [size(s.peak) for s in stages]),
        ("host memory per rank (offload)", [size(s.state.host_total) for s in stages]),
        ("checkpoint: rank 0's files", [size(s.state.checkpoint_rank0) for s in stages]),
        ("checkpoint: all ranks", [size(s.state.checkpoint_total) for s in stages]),
        ("checkpoint write time, s", [f"{s.state.checkpoint_total / cluster.write_bandwidth:.1f}" for s in stages]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(name), *(len(values[i]) for _, values in rows)) for i, name in enumerate(names)]
    scales = ",".join(str(s) for s in sample.scales)
    lines = [
        f"plan for {plan.config_path}: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs = {cluster.world_size} ranks, "
        f"{size(cluster.gpu_memory)} {unit_name} per GPU",
        f"model: {model.mode} depth {model.depth}, width {model.embed_dim}, {plan.parameters:,} parameters; "
        f"precision {plan.precision}; schedule {plan.schedule}",
        f"activations: largest pass scales {scales} ({sample.tokens} tokens), {plan.attention_backend} attention, "
        f"activation checkpointing {_checkpointing(plan.checkpointing)}: {sample.activations / 2**20:.1f} MiB saved for "
        f"backward + {(sample.logits + sample.loss_gradients) / 2**20:.1f} MiB logits and loss gradients per sample",
        f"budget: {size(cluster.gpu_memory)} {unit_name} - reserve {size(cluster.reserve)} {unit_name} (CUDA context, "
        f"NCCL buffers, allocator fragmentation: not counted) = {size(cluster.budget)} {unit_name}",
        "",
        f"{unit_name + ' per GPU':<{label_width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)),
    ]
    lines += [f"{label:<{label_width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)) for label, values in rows]
    lines.append("")
    lines.append("* the experiment's deepspeed.template")
    for stage in stages:
        lines += [f"{stage.state.setup.name}: {note}" for note in stage.notes]
    recipe = plan.recipe_split
    lines.append(f"the experiment's own split on {cluster.world_size} ranks: {recipe.describe()}")
    if plan.recommended is None:
        most = max(stages, key=lambda s: s.largest_micro_batch)
        if most.largest_micro_batch:  # an explicit micro batch that is too large
            lines.append(f"does not fit: train.micro_batch_size={recipe.micro_batch} fits no stage; at most "
                         f"{most.largest_micro_batch} per GPU fit ({most.state.setup.name}): train.micro_batch_size=auto "
                         f"train.max_micro_batch_size={most.largest_micro_batch}")
        else:
            lines.append(f"does not fit: no ZeRO stage holds one sample per GPU within {size(cluster.budget)} {unit_name}; "
                         "try train.activation_checkpointing=blocks, more GPUs or GPUs with more memory")
    else:
        best = stages[plan.recommended]
        assert best.split is not None
        template = f"deepspeed.template={best.template}"
        lines.append(f"recommended: {best.state.setup.name} ({template}), {best.split.describe()}")
        if best.split.micro_batch < recipe.micro_batch:
            lines.append(f"  the experiment's {recipe.micro_batch} per pass does not fit; "
                         f"train.max_micro_batch_size={best.largest_micro_batch} keeps it within memory")
        elif best.memory_split is not None and best.memory_split.accumulation < best.split.accumulation:
            lines.append(f"  memory allows {best.largest_micro_batch} per pass: train.max_micro_batch_size="
                         f"{best.largest_micro_batch} gives {best.memory_split.micro_batch} x "
                         f"{best.memory_split.accumulation} accumulation")
    lines.append(f"checkpoint write time at {cluster.write_bandwidth / GIB:.2f} GiB/s (--write-bandwidth, all ranks "
                 "together): all ranks' files / bandwidth")
    return "\n".join(lines)


def _checkpointing(every: int) -> str:
    return {0: "none", 1: "every block"}.get(every, f"one block in {every}")
