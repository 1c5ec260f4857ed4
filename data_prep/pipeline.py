"""The prep pipeline behind ``mvar-dist prep`` and ``submit-prep``'s array tasks: its options,
and one run (list the images, load the tokenizer, write this task's shards, merge when alone).

Stopping: SLURM sends SIGUSR2 before the time limit (``--signal``) and SIGTERM on preemption or
``scancel``. While writing shards, prep catches both (where nothing else, e.g. submitit, has a
handler for them): it drops the shard in progress at the next tokenizer batch, keeps the finished
shards and their records, and exits with ``EXIT_STOPPED`` (75), which ``slurm/prep_array.sbatch``
answers with ``scontrol requeue``. A rerun skips the finished shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on a signal, finished shards kept; run again to continue
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PrepStopped(SystemExit):
    """Prep stopped on a signal; the process exits with ``EXIT_STOPPED`` (a SystemExit, so that
    the command line returns that code whoever calls :func:`run_prep`)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(EXIT_STOPPED)
        self.signal_name = signal_name


class StopRequest:
    """Set by a stop signal; prep polls it (``request()``) between tokenizer batches."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None

    def handle(self, number: int, frame: FrameType | None) -> None:
        # only record it: the writer decides where stopping is safe
        self.signal_name = self.signal_name or signal.Signals(number).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch STOP_SIGNALS while the block runs, restoring the previous handlers after it. A signal
    whose handler is not the default one (submitit's, a caller's) is left alone, as are all
    signals outside the main thread (where Python cannot install handlers)."""
    request = StopRequest()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            if signal.getsignal(number) == signal.SIG_DFL:
                previous[number] = signal.signal(number, request.handle)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _patch_nums(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def _classes_from(path: str) -> tuple[str, ...]:
    """The class list of a class-per-folder tree, or of a manifest (file or split directory)."""
    from mvar_dist.data_prep.sources import class_folders
    from mvar_dist.shards.manifest import MANIFEST_NAME, manifest_classes

    target = Path(path)
    if target.is_dir() and not (target / MANIFEST_NAME).is_file():
        return class_folders(target)
    return manifest_classes(target)


def prep_parser() -> argparse.ArgumentParser:
    """The options of ``mvar-dist prep`` (``submit-prep`` passes them through to every task)."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="mvar-dist prep", description="Tokenize an image folder into WebDataset code shards, then merge the manifest.")
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
    parser.add_argument("--tokenizer",
                        help="tokenizer checkpoint (.pth or .safetensors), or a tokenizer export directory (its tokenizer.safetensors)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking a tokenizer export's file against the sha256 its config.json records (faster)")
    # architecture flags default to the released tokenizer, or to what a .safetensors file records
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="codebook size (default: what a .safetensors tokenizer records, else 4096)")
    parser.add_argument("--z-channels", type=int, default=None,
                        help="latent channels (default: what a .safetensors tokenizer records, else 32)")
    parser.add_argument("--ch", type=int, default=None,
                        help="base channels (default: what a .safetensors tokenizer records, else 160)")
    parser.add_argument("--patch-nums", type=_patch_nums, default=None,
                        help="scales (default: what a .safetensors tokenizer records, else 1,2,3,4,5,6,8,10,13,16)")
    parser.add_argument(
        "--tokenizer-options", type=json.loads, default={},
        help='more MultiScaleVQVAE kwargs as JSON, e.g. \'{"ch_mult": [1, 2]}\'',
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call (x2 with the flips)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--decode-threads", type=int, default=None, help="JPEG decoding threads (default min(8, cpus))")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the image order across shards (classes mix)")
    parser.add_argument("--task-id", type=int, default=int(env.get("SLURM_ARRAY_TASK_ID", 0)),
                        help="this task's index among --num-tasks (default: $SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-tasks", type=int, default=int(env.get("SLURM_ARRAY_TASK_COUNT", 1)),
                        help="tasks that share the shards (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def run_prep(args: argparse.Namespace) -> dict[str, Any]:
    """Do what ``args`` (parsed by :func:`prep_parser`) asks; returns what happened."""
    from mvar_dist.data_prep.merge import merge_manifest

    if args.merge:
        return {"manifest": str(merge_manifest(args.out, args.split))}
    if not args.source or not args.tokenizer:
        raise ValueError("SOURCE and --tokenizer are required (or pass --merge)")

    with stop_on_signals() as stop:
        return _tokenize_and_merge(args, stop)


def _tokenize_and_merge(args: argparse.Namespace, stop: StopRequest) -> dict[str, Any]:
    """List, tokenize this task's shards, merge when alone; PrepStopped once ``stop`` is set."""
    import torch

    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import load_tokenizer

    classes = _classes_from(args.classes_from) if args.classes_from else None
    if args.val_labels:
        source = sources.list_flat_folder(args.source, args.val_labels, classes, args.order_seed)
    else:
        source = sources.list_class_folder(args.source, classes, args.order_seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    flags = dict(vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, patch_nums=args.patch_nums)
    options = {k: v for k, v in flags.items() if v is not None}
    tokenizer = load_tokenizer(args.tokenizer, "vqvae", {**options, **args.tokenizer_options}, device,
                               verify=not args.no_verify)
    logger.info("%d images in %d classes from %s; tokenizing on %s", len(source.records), len(source.classes), source.root, device)
    summary = shard_dataset(
        source, args.out, tokenizer, name=args.name, split=args.split, shard_size=args.shard_size,
        batch_size=args.batch_size, task_id=args.task_id, num_tasks=args.num_tasks, order_seed=args.order_seed,
        decode_threads=args.decode_threads, progress=not args.no_progress, stop=stop,
    )
    if summary.stopped:
        logger.warning(
            "stopped by %s: wrote %d shards in this run and dropped the one in progress; finished shards and their "
            "records are kept, so rerun the same command to continue (exit code %d)",
            stop.signal_name, len(summary.shards_written), EXIT_STOPPED,
        )
        raise PrepStopped(str(stop.signal_name))
    result: dict[str, Any] = {"summary": summary}
    if args.num_tasks == 1 and not args.no_merge:
        result["manifest"] = str(merge_manifest(args.out, args.split))
    return result
