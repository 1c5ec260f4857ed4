"""``mvar-dist quickstart --tokenizer vqvae``: the tokenizer stage as a real tokenizer training
run (a small multi-scale VQVAE on the training digits, 2 CPU ranks, DeepSpeed, MLflow, export)
instead of the k-means patch tokenizer, and how good it is: the digit judge's accuracy on its
reconstructions of the validation digits, their L1 error, and how many codes it uses."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import yaml

from mvar_dist.atomic import write_bytes
from mvar_dist.quickstart.digits import judge_accuracy, read_image_folder
from mvar_dist.quickstart.experiment import QuickstartPaths, tokenizer_experiment
from mvar_dist.tokenizer import ResidualTokenizer, load_tokenizer
from mvar_dist.tokenizer_training.export import export_tokenizer_run

logger = logging.getLogger(__name__)


def prepare_vqvae_tokenizer(paths: QuickstartPaths, nproc: int, seed: int,
                            train: Callable[..., None]) -> tuple[ResidualTokenizer, dict[str, Any]]:
    """The exported VQVAE if present (a rerun reuses it), else train and export it; with its report."""
    if not paths.tokenizer.is_file():
        raw = tokenizer_experiment(paths, seed=seed)
        write_bytes(paths.tokenizer_experiment_file, yaml.safe_dump(raw, sort_keys=False).encode())
        train(paths.tokenizer_experiment_file, nproc, "train-tokenizer")
        export_tokenizer_run(paths.tokenizer_run, paths.tokenizer.parent)
    else:
        logger.info("reusing %s", paths.tokenizer)
    tokenizer = load_tokenizer(paths.tokenizer)
    return tokenizer, tokenizer_report(tokenizer, paths)


@torch.no_grad()
def tokenizer_report(tokenizer: ResidualTokenizer, paths: QuickstartPaths) -> dict[str, Any]:
    images, labels = read_image_folder(paths.digits / "val")
    codes = tokenizer.img_to_codes(images)
    recon = tokenizer.codes_to_img(codes)
    train_images, _ = read_image_folder(paths.digits / "train")
    used = torch.cat([c.flatten() for c in tokenizer.img_to_codes(train_images)]).unique().numel()
    report = {
        "reconstruction_judged_accuracy": judge_accuracy((recon + 1) / 2, labels),
        "reconstruction_l1": float((recon - images).abs().mean()),
        "codes_used_fraction": used / tokenizer.vocab_size,
    }
    logger.info("VQVAE tokenizer: judge on reconstructions %.1f%%, L1 %.4f, %.0f%% of the codes used",
                100 * report["reconstruction_judged_accuracy"], report["reconstruction_l1"],
                100 * report["codes_used_fraction"])
    return report
