"""SLURM through submitit: what the cluster offers (``sinfo``), the submitit parameters of a
launch, job folders, and the executor (``slurm``, or ``local``/``debug`` on this machine)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from mvar_dist.config import LaunchConfig, LaunchError
from mvar_dist.launch import sbatch
from mvar_dist.run_dir import RunDir


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


# slurm_parameters keys that decide where and whether the job can run (not names, logs or signals)
RESOURCE_PARAMETERS = (
    "nodes", "ntasks_per_node", "cpus_per_task", "gpus_per_node", "mem", "time", "partition", "account", "qos",
    "constraint", "exclusive",
)


def check_resources(launch: LaunchConfig) -> None:
    """Fail before submitting when Slurm says the job could never start on the partition.

    ``sbatch --test-only`` asks slurmctld to schedule the job without queueing it: a request no
    node can satisfy (more CPUs, memory or GPUs than a node has, an unknown feature) is refused
    there, whereas a real submission would pend forever. A busy cluster is not an error: it
    answers with an expected start time. Limits enforced only at scheduling time (partition
    MaxTime with EnforcePartLimits=NO, association limits) may still pass this test.
    """
    params = slurm_parameters(launch)
    flags = [
        f"--{key.replace('_', '-')}" if params[key] is True else f"--{key.replace('_', '-')}={params[key]}"
        for key in RESOURCE_PARAMETERS if key in params
    ]
    command = ["sbatch", "--test-only", *flags, "--wrap", "true"]
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: this machine is not a SLURM client; use --cluster local") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{' '.join(command)} got no answer within 60 s (is slurmctld up?)") from None
    if answer.returncode != 0:
        reason = " ".join(line.strip() for line in answer.stderr.splitlines() if line.strip()) or f"exit code {answer.returncode}"
        where = f"partition {launch.partition!r}" if launch.partition else "the default partition"
        raise LaunchError(
            f"the cluster can never run this job on {where}: {' '.join(command[:-2])} answered {reason!r}. "
            "Ask for what one node has (sinfo -N -o '%P %N %c %m %G %f' lists CPUs, memory in MB, GPUs "
            "and features per node): --nodes, --tasks-per-node/--gpus-per-node, --cpus-per-task, --mem, --constraint"
        )


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
    """``<run_dir>/slurm/%j``: a requeued job keeps its id, hence its folder."""
    return RunDir(Path(run_dir).absolute()).slurm_jobs / "%j"


def sbatch_script(launch: LaunchConfig, run_dir: str | Path) -> str:
    """The script submitting this launch sends to sbatch (the --dry-run output)."""
    return sbatch.render(slurm_parameters(launch), job_folder(run_dir))


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
