"""``mvar-dist train-tokenizer``: train VAR's multi-scale VQVAE on images (VQGAN's recipe:
reconstruction, VQ, perceptual and adversarial losses) with DeepSpeed, one process per rank
(``--nproc N`` spawns N local ranks). The experiment file says ``kind: tokenizer``; see
docs/tokenizer_training.md. Export the result with ``mvar-dist export``."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.commands.train import launch_or_train
from mvar_dist.config import ConfigError
from mvar_dist.tokenizer_training.config import load_tokenizer_experiment, validate_tokenizer_experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvar-dist train-tokenizer",
                                     description="Train the multi-scale VQVAE tokenizer with DeepSpeed.")
    parser.add_argument("--config", required=True, help="tokenizer experiment file, e.g. configs/tokenizer_imagenet.yaml")
    parser.add_argument("--nproc", type=int, default=0, help="spawn N local ranks (CPU or GPUs of this machine)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    return parser


@reports("train-tokenizer", ConfigError, code=2)
def main(argv: Sequence[str]) -> int:
    def trainer(config: Any) -> Any:
        from mvar_dist.tokenizer_training.trainer import TokenizerTrainer

        return TokenizerTrainer(config)

    return launch_or_train("train-tokenizer", build_parser(), argv, load_tokenizer_experiment,
                           validate_tokenizer_experiment, trainer)
