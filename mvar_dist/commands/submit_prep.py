"""``mvar-dist submit-prep``: run ``mvar-dist prep`` as a SLURM job array, then merge the manifest
in a dependent job. Every option that is not a SLURM one goes to ``mvar-dist prep`` unchanged::

    mvar-dist submit-prep --array-tasks 32 --gpus-per-node 1 --time 240 -- \\
        /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.config import LaunchError
from mvar_dist.launch.prep_array import array_scripts, prep_target, resolve, submit_prep
from mvar_dist.launch.slurm import check_partition, check_resources


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist submit-prep", formatter_class=HelpFormatter,
        description="Run mvar-dist prep as a SLURM job array, then merge the manifest in a dependent job.\n"
                    "The options below are SLURM's; every other option goes to mvar-dist prep unchanged.",
        epilog="example:\n"
               "  mvar-dist submit-prep --array-tasks 32 --gpus-per-node 1 --time 240 -- \\\n"
               "      /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth\n\n"
               "The prep options are those of 'mvar-dist prep' (see mvar-dist prep --help).\n"
               "exit status: 0 submitted (or printed); 2 a user error (a flag, the prep options, a partition\n"
               "or resources the cluster does not have), with nothing submitted.",
    )
    parser.add_argument("--array-tasks", type=int, required=True, help="number of array tasks")
    parser.add_argument("--array-parallelism", type=int, default=256, help="at most this many tasks at once")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per task (0 or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=4, help="CPUs per task (JPEG decoding threads)")
    parser.add_argument("--mem", default=None, help="memory per task, e.g. 32G; unset: the partition's default")
    parser.add_argument("--time", type=int, default=240, help="time limit per task in minutes")
    parser.add_argument("--partition", default=None, help="partition; unset: the cluster's default partition")
    parser.add_argument("--account", default=None, help="account to charge")
    parser.add_argument("--qos", default=None, help="quality of service")
    parser.add_argument("--constraint", default=None, help="node features, e.g. a100")
    parser.add_argument("--job-name", default="mvar-dist-prep", help="SLURM job name")
    parser.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                        help="shell line run before srun; repeat for several")
    parser.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues per task")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                        help="slurm, local (subprocesses here) or debug (in this process)")
    parser.add_argument("--dry-run", action="store_true", help="print both sbatch scripts and exit")
    return parser


@reports("submit-prep", LaunchError)
def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    args, prep_argv = build_parser().parse_known_args(argv)
    prep_argv = [a for a in prep_argv if a != "--"]
    launch = resolve(args)
    parsed = prep_target(prep_argv)
    if launch.cluster == "slurm" and not args.dry_run:
        check_partition(launch.partition)
        check_resources(launch)  # a task no node can run would pend forever
    out_dir = Path(parsed.out).absolute()
    run_dir = out_dir / parsed.split
    if args.dry_run:
        array, merge = array_scripts(launch, run_dir, args.array_tasks, args.array_parallelism)
        print(f"# ---- array job ----\n{array}\n# ---- merge job ----\n{merge}", end="")
        return 0
    record = submit_prep(launch, prep_argv, out_dir, parsed.split, args.array_tasks, args.array_parallelism, argv)
    print(f"submitted prep array {record['job_id']} ({args.array_tasks} tasks) and merge job {record['merge_job_id']} (afterok)")
    print(f"logs:   {record['stdout']}")
    print(f"status: mvar-dist status {run_dir}")
    return 0
