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
from typing import Any, Callable, Mapping, Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.config import ConfigError, load_config, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvar-dist train", description="Train MVAR or VAR with DeepSpeed.")
    parser.add_argument("--config", required=True, help="experiment file, e.g. configs/mvar_d16.yaml")
    parser.add_argument("--nproc", type=int, default=0, help="spawn N local ranks (CPU or GPUs of this machine)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


def launched_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank when a launcher started it (RANK, else srun's SLURM_PROCID), else 0.

    Read without :func:`mvar_dist.training.distributed.read_rank_env`, which raises on an
    incomplete rendezvous environment: here we only decide who reports an error."""
    env = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        value = env.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def launch_or_train(command: str, parser: argparse.ArgumentParser, argv: Sequence[str],
                    load: Callable[[str, Sequence[str]], Any], validate_for: Callable[[Any, int], None],
                    trainer: Callable[[Any], Any]) -> int:
    """``--nproc N``: validate once for N ranks, then spawn N copies of ``mvar-dist <command>``;
    without it, this process is one rank (of a launcher's or srun's) and trains."""
    args = parser.parse_args(list(argv))
    if args.nproc < 0:
        parser.error(f"--nproc must be >= 1 (or left out for one rank), got {args.nproc}")
    if args.nproc:
        # checked here, for the world size the ranks will have: a bad config gives one message and no rank
        validate_for(load(args.config, args.overrides), args.nproc)
        from mvar_dist.launch.local import launch

        return launch(args.nproc, [sys.executable, "-m", "mvar_dist", command, "--config", args.config, *args.overrides])
    try:
        return trainer(load(args.config, args.overrides)).run()
    except ConfigError:
        # every rank finds the same problem in the same config: rank 0 says it, the others exit alike
        if launched_rank() != 0:
            return 2
        raise


@reports("train", ConfigError, code=2)
def main(argv: Sequence[str]) -> int:
    def trainer(config: Any) -> Any:
        from mvar_dist.training.trainer import Trainer

        return Trainer(config)

    return launch_or_train("train", build_parser(), argv, load_config, validate, trainer)
