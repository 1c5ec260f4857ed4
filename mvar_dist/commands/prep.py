"""``mvar-dist prep``: tokenize an image folder into code shards, then merge the manifest; the
examples are in ``EPILOG``, shown by ``mvar-dist prep --help``."""

from __future__ import annotations

import argparse
from typing import Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.data_prep.pipeline import EXIT_STOPPED, prep_parser, run_prep

EPILOG = f"""examples:
  single node:
    mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth
  as a SLURM array (--task-id/--num-tasks default to SLURM_ARRAY_TASK_ID/_COUNT), then merge:
    sbatch --array=0-31 --wrap "mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer ..."
    mvar-dist prep --merge --split train --out /data/codes
  (mvar-dist submit-prep does both.)

exit status: 0 done; 2 a user error (a path, a flag, images or a tokenizer that do not fit);
{EXIT_STOPPED} stopped by SIGUSR2/SIGTERM with finished shards kept: rerun the same command to continue."""


def build_parser() -> argparse.ArgumentParser:
    parser = prep_parser()
    parser.formatter_class = HelpFormatter
    parser.description = ("Tokenize an image folder into WebDataset code shards, then merge the per-shard records\n"
                          "into OUT/<split>/manifest.json (--merge: only merge).")
    parser.epilog = EPILOG
    return parser


@reports("prep", FileNotFoundError, ValueError, RuntimeError)
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    result = run_prep(args)
    summary = result.get("summary")
    if summary is not None:
        print(
            f"task {args.task_id}/{args.num_tasks}: wrote {len(summary.shards_written)} shards ({summary.images_written} images, "
            f"{summary.images_failed} unreadable), {len(summary.shards_skipped)} already complete"
        )
    if "manifest" in result:
        print(f"wrote {result['manifest']}")
    elif args.num_tasks > 1:
        print(f"when all {args.num_tasks} tasks are done: mvar-dist prep --merge --split {args.split} --out {args.out}")
    return 0
