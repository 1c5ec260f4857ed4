"""``mvar-dist sample``: class-conditional samples of an exported model, as a PNG grid or as the
``.npz`` sample batch of the ADM (guided-diffusion) FID/IS evaluator.

Sampling settings: command-line flags, else the ``sample`` section that ``mvar-dist export``
records in config.json (the training config's published settings), else the defaults of
:func:`mvar_dist.model.generate.generate`. The tokenizer must be the one the model was trained with;
it is checked against the identity recorded in config.json before any sampling.

Seeds: batch ``b`` uses a seed derived from ``(--seed, b)`` (:mod:`mvar_dist.sampling.batches`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.model.pretrained import read_export_metadata
from mvar_dist.sampling.batches import (
    PRECISIONS,
    parse_classes,
    resolve_settings,
    sample_batches,
)
from mvar_dist.sampling.exported import load_exported
from mvar_dist.sampling.images import NpzSampleWriter, compose_grid, write_png

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist sample", formatter_class=HelpFormatter,
        description="Sample an exported model: a PNG grid (one row per class) or, with --npz, the ADM evaluator's\n"
                    "sample batch. Sampling settings come from the flags, else from the sample section that\n"
                    "mvar-dist export recorded in config.json, else from generate's defaults.",
        epilog="exit status: 0 written; 2 a user error (a path, a flag, a tokenizer that does not match the model).",
    )
    parser.add_argument("--model", type=Path, required=True, help="directory written by 'mvar-dist export'")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the weights, and a tokenizer export's file, against the sha256 their "
                             "config.json records (faster for large models)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: the one recorded in config.json)")
    parser.add_argument("--classes", help="class ids, e.g. 0,1,207 or 0-9 (default: every class of the model)")
    parser.add_argument("--per-class", type=int, help="images per class (default: 8 for a grid; with --npz, --num / the number of classes)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: config.json, else 2.7)")
    parser.add_argument("--top-k", type=int, help="top-k filtering, 0 disables (default: config.json, else 1200)")
    parser.add_argument("--top-p", type=float, help="top-p filtering, 0 disables (default: config.json, else 0.99)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; batch b uses a seed derived from (seed, b)")
    parser.add_argument("--out", type=Path, required=True, help="output .png (grid) or .npz (with --npz)")
    parser.add_argument("--npz", action="store_true", help="write arr_0 = uint8 (N, H, W, 3), classes in order")
    parser.add_argument("--num", type=int, help="--npz: total number of images (default: 50000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generate call")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype of the transformer")
    parser.add_argument("--padding", type=int, default=2, help="grid: white pixels between images")
    parser.add_argument("--allow-other-tokenizer-weights", action="store_true",
                        help="accept a tokenizer whose class and config match but whose weights hash differs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def labels_for(args: argparse.Namespace, num_classes: int) -> tuple[list[int], int]:
    """Labels in class order (each class repeated per-class times), and the number of rows."""
    classes = parse_classes(args.classes, num_classes) if args.classes else list(range(num_classes))
    per_class = args.per_class
    if args.npz:
        if args.num is not None and per_class is not None and args.num != per_class * len(classes):
            raise ValueError(f"--num {args.num} != --per-class {per_class} x {len(classes)} classes; give one of them")
        if per_class is None:
            num = 50_000 if args.num is None else args.num
            if num % len(classes):
                raise ValueError(f"--num {num} is not divisible by the {len(classes)} classes; the evaluator wants equal counts per class")
            per_class = num // len(classes)
    elif args.num is not None:
        raise ValueError("--num only applies with --npz; use --per-class for a grid")
    per_class = 8 if per_class is None else per_class
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    return [c for c in classes for _ in range(per_class)], len(classes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> str:
    """Do the sampling; returns the summary line."""
    metadata = read_export_metadata(args.model)
    labels, rows = labels_for(args, int(metadata["model"]["num_classes"]))
    settings = resolve_settings(metadata.get("sample"), args.cfg, args.top_k, args.top_p)
    device = resolve_device(args.device)
    model, tokenizer, metadata = load_exported(args.model, args.tokenizer, device, args.allow_other_tokenizer_weights,
                                             verify=not args.no_verify)
    logger.info("sampling %d images on %s with %s, seed %d", len(labels), device, settings.kwargs() or "generate's defaults", args.seed)
    batches = sample_batches(model, tokenizer, labels, args.batch_size, args.seed, settings, device, args.precision,
                             progress=not args.no_progress)
    shown = ", ".join(f"{k}={v}" for k, v in settings.kwargs().items()) or "default settings"
    if args.npz:
        writer = None
        try:
            for images in batches:
                if writer is None:
                    writer = NpzSampleWriter(args.out, len(labels), images.shape[1], images.shape[2])
                writer.write(images)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        writer.close()
        return f"wrote {args.out}: arr_0 uint8 {writer.shape} ({rows} classes x {len(labels) // rows}; {shown}; seed {args.seed})"
    images = np.concatenate(list(batches))
    write_png(compose_grid(images, rows, args.padding), args.out)
    return f"wrote {args.out}: {rows} classes x {len(labels) // rows} images of {images.shape[1]}x{images.shape[2]} px ({shown}; seed {args.seed})"


@reports("sample", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    print(run(args))
    return 0
