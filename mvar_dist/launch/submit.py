"""Submitting a training run (``mvar-dist submit``): the config's ``launch`` section with the
command line's resources on top, every check before anything is queued, the submitit job,
and the record ``mvar-dist status`` reads. What runs inside the job is
:mod:`mvar_dist.launch.job`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from mvar_dist.config import ConfigError, ExperimentConfig, LaunchConfig, load_config, validate, validate_launch
from mvar_dist.launch.slurm import check_partition, check_resources, make_executor
from mvar_dist.launch.status import write_job_record
from mvar_dist.shards.manifest import load_manifest
from mvar_dist.tokenizer_training.config import (
    TokenizerExperiment, is_tokenizer_file, load_tokenizer_experiment, validate_tokenizer_experiment,
)


Experiment = ExperimentConfig | TokenizerExperiment


def resolve_launch(config: Experiment, changes: Mapping[str, Any]) -> LaunchConfig:
    """The config's launch section with ``changes`` (LaunchConfig field -> value; None: keep) on top."""
    return dataclasses.replace(config.launch, **{k: v for k, v in changes.items() if v is not None})


def prepare(
    config_file: str | Path, overrides: Sequence[str], changes: Mapping[str, Any], dry_run: bool = False,
) -> tuple[Experiment, LaunchConfig]:
    """Load, merge and check everything; raises ConfigError/LaunchError before any submission.
    A file with ``kind: tokenizer`` is a tokenizer-training run (``mvar-dist train-tokenizer``).

    ``dry_run`` (``--dry-run``: print the script) checks the config and resources only; else the
    manifests must exist and, for ``--cluster slurm``, the partition must be able to run the job.
    """
    tokenizer = is_tokenizer_file(config_file, overrides)
    config = load_tokenizer_experiment(config_file, overrides) if tokenizer else load_config(config_file, overrides)
    launch = resolve_launch(config, changes)
    validate_launch(launch)
    # the job may start in another directory; the run dir is fixed at submission
    run = dataclasses.replace(config.run, dir=str(Path(config.run.dir).absolute()))
    # the run's saved config records the resources it ran with
    config = dataclasses.replace(config, run=run, launch=launch)
    if tokenizer:  # its data are image folders or shards, checked by the validation
        validate_tokenizer_experiment(config, launch.world_size)
    else:
        validate(config, launch.world_size)
    if dry_run:
        return config, launch
    if not tokenizer:
        check_manifests(config)
    if launch.cluster == "slurm":
        check_partition(launch.partition)
        check_resources(launch)  # else a job no node can hold pends forever
    return config, launch


def check_manifests(config: ExperimentConfig) -> None:
    """The data.*_manifest files a job would read, read here: a job must not queue for hours to
    fail on a typo. URLs (``s3://``, ``pipe:``) are left to the job, which may see other storage."""
    data = config.data
    if not data.train_manifest:
        raise ConfigError("data.train_manifest is not set: point it at the train split's manifest.json (or its directory)")
    for name, location in (("data.train_manifest", data.train_manifest), ("data.val_manifest", data.val_manifest)):
        if not location or "://" in location or location.startswith("pipe:"):
            continue
        try:
            load_manifest(location, data.shard_url_template)
        except FileNotFoundError as err:
            raise ConfigError(f"{name}: {err}") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{name}: {location} is not a readable manifest.json: {err!r}") from None


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
