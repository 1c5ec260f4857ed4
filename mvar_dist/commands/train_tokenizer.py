"""``mvar-dist train-tokenizer``: train VAR's multi-scale VQVAE on images (VQGAN's recipe:
reconstruction, VQ, perceptual and adversarial losses) with DeepSpeed, one process per rank
(``--nproc N`` spawns N local ranks). The experiment file says ``kind: tokenizer``; see
docs/tokenizer_training.md. Export the result with ``mvar-dist export``."""

from __future__ import annotations

import argparse
from typing import Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.commands.train import TRAINING_EPILOG, launch_or_train
from mvar_dist.config import TOKENIZER, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist train-tokenizer", formatter_class=HelpFormatter, epilog=TRAINING_EPILOG,
        description="Train the multi-scale VQVAE tokenizer on images with DeepSpeed, one process per rank.\n"
                    "The experiment file says 'kind: tokenizer'; export the result with mvar-dist export.\n"
                    "See docs/tokenizer_training.md.",
    )
    parser.add_argument("--config", required=True, help="tokenizer experiment file, e.g. configs/tokenizer_imagenet.yaml")
    parser.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="spawn N local ranks (CPU or GPUs of this machine); by default this process is "
                             "one rank, started by srun or another launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


@reports("train-tokenizer", ConfigError)
def main(argv: Sequence[str]) -> int:
    return launch_or_train("train-tokenizer", build_parser(), argv, TOKENIZER)
