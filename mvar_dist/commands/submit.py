"""``mvar-dist submit``: submit a training run to SLURM with submitit (``--dry-run``: print the
sbatch script). Resources default to the experiment's ``launch`` section; flags override it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.config import ConfigError, ExperimentConfig, LaunchConfig, LaunchError
from mvar_dist.launch.slurm import sbatch_script
from mvar_dist.launch.submit import prepare, submit
from mvar_dist.tracking.run_record import (
    mlflow_link,
    read_run_record,
    resolve_tracking_uri,
)

# CLI flag -> LaunchConfig field; a flag left out keeps the config's value
FLAGS: dict[str, tuple[str, type, str]] = {
    "--nodes": ("nodes", int, "number of nodes"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node; one task (rank) per GPU"),
    "--tasks-per-node": ("tasks_per_node", int, "ranks per node for CPU jobs"),
    "--cpus-per-task": ("cpus_per_task", int, "CPUs per rank (data workers + 1)"),
    "--mem": ("mem", str, "memory per node, e.g. 64G"),
    "--time": ("time", int, "time limit in minutes"),
    "--partition": ("partition", str, "partition (unset: the cluster's default)"),
    "--account": ("account", str, "account to charge"),
    "--qos": ("qos", str, "quality of service"),
    "--constraint": ("constraint", str, "node features, e.g. a100"),
    "--max-requeues": ("max_requeues", int, "how often the job may requeue itself (preemption, time limit)"),
    "--job-name": ("job_name", str, "SLURM job name"),
    "--signal-delay": ("signal_delay_s", int, "seconds before the time limit to signal a checkpoint"),
    "--cluster": ("cluster", str, "slurm, local (subprocesses here) or debug (in this process)"),
    "--gpu-memory": ("gpu_memory", str, "memory of one GPU, e.g. 80GB: caps micro_batch_size auto at what "
                                        "mvar-dist plan finds fits"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist submit", formatter_class=HelpFormatter,
        description="Submit a training run to SLURM with submitit, or print its sbatch script with --dry-run.\n"
                    "Resources default to the experiment's launch section; each flag given overrides one field.",
        epilog="exit status: 0 submitted (or printed); 2 a user error (the config, a flag, a partition or\n"
               "resources the cluster does not have), with nothing submitted.",
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. configs/mvar_d16.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    for flag, (field_, kind, help_) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{help_} (default: launch.{field_} of the experiment)")
    parser.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                        help="whole nodes for this job (default: launch.exclusive of the experiment)")
    parser.add_argument("--slurm-setup", action="append", default=None, metavar="LINE",
                        help="shell line run before srun; repeat for several (default: launch.slurm_setup of the experiment, "
                             "which the flags replace)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    return parser


@reports("submit", ConfigError, LaunchError)
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    changes = {field_: getattr(args, flag[2:].replace("-", "_")) for flag, (field_, _, _) in FLAGS.items()}
    changes.update(exclusive=args.exclusive, slurm_setup=args.slurm_setup)
    config, launch = prepare(args.config, args.overrides, changes, dry_run=args.dry_run)
    if args.dry_run:
        if launch.cluster != "slurm":
            raise LaunchError("--dry-run prints the sbatch script, which only --cluster slurm has")
        print(sbatch_script(launch, config.run.dir), end="")
        # stderr: stdout is the script, usable as it is
        print(f"batch split: {config.train.batch_split(launch.world_size).describe()}", file=sys.stderr)
        return 0
    record = submit(config, launch, argv)
    print(format_submission(config, launch, record))
    return 0


def format_submission(config: ExperimentConfig, launch: LaunchConfig, record: dict[str, Any]) -> str:
    run_dir = Path(config.run.dir)
    lines = [
        f"submitted job {record['job_id']} ({launch.world_size} ranks on {launch.nodes} node(s), "
        f"cluster {launch.cluster}, partition {launch.partition or 'default'})",
        f"batch split: {config.train.batch_split(launch.world_size).describe()}",
        f"job folder: {record['folder']}",
        f"logs:       {record['stdout']}",
        f"            {record['stderr']}  (task N: {record['job_id']}_N_log.*)",
    ]
    existing = read_run_record(run_dir)
    if existing is not None:  # a resubmission continues this run
        lines.append(f"MLflow run: {mlflow_link(existing.tracking_uri, existing.experiment_id, existing.run_id)}")
    else:
        uri = resolve_tracking_uri(config.tracking.uri, run_dir)
        lines.append(f"MLflow run: created when the job starts, experiment {config.tracking.experiment!r} at {uri}")
    lines.append(f"status:     mvar-dist status {run_dir}")
    return "\n".join(lines)
