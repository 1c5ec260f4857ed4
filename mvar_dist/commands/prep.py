"""``mvar-dist prep``: tokenize an image folder into code shards, then merge the manifest.

Single node::

    mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth

As a SLURM array (``--task-id/--num-tasks`` default to SLURM_ARRAY_TASK_ID/_COUNT), then merge::

    sbatch --array=0-31 --wrap "mvar-dist prep /data/imagenet/train --split train --out /data/codes --tokenizer ..."
    mvar-dist prep --merge --split train --out /data/codes
"""

from __future__ import annotations

from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.data_prep.pipeline import prep_parser, run_prep


@reports("prep", FileNotFoundError, ValueError, RuntimeError, code=2)
def main(argv: Sequence[str]) -> int:
    args = prep_parser().parse_args(list(argv))
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
