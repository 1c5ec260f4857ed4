"""``mvar-dist train``: train MVAR or VAR with DeepSpeed, one process per rank (``--nproc N``
spawns N local ranks; under SLURM each task runs this without it).

Each optimizer step consumes one global batch; which scales it trains is its schedule:
``all`` (every scale), ``paper`` (the released MVAR rotation), or VAR's single block-causal
pass (``model.mode: var``). See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvar-dist train", description="Train MVAR or VAR with DeepSpeed.")
    parser.add_argument("--config", required=True, help="experiment file, e.g. configs/mvar_d16.yaml")
    parser.add_argument("--nproc", type=int, default=0, help="spawn N local ranks (CPU or GPUs of this machine)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


@reports("train", ConfigError, code=2)
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.nproc:
        from mvar_dist.launch.local import launch

        child = [sys.executable, "-m", "mvar_dist", "train", "--config", args.config, *args.overrides]
        return launch(args.nproc, child)
    config = load_config(args.config, args.overrides)
    from mvar_dist.training.trainer import Trainer

    return Trainer(config).run()
