"""Submitting a training run (``mvar-dist submit``): the config's ``launch`` section with the
command line's resources on top, every check before anything is queued, the submitit job,
and the record ``mvar-dist status`` reads. What runs inside the job is
:mod:`mvar_dist.launch.job`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from mvar_dist.config import (
    Experiment,
    ExperimentConfig,
    LaunchConfig,
    LaunchError,
    kind_of,
    load_experiment,
    validate_experiment,
    validate_launch,
)
from mvar_dist.config.batch_split import AUTO
from mvar_dist.config.sizes import parse_size
from mvar_dist.launch.slurm import check_partition, check_resources, make_executor
from mvar_dist.launch.status import write_job_record
from mvar_dist.tracking import resolve_tracking_uri

logger = logging.getLogger(__name__)


def resolve_launch(config: Experiment, changes: Mapping[str, Any]) -> LaunchConfig:
    """The config's launch section with ``changes`` (LaunchConfig field -> value; None: keep) on top."""
    return dataclasses.replace(config.launch, **{k: v for k, v in changes.items() if v is not None})


def prepare(
    config_file: str | Path, overrides: Sequence[str], changes: Mapping[str, Any], dry_run: bool = False,
) -> tuple[Experiment, LaunchConfig]:
    """Load, merge and check everything; raises ConfigError/LaunchError before any submission.
    Any kind of experiment (a ``kind: tokenizer`` file trains the tokenizer).

    ``dry_run`` (``--dry-run``: print the script) checks the config and resources only; else the
    files the job reads must exist and, for ``--cluster slurm``, the partition must be able to
    run the job.
    """
    config = load_experiment(config_file, overrides)
    launch = resolve_launch(config, changes)
    validate_launch(launch)
    # the job may start in another directory; the run dir is fixed at submission
    run = dataclasses.replace(config.run, dir=str(Path(config.run.dir).absolute()))
    # the job logs where this command says it will: $MLFLOW_TRACKING_URI of this shell, not of
    # whatever environment the job starts in (sbatch --export, a cluster's own profile)
    tracking = dataclasses.replace(config.tracking, uri=resolve_tracking_uri(config.tracking.uri, Path(run.dir)))
    # the run's saved config records the resources it ran with
    config = dataclasses.replace(config, run=run, launch=launch, tracking=tracking)
    config = cap_micro_batch_by_memory(config, launch)
    validate_experiment(config, launch.world_size)
    if dry_run:
        return config, launch
    kind_of(config).check_inputs(config)
    if launch.cluster == "slurm":
        check_partition(launch.partition)
        check_resources(launch)  # else a job no node can hold pends forever
    return config, launch


def cap_micro_batch_by_memory(config: Experiment, launch: LaunchConfig) -> Experiment:
    """With ``train.micro_batch_size: auto``, no ``train.max_micro_batch_size`` and
    ``launch.gpu_memory`` known, the largest micro batch that ``mvar-dist plan`` finds fits one GPU
    under the experiment's DeepSpeed template becomes ``max_micro_batch_size`` in the job's config
    (and so in the run's config.yaml). Nothing changes for other experiments or without it."""
    train = config.train
    if (launch.gpu_memory is None or not isinstance(config, ExperimentConfig) or train.micro_batch_size != AUTO
            or train.max_micro_batch_size is not None):
        return config
    from mvar_dist.memory.plan import DEFAULT_RESERVE_PERCENT, Cluster, plan_run

    memory = parse_size(launch.gpu_memory)
    cluster = Cluster(launch.nodes, launch.ranks_per_node, memory, reserve=memory * DEFAULT_RESERVE_PERCENT // 100,
                      write_bandwidth=float(2**30))  # the bandwidth only times checkpoints
    plan = plan_run(config, cluster)
    stage = next(stage for stage in plan.stages if stage.configured)
    if stage.largest_micro_batch < 1:
        raise LaunchError(
            f"not even one sample per pass fits a {launch.gpu_memory} GPU (--gpu-memory) under "
            f"deepspeed.template={config.deepspeed.template}; see mvar-dist plan --config ... --gpu-memory "
            f"{launch.gpu_memory} for the stages that fit"
        )
    logger.info("train.max_micro_batch_size=%d: the largest micro batch that fits a %s GPU under %s (mvar-dist plan)",
                stage.largest_micro_batch, launch.gpu_memory, config.deepspeed.template)
    return dataclasses.replace(config, train=dataclasses.replace(train, max_micro_batch_size=stage.largest_micro_batch))


def submit(config: Experiment, launch: LaunchConfig, argv: Sequence[str]) -> dict[str, Any]:
    """Submit the training job and write ``<run_dir>/slurm_job.json``; returns that record."""
    from mvar_dist.launch.job import TrainingJob

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
