"""``mvar-dist train``: train MVAR or VAR with DeepSpeed, one process per rank (``--nproc N``
spawns N local ranks; under SLURM each task runs this without it).

Each optimizer step consumes one global batch; which scales it trains is its schedule:
``all`` (every scale), ``paper`` (the released MVAR rotation), or VAR's single block-causal
pass (``model.mode: var``). See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.config import (
    TRANSFORMER,
    ConfigError,
    ExperimentKind,
    load_experiment,
    validate_experiment,
)
from mvar_dist.runtime.checkpoint import CheckpointWriteError

TRAINING_EPILOG = """exit status: 0 done; 1 the run failed; 2 a user error in the input (the config, a flag,
a run directory of another experiment); 128+N a rank killed by signal N."""


def training_parser(prog: str, description: str, config_example: str) -> argparse.ArgumentParser:
    """The flags every training command takes: the experiment file, ``--nproc``, overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=TRAINING_EPILOG, description=description,
    )
    parser.add_argument("--config", required=True, help=f"experiment file, e.g. {config_example}")
    parser.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="spawn N local ranks (CPU or GPUs of this machine); by default this process is "
                             "one rank, started by srun or another launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return training_parser(
        "mvar-dist train",
        "Train MVAR or VAR with DeepSpeed on code shards, one process per rank.\n"
        "With --nproc N this spawns N local ranks; under SLURM (mvar-dist submit) every task\n"
        "runs it without --nproc. See docs/training.md.",
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
    """``--nproc N``: validate once for N ranks, then spawn N copies of ``mvar-dist <command>``;
    without it, this process is one rank (of a launcher's or srun's) and trains."""
    args = parser.parse_args(list(argv))
    if args.nproc < 0:
        parser.error(f"--nproc must be >= 1 (or left out for one rank), got {args.nproc}")
    if args.nproc:
        # checked here, for the world size the ranks will have: a bad config gives one message and no rank
        validate_experiment(load_experiment(args.config, args.overrides, kind), args.nproc)
        from mvar_dist.launch.local import launch

        return launch(args.nproc, [sys.executable, "-m", "mvar_dist", command, "--config", args.config, *args.overrides])
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
