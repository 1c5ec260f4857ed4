"""``mvar-dist prep`` as a SLURM job array (``mvar-dist submit-prep``), one task per share of
the shards, then the manifest merge as a job that starts only when every task succeeded (afterok).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import submitit

from mvar_dist.config import LaunchConfig, LaunchError, validate_launch
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.pipeline import prep_parser, run_prep
from mvar_dist.launch import sbatch
from mvar_dist.launch.slurm import job_folder, make_executor, slurm_parameters
from mvar_dist.launch.status import write_job_record
from mvar_dist.state_files import ChecksumMismatch
from mvar_dist.tokenizer.export_files import resolve_checkpoint, verify_checkpoint


@dataclass
class PrepTask(submitit.helpers.Checkpointable):
    """One array task: ``mvar-dist prep`` on the shards ``s`` with ``s % num_tasks == task_id``.

    Checkpointable so that a time limit requeues it too: prep skips the shards it completed.
    """

    prep_argv: list[str]
    task_id: int
    num_tasks: int

    def __call__(self) -> int:
        argv = [*self.prep_argv, "--task-id", str(self.task_id), "--num-tasks", str(self.num_tasks), "--no-merge"]
        run_prep(prep_parser().parse_args(argv))
        return 0


def merge_manifest_job(out_dir: str, split: str) -> str:
    return str(merge_manifest(out_dir, split))


def prep_target(prep_argv: list[str]) -> argparse.Namespace:
    """Parse the prep options with prep's own parser; check what a task would find missing."""
    parsed = prep_parser().parse_args(prep_argv)
    if parsed.merge:
        raise LaunchError("submit-prep runs the merge itself after the array; drop --merge")
    if not parsed.source or not Path(parsed.source).is_dir():
        raise LaunchError(f"prep source {parsed.source!r} is not a directory")
    if not parsed.tokenizer or not Path(parsed.tokenizer).exists():
        raise LaunchError(f"--tokenizer {parsed.tokenizer!r}: file not found")
    try:  # a directory that is no export, or a damaged export file, would fail every task: say so now
        tokenizer = resolve_checkpoint(parsed.tokenizer)
        if not parsed.no_verify:
            verify_checkpoint(tokenizer)
    except (FileNotFoundError, ChecksumMismatch) as error:
        raise LaunchError(str(error)) from None
    return parsed


def resolve(args: argparse.Namespace) -> LaunchConfig:
    """The array's resources from ``submit-prep``'s options (see the command's parser)."""
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
    folder = job_folder(run_dir)
    params = slurm_parameters(launch)
    array = sbatch.render(params, folder, array_tasks=num_tasks, parallelism=parallelism)
    merge_params = dict(params, job_name=f"{launch.job_name}-merge", dependency="afterok:<ARRAY_JOB_ID>")
    merge_params.pop("gpus_per_node", None)
    return array, sbatch.render(merge_params, folder)


def submit_prep(launch: LaunchConfig, prep_argv: list[str], out_dir: Path, split: str, num_tasks: int,
                parallelism: int, argv: Sequence[str]) -> dict[str, Any]:
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
