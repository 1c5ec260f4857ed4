"""``mvar-dist submit``: SLURM resources (:class:`LaunchConfig`, the experiment's ``launch``
section), checks before submitting, the sbatch script, and the submitit executor.

What runs inside the job is :mod:`mvar_dist.slurm_job`. This module imports only the standard
library at import time: ``mvar_dist.config`` embeds :class:`LaunchConfig` (so importing config
from here must wait until a function runs), and loading a config should not pull in submitit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

if TYPE_CHECKING:
    from mvar_dist.config import ExperimentConfig

logger = logging.getLogger(__name__)

JOB_FOLDER = "slurm/%j"  # per job id under the run dir; a requeued job keeps its id and folder
_MEM_PATTERN = re.compile(r"^[0-9]+[KMGT]?B?$", re.IGNORECASE)


class LaunchError(ValueError):
    """Bad launch input, found before anything is submitted."""


@dataclass
class LaunchConfig:
    """The ``launch`` section: SLURM resources. CLI flags of ``mvar-dist submit`` override it."""

    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU
    tasks_per_node: int | None = None  # CPU ranks per node; None: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1
    mem: str | None = None  # per node, sbatch syntax ("64G"); None: the partition default
    time: int = 60  # minutes
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    max_requeues: int = 10  # preemptions + time limits this job may requeue itself after
    job_name: str = "mvar-dist"
    slurm_setup: list[str] = field(default_factory=list)  # shell lines before srun (modules, env)
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to save a checkpoint
    cluster: Literal["slurm", "local", "debug"] = "slurm"

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def validate_launch(launch: LaunchConfig) -> None:
    """Checks that need no cluster; messages name the flag and the config field."""
    for name in ("nodes", "cpus_per_task", "time"):
        value = getattr(launch, name)
        if value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 1, got {value}")
    for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
        value = getattr(launch, name)
        if value < 0:
            raise LaunchError(f"--{name.replace('_', '-')} (launch.{name}) must be >= 0, got {value}")
    if launch.tasks_per_node is not None:
        if launch.tasks_per_node < 1:
            raise LaunchError(f"--tasks-per-node (launch.tasks_per_node) must be >= 1, got {launch.tasks_per_node}")
        if launch.gpus_per_node and launch.tasks_per_node != launch.gpus_per_node:
            raise LaunchError(
                f"--tasks-per-node={launch.tasks_per_node} with --gpus-per-node={launch.gpus_per_node}: "
                "GPU jobs run one task per GPU; drop --tasks-per-node (it is for CPU ranks)"
            )
    if launch.mem is not None and not _MEM_PATTERN.match(launch.mem):
        raise LaunchError(f"--mem (launch.mem) must look like 64G or 500M, got {launch.mem!r}")
    if launch.signal_delay_s >= launch.time * 60:
        raise LaunchError(
            f"--signal-delay={launch.signal_delay_s}s is not shorter than --time={launch.time} min: "
            "the job would be signalled before it starts working"
        )
    if launch.cluster not in ("slurm", "local", "debug"):
        raise LaunchError(f"--cluster (launch.cluster) must be slurm, local or debug, got {launch.cluster!r}")
    if launch.cluster != "slurm" and launch.nodes != 1:
        raise LaunchError(f"--cluster {launch.cluster} runs on this machine only: use --nodes 1")
    if launch.time <= 10:
        # submitit's has_timed_out() is always true then, so preemptions count as timeouts
        logger.warning("--time=%d min <= 10: every preemption counts against max_requeues as a timeout", launch.time)


def check_partition(partition: str | None) -> None:
    """Fail before submitting when sinfo is missing or does not know the partition."""
    try:
        listing = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise LaunchError("sinfo not found: this machine is not a SLURM client; use --cluster local") from None
    if listing.returncode != 0:
        raise LaunchError(f"sinfo failed (is slurmctld up?): {listing.stderr.strip()}")
    names = [line.strip().rstrip("*") for line in listing.stdout.splitlines() if line.strip()]
    if partition is not None and partition not in names:
        raise LaunchError(f"partition {partition!r} does not exist on this cluster; partitions: {', '.join(names)}")


# ----- submitit parameters and the sbatch script -----


def slurm_parameters(launch: LaunchConfig) -> dict[str, Any]:
    """SlurmExecutor parameters (names of submitit's sbatch writer) for this launch."""
    params: dict[str, Any] = {
        "job_name": launch.job_name,
        "nodes": launch.nodes,
        "ntasks_per_node": launch.ranks_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "time": launch.time,
        "signal_delay_s": launch.signal_delay_s,
        # a rank that dies takes the step down instead of leaving its peers blocked in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
        # requeueable even where JobRequeue=0; after a node failure Slurm restarts it itself
        "additional_parameters": {"requeue": True},
    }
    optional = {
        "gpus_per_node": launch.gpus_per_node or None,
        "mem": launch.mem,
        "partition": launch.partition,
        "account": launch.account,
        "qos": launch.qos,
        "constraint": launch.constraint,
        "exclusive": True if launch.exclusive else None,
        "setup": list(launch.slurm_setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def job_folder(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / JOB_FOLDER


def sbatch_script(launch: LaunchConfig, run_dir: str | Path) -> str:
    """Exactly the script submitit writes and submits for this launch (the --dry-run output)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(run_dir)
    # the command submitit's SlurmExecutor runs in each task (its _submitit_command_str)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(launch))


def make_executor(launch: LaunchConfig, run_dir: str | Path) -> Any:
    """A submitit AutoExecutor for ``launch.cluster`` writing into ``<run_dir>/slurm/<job id>``."""
    import submitit

    folder = job_folder(run_dir)
    if launch.cluster == "slurm":
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=launch.max_requeues)
        executor.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(launch).items()})
        return executor
    # local/debug: the same ranks on this machine, for trying a config before queueing
    executor = submitit.AutoExecutor(str(folder).replace("%j", "local"), cluster=launch.cluster)
    executor.update_parameters(
        name=launch.job_name, timeout_min=launch.time, tasks_per_node=launch.ranks_per_node,
        gpus_per_node=launch.gpus_per_node, nodes=1,
    )
    return executor


# ----- mvar-dist submit -----

# CLI flag -> LaunchConfig field; a flag left out keeps the config's value
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--nodes": ("nodes", int, "number of nodes"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node; one task (rank) per GPU"),
    "--tasks-per-node": ("tasks_per_node", int, "ranks per node for CPU jobs"),
    "--cpus-per-task": ("cpus_per_task", int, "CPUs per rank (data workers + 1)"),
    "--mem": ("mem", str, "memory per node, e.g. 64G"),
    "--time": ("time", int, "time limit in minutes"),
    "--partition": ("partition", str, "partition (default: the cluster's default)"),
    "--account": ("account", str, "account to charge"),
    "--qos": ("qos", str, "quality of service"),
    "--constraint": ("constraint", str, "node features, e.g. a100"),
    "--max-requeues": ("max_requeues", int, "how often the job may requeue itself (preemption, time limit)"),
    "--job-name": ("job_name", str, "SLURM job name"),
    "--signal-delay": ("signal_delay_s", int, "seconds before the time limit to signal a checkpoint"),
    "--cluster": ("cluster", str, "slurm (default), local (subprocesses here) or debug (in this process)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist submit",
        description="Submit a training run to SLURM. Resources default to the config's launch section.",
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. configs/mvar_d16.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.total_steps=20")
    for flag, (_, kind, help_) in _FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_)
    parser.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                        help="whole nodes for this job")
    parser.add_argument("--slurm-setup", action="append", default=None, metavar="LINE",
                        help="shell line run before srun (repeat for several; replaces the config's)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    return parser


def resolve_launch(config: ExperimentConfig, args: argparse.Namespace) -> LaunchConfig:
    """The config's launch section with the CLI flags that were given on top."""
    base = getattr(config, "launch", None) or LaunchConfig()
    changes = {field_: getattr(args, flag[2:].replace("-", "_")) for flag, (field_, _, _) in _FLAGS.items()}
    changes.update(exclusive=args.exclusive, slurm_setup=args.slurm_setup)
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, LaunchConfig]:
    """Load, merge and check everything; raises ConfigError/LaunchError before any submission."""
    from mvar_dist.config import load_config, validate

    config = load_config(args.config, args.overrides)
    launch = resolve_launch(config, args)
    validate_launch(launch)
    # the job may start in another directory; the run dir is fixed at submission
    run = dataclasses.replace(config.run, dir=str(Path(config.run.dir).absolute()))
    config = dataclasses.replace(config, run=run)
    if hasattr(config, "launch"):  # the run's saved config records the resources it ran with
        config = dataclasses.replace(config, launch=launch)
    validate(config, launch.world_size)
    if launch.cluster == "slurm" and not args.dry_run:
        check_partition(launch.partition)
    return config, launch


def submit(config: ExperimentConfig, launch: LaunchConfig, argv: Sequence[str]) -> dict[str, Any]:
    """Submit the training job and write ``<run_dir>/slurm_job.json``; returns that record."""
    from mvar_dist.slurm_job import TrainingJob
    from mvar_dist.slurm_status import write_job_record

    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(launch, run_dir)
    job = executor.submit(TrainingJob(config, launch.cluster, launch.max_requeues))
    paths = job.paths
    record = {
        "kind": "train", "job_id": str(job.job_id), "cluster": launch.cluster, "folder": str(paths.folder),
        "stdout": str(paths.stdout), "stderr": str(paths.stderr), "world_size": launch.world_size,
        "command": ["mvar-dist", "submit", *argv],
    }
    write_job_record(run_dir, record)
    if launch.cluster == "debug":  # submitit's debug jobs run in this process when asked for the result
        record["result"] = job.result()
    return record


def main(argv: Sequence[str]) -> int:
    from mvar_dist.config import ConfigError

    args = build_parser().parse_intermixed_args(list(argv))
    try:
        config, launch = prepare(args)
    except (ConfigError, LaunchError) as err:
        print(f"mvar-dist submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if launch.cluster != "slurm":
            print("mvar-dist submit: --dry-run prints the sbatch script, which only --cluster slurm has",
                  file=sys.stderr)
            return 2
        print(sbatch_script(launch, config.run.dir), end="")
        return 0
    record = submit(config, launch, argv)
    print(format_submission(config, launch, record))
    return 0


def format_submission(config: ExperimentConfig, launch: LaunchConfig, record: dict[str, Any]) -> str:
    from mvar_dist.slurm_status import mlflow_link
    from mvar_dist.tracking import read_run_record, resolve_tracking_uri

    run_dir = Path(config.run.dir)
    lines = [
        f"submitted job {record['job_id']} ({launch.world_size} ranks on {launch.nodes} node(s), "
        f"cluster {launch.cluster}, partition {launch.partition or 'default'})",
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
