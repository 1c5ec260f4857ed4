"""``mvar-dist prep``: tokenize an image folder into code shards, then merge the manifest.

Single node::

    mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth

As a SLURM array (``--task-id/--num-tasks`` default to SLURM_ARRAY_TASK_ID/_COUNT), then merge::

    sbatch --array=0-31 --wrap "mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer ..."
    mvar-dist prep --merge --split train --out /data/codes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _patch_nums(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def _classes_from(path: str) -> tuple[str, ...]:
    from mvar_dist.data_prep.sources import class_folders

    target = Path(path)
    if target.is_dir() and not (target / "manifest.json").is_file():
        return class_folders(target)
    manifest = target / "manifest.json" if target.is_dir() else target
    return tuple(json.loads(manifest.read_text())["classes"])


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(prog="mvar-dist prep", description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", nargs="?", help="class-per-folder image directory (e.g. imagenet/train), or a flat folder with --val-labels"
    )
    parser.add_argument("--out", required=True, help="output directory; shards go to OUT/<split>/")
    parser.add_argument("--split", required=True, help="split name, e.g. train or val")
    parser.add_argument("--name", default="imagenet", help="shard name prefix: <name>-<split>-000000.tar")
    parser.add_argument("--merge", action="store_true", help="only merge the per-shard records into OUT/<split>/manifest.json")
    parser.add_argument("--no-merge", action="store_true", help="do not merge at the end even when --num-tasks is 1")
    parser.add_argument("--val-labels", help="label file for a flat folder ('<image> <synset>' lines or one synset per line)")
    parser.add_argument("--classes-from", help="class folder or manifest whose class list to use (give val the train classes)")
    parser.add_argument("--tokenizer", help="tokenizer checkpoint (.pth or .safetensors)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--z-channels", type=int, default=32)
    parser.add_argument("--ch", type=int, default=160)
    parser.add_argument("--patch-nums", type=_patch_nums, default=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    parser.add_argument(
        "--tokenizer-options", type=json.loads, default={},
        help='more MultiScaleVQVAE kwargs as JSON, e.g. \'{"ch_mult": [1, 2]}\'',
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call (x2 with the flips)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--decode-threads", type=int, default=None, help="JPEG decoding threads (default min(8, cpus))")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the image order across shards (classes mix)")
    parser.add_argument("--task-id", type=int, default=int(env.get("SLURM_ARRAY_TASK_ID", 0)))
    parser.add_argument("--num-tasks", type=int, default=int(env.get("SLURM_ARRAY_TASK_COUNT", 1)))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mvar_dist.data_prep.manifest import merge_manifest

    if args.merge:
        path = merge_manifest(args.out, args.split)
        print(f"wrote {path}")
        return 0
    if not args.source or not args.tokenizer:
        raise SystemExit("mvar-dist prep: SOURCE and --tokenizer are required (or pass --merge)")

    import torch

    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    classes = _classes_from(args.classes_from) if args.classes_from else None
    if args.val_labels:
        source = sources.list_flat_folder(args.source, args.val_labels, classes, args.order_seed)
    else:
        source = sources.list_class_folder(args.source, classes, args.order_seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tokenizer = MultiScaleVQVAE.from_checkpoint(
        args.tokenizer, vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, patch_nums=args.patch_nums,
        **args.tokenizer_options,
    ).to(device)
    logger.info("%d images in %d classes from %s; tokenizing on %s", len(source.records), len(source.classes), source.root, device)
    summary = shard_dataset(
        source, args.out, tokenizer, name=args.name, split=args.split, shard_size=args.shard_size,
        batch_size=args.batch_size, task_id=args.task_id, num_tasks=args.num_tasks, order_seed=args.order_seed,
        decode_threads=args.decode_threads, progress=not args.no_progress,
    )
    print(
        f"task {args.task_id}/{args.num_tasks}: wrote {len(summary.shards_written)} shards ({summary.images_written} images, "
        f"{summary.images_failed} unreadable), {len(summary.shards_skipped)} already complete"
    )
    if args.num_tasks == 1 and not args.no_merge:
        print(f"wrote {merge_manifest(args.out, args.split)}")
    elif args.num_tasks > 1:
        print(f"when all {args.num_tasks} tasks are done: mvar-dist prep --merge --split {args.split} --out {args.out}")
    return 0
