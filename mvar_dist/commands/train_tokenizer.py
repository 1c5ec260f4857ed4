"""``mvar-dist train-tokenizer``: train VAR's multi-scale VQVAE on images (VQGAN's recipe:
reconstruction, VQ, perceptual and adversarial losses) with DeepSpeed, one process per rank
(``--nproc N`` spawns N local ranks). The experiment file says ``kind: tokenizer``; see
docs/tokenizer_training.md. Export the result with ``mvar-dist export``."""

from __future__ import annotations

import argparse
from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.commands.train import launch_or_train, training_parser
from mvar_dist.config import TOKENIZER, ConfigError
from mvar_dist.runtime.checkpoint import CheckpointWriteError


def build_parser() -> argparse.ArgumentParser:
    return training_parser(
        "mvar-dist train-tokenizer",
        "Train the multi-scale VQVAE tokenizer on images with DeepSpeed, one process per rank.\n"
        "The experiment file says 'kind: tokenizer'; export the result with mvar-dist export.\n"
        "See docs/tokenizer_training.md.",
        "configs/tokenizer_imagenet.yaml (kind: tokenizer)",
    )


@reports("train-tokenizer", ConfigError, CheckpointWriteError)
def main(argv: Sequence[str]) -> int:
    return launch_or_train("train-tokenizer", build_parser(), argv, TOKENIZER)
