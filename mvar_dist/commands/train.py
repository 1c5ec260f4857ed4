"""``mvar-dist train``: train MVAR or VAR with DeepSpeed, one process per rank (``--nproc N``
spawns N local ranks, ``--nnodes M --node-rank R --master-addr A`` makes them node R's share of
N x M ranks; under SLURM or torchrun each rank runs this without ``--nproc``).

Each optimizer step consumes one global batch; which scales it trains is its schedule:
``all`` (every scale), ``paper`` (the released MVAR rotation), or VAR's single block-causal
pass (``model.mode: var``). See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.config import (
    TRANSFORMER,
    ConfigError,
    ExperimentKind,
    load_experiment,
    validate_experiment,
)
from mvar_dist.runtime.checkpoint import CheckpointWriteError

if TYPE_CHECKING:
    from mvar_dist.launch.local import Nodes

DEFAULT_MASTER_PORT = 29500  # torch's own default, so torchrun and these flags agree
TRAINING_EPILOG = """exit status: 0 done; 1 the run failed; 2 a user error in the input (the config, a flag,
a run directory of another experiment); 128+N a rank killed by signal N."""


def training_parser(prog: str, description: str, config_example: str) -> argparse.ArgumentParser:
    """The flags every training command takes: the experiment file, ``--nproc`` and the node
    flags of a launch over several machines, overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=TRAINING_EPILOG, description=description,
    )
    parser.add_argument("--config", required=True, help=f"experiment file, e.g. {config_example}")
    parser.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="spawn N local ranks (CPU or GPUs of this machine); by default this process is "
                             "one rank, started by srun, torchrun or another launcher")
    nodes = parser.add_argument_group(
        "several nodes without SLURM (with --nproc; run the same command on every node, only --node-rank "
        "differs; docs/training.md#several-nodes-without-slurm)")
    nodes.add_argument("--nnodes", type=int, default=1, metavar="M",
                       help="number of nodes, each starting --nproc ranks: world size N x M")
    nodes.add_argument("--node-rank", type=int, default=None, metavar="R",
                       help="this node's index, 0..M-1; it starts ranks R*N..R*N+N-1 (default: 0)")
    nodes.add_argument("--master-addr", default=None, metavar="HOST",
                       help="address of the node with --node-rank 0, reachable from every node (required "
                            "with --nnodes > 1; default with one node: 127.0.0.1)")
    nodes.add_argument("--master-port", type=int, default=None, metavar="PORT",
                       help=f"TCP port the ranks meet on at --master-addr (default with --nnodes > 1: "
                            f"{DEFAULT_MASTER_PORT}; with one node a free port)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


def node_placement(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Nodes:
    """The launcher flags checked together (``parser.error`` names the flag), as the node this
    launcher is; called only with ``--nproc``."""
    from mvar_dist.launch.local import Nodes

    if args.nnodes < 1:
        parser.error(f"--nnodes must be >= 1, got {args.nnodes}")
    node_rank = 0 if args.node_rank is None else args.node_rank
    if not 0 <= node_rank < args.nnodes:
        parser.error(f"--node-rank must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}, got {node_rank}")
    if args.master_addr is not None and not args.master_addr.strip():
        parser.error("--master-addr is empty")
    if args.nnodes > 1 and args.master_addr is None:
        parser.error(f"--nnodes {args.nnodes} needs --master-addr: the address of the node started with "
                     "--node-rank 0, reachable from every node")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        parser.error(f"--master-port must be in 1..65535, got {args.master_port}")
    port = args.master_port if args.master_port is not None else (DEFAULT_MASTER_PORT if args.nnodes > 1 else None)
    return Nodes(args.nnodes, node_rank, (args.master_addr or "127.0.0.1").strip(), port)


def _check_launcher_flags_need_nproc(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Without --nproc this process is one rank of an outside launcher, which owns the node
    layout: the node flags would be silently ignored, so they are refused."""
    given = [f"{flag} {value}" for flag, value in (("--nnodes", args.nnodes if args.nnodes != 1 else None),
                                                   ("--node-rank", args.node_rank), ("--master-addr", args.master_addr),
                                                   ("--master-port", args.master_port)) if value is not None]
    if given:
        parser.error(f"{given[0]} needs --nproc N (the ranks this node starts); without --nproc this process is "
                     "one rank of torchrun or srun, which set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")


def build_parser() -> argparse.ArgumentParser:
    return training_parser(
        "mvar-dist train",
        "Train MVAR or VAR with DeepSpeed on code shards, one process per rank.\n"
        "With --nproc N this spawns N local ranks (--nnodes/--node-rank/--master-addr: this node's\n"
        "share of several machines); under SLURM (mvar-dist submit) or torchrun every rank runs it\n"
        "without --nproc. See docs/training.md.",
        "configs/mvar_d16.yaml",
    )


def launched_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank when a launcher started it (RANK, else srun's SLURM_PROCID), else 0.

    Read without :func:`mvar_dist.runtime.distributed.read_rank_env`, which raises on an
    incomplete rendezvous environment: here we only decide who reports an error."""
    env = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        value = env.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def launch_or_train(command: str, parser: argparse.ArgumentParser, argv: Sequence[str], kind: ExperimentKind) -> int:
    """``--nproc N``: validate once for the N x ``--nnodes`` ranks of the job, then spawn this
    node's N copies of ``mvar-dist <command>``; without it, this process is one rank (of
    torchrun's, srun's or another launcher's) and trains."""
    args = parser.parse_args(list(argv))
    if args.nproc < 0:
        parser.error(f"--nproc must be >= 1 (or left out for one rank), got {args.nproc}")
    if args.nproc:
        nodes = node_placement(parser, args)
        # checked here, for the world size the ranks will have: a bad config gives one message and no rank
        validate_experiment(load_experiment(args.config, args.overrides, kind), args.nproc * nodes.count)
        from mvar_dist.launch.local import launch

        return launch(args.nproc, [sys.executable, "-m", "mvar_dist", command, "--config", args.config, *args.overrides],
                      nodes=nodes)
    _check_launcher_flags_need_nproc(parser, args)
    from mvar_dist.runtime.loop import run_training
    from mvar_dist.tasks import training_task

    try:
        return run_training(training_task(load_experiment(args.config, args.overrides, kind)))
    except ConfigError:
        # every rank finds the same problem in the same config: rank 0 says it, the others exit alike
        if launched_rank() != 0:
            return 2
        raise


@reports("train", ConfigError, CheckpointWriteError)
def main(argv: Sequence[str]) -> int:
    return launch_or_train("train", build_parser(), argv, TRANSFORMER)
