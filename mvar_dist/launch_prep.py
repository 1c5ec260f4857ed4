"""``mvar-dist submit-prep``: ``mvar-dist prep`` as a SLURM job array, one task per share of the
shards, then the manifest merge as a job that starts only when every task succeeded (afterok).

Every option that is not a SLURM one goes to ``mvar-dist prep`` unchanged::

    mvar-dist submit-prep --array-tasks 32 --gpus-per-node 1 --time 240 -- \\
        /data/imagenet/train --split train --out /data/codes --tokenizer vae_ch160v4096z32.pth

The record for ``mvar-dist status OUT/SPLIT`` is ``OUT/SPLIT/slurm_job.json``; job folders and
logs are under ``OUT/SPLIT/slurm/``. A task that is preempted or hits its time limit requeues
itself and skips the shards it already finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import submitit

from mvar_dist.launch import (
    LaunchConfig, LaunchError, check_partition, job_folder, make_executor, slurm_parameters, validate_launch,
)


@dataclass
class PrepTask(submitit.helpers.Checkpointable):
    """One array task: ``mvar-dist prep`` on the shards ``s`` with ``s % num_tasks == task_id``.

    Checkpointable so that a time limit requeues it too: prep skips the shards it completed.
    """

    prep_argv: list[str]
    task_id: int
    num_tasks: int

    def __call__(self) -> int:
        from mvar_dist.data_prep.cli import main as prep_main

        argv = [*self.prep_argv, "--task-id", str(self.task_id), "--num-tasks", str(self.num_tasks), "--no-merge"]
        code = prep_main(argv)
        if code:
            raise RuntimeError(f"prep task {self.task_id}/{self.num_tasks} exited with code {code}")
        return code


def merge_manifest_job(out_dir: str, split: str) -> str:
    from mvar_dist.data_prep.manifest import merge_manifest

    return str(merge_manifest(out_dir, split))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist submit-prep", description=__doc__.split("\n\n")[0],
        epilog="All other options are those of 'mvar-dist prep' (see mvar-dist prep --help).",
    )
    parser.add_argument("--array-tasks", type=int, required=True, help="number of array tasks")
    parser.add_argument("--array-parallelism", type=int, default=256, help="at most this many tasks at once")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per task (0 or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=4, help="CPUs per task (JPEG decoding threads)")
    parser.add_argument("--mem", default=None, help="memory per task, e.g. 32G")
    parser.add_argument("--time", type=int, default=240, help="time limit per task in minutes")
    for flag in ("--partition", "--account", "--qos", "--constraint"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--job-name", default="mvar-dist-prep")
    parser.add_argument("--slurm-setup", action="append", default=[], metavar="LINE", help="shell line before srun")
    parser.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues per task")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"))
    parser.add_argument("--dry-run", action="store_true", help="print both sbatch scripts and exit")
    return parser


def _prep_target(prep_argv: list[str]) -> argparse.Namespace:
    """Parse the prep options with prep's own parser; check what a task would find missing."""
    from mvar_dist.data_prep.cli import build_parser as prep_parser

    parsed = prep_parser().parse_args(prep_argv)
    if parsed.merge:
        raise LaunchError("submit-prep runs the merge itself after the array; drop --merge")
    if not parsed.source or not Path(parsed.source).is_dir():
        raise LaunchError(f"prep source {parsed.source!r} is not a directory")
    if not parsed.tokenizer or not Path(parsed.tokenizer).is_file():
        raise LaunchError(f"--tokenizer {parsed.tokenizer!r}: file not found")
    return parsed


def resolve(args: argparse.Namespace) -> LaunchConfig:
    if args.array_tasks < 1:
        raise LaunchError(f"--array-tasks must be >= 1, got {args.array_tasks}")
    if args.gpus_per_node not in (0, 1):
        raise LaunchError(f"--gpus-per-node must be 0 or 1 for prep (one tokenizer per task), got {args.gpus_per_node}")
    launch = LaunchConfig(
        nodes=1, gpus_per_node=args.gpus_per_node, tasks_per_node=1, cpus_per_task=args.cpus_per_task,
        mem=args.mem, time=args.time, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, max_requeues=args.max_requeues, job_name=args.job_name,
        slurm_setup=list(args.slurm_setup), signal_delay_s=min(120, args.time * 30), cluster=args.cluster,
    )
    validate_launch(launch)
    return launch


def array_scripts(launch: LaunchConfig, run_dir: Path, num_tasks: int, parallelism: int) -> tuple[str, str]:
    """The sbatch scripts of the array and of the merge job (dependency shown as <ARRAY_JOB_ID>)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(run_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = slurm_parameters(launch)
    array = _make_sbatch_string(command=command, folder=folder, map_count=num_tasks,
                                array_parallelism=parallelism, **params)
    merge_params = dict(params, job_name=f"{launch.job_name}-merge", dependency="afterok:<ARRAY_JOB_ID>")
    merge_params.pop("gpus_per_node", None)
    merge = _make_sbatch_string(command=command, folder=folder, **merge_params)
    return array, merge


def submit_prep(launch: LaunchConfig, prep_argv: list[str], out_dir: Path, split: str, num_tasks: int,
                parallelism: int, argv: Sequence[str]) -> dict[str, Any]:
    from mvar_dist.slurm_status import write_job_record

    run_dir = out_dir / split
    executor = make_executor(launch, run_dir)
    if launch.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=parallelism)
    tasks = [PrepTask(prep_argv, i, num_tasks) for i in range(num_tasks)]
    jobs = executor.submit_array(tasks)
    array_id = str(jobs[0].job_id).split("_")[0]
    merge_launch = dataclasses.replace(launch, gpus_per_node=0, job_name=f"{launch.job_name}-merge")
    merge_executor = make_executor(merge_launch, run_dir)
    if launch.cluster == "slurm":
        merge_executor.update_parameters(slurm_dependency=f"afterok:{array_id}")
    else:  # local/debug have no dependencies: wait here
        for job in jobs:
            job.result()
    merge = merge_executor.submit(merge_manifest_job, str(out_dir), split)
    record = {
        "kind": "prep", "job_id": array_id, "merge_job_id": str(merge.job_id), "cluster": launch.cluster,
        "num_tasks": num_tasks, "folder": str(jobs[0].paths.folder.parent),
        "stdout": str(jobs[0].paths.stdout).replace(f"{array_id}_0", f"{array_id}_<task>"),
        "stderr": str(jobs[0].paths.stderr).replace(f"{array_id}_0", f"{array_id}_<task>"),
        "merge_stdout": str(merge.paths.stdout), "command": ["mvar-dist", "submit-prep", *argv],
    }
    write_job_record(run_dir, record)
    if launch.cluster == "debug":
        record["manifest"] = merge.result()
    return record


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    args, prep_argv = build_parser().parse_known_args(argv)
    prep_argv = [a for a in prep_argv if a != "--"]
    try:
        launch = resolve(args)
        parsed = _prep_target(prep_argv)
        if launch.cluster == "slurm" and not args.dry_run:
            check_partition(launch.partition)
    except LaunchError as err:
        print(f"mvar-dist submit-prep: {err}", file=sys.stderr)
        return 2
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
