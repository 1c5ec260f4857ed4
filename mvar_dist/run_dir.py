"""The on-disk layout of a training run directory: every tool that reads or writes one asks here.

::

    <run.dir>/
        config.yaml                 the resolved experiment (every default spelled out)
        mlflow_run.json             where the run's MLflow data lives (tracking)
        slurm_job.json              the latest submission (mvar-dist submit)
        slurm/<job id>/             submitit's job folders and logs
        checkpoints/
            step_00000020/          DeepSpeed's files (model, ZeRO partitions, lr scheduler)
                run_state.json      rank 0: the RunState (step, config, world size, MLflow run, ...)
                rank_00001.pt       every rank: its RankState (data-loader position, RNG states)
                files.json          name -> size of every file above, written once all are durable
            step_00000018.damaged/  a tag found incomplete on resume, kept for inspection
            latest                  the newest complete tag, moved last with an atomic rename

Only :mod:`mvar_dist.runtime.checkpoint` writes checkpoints; what the run-state files hold is
:mod:`mvar_dist.run_state`'s. Read-only tools (export, status, the quickstart, the SLURM job) use
:meth:`RunDir.read_latest` and never import the trainers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mvar_dist.run_state import RunState, read_run_state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RUN_STATE = "run_state.json"
FILES_RECORD = "files.json"
LOCK = ".lock"
RESOLVED_CONFIG = "config.yaml"
MLFLOW_RECORD = "mlflow_run.json"
JOB_RECORD = "slurm_job.json"
SLURM_JOBS = "slurm"
_TAG_PATTERN = re.compile(r"^step_(\d{8,})$")  # :08d widens past 10^8 steps


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step a checkpoint tag names, or None for names that are not tags."""
    match = _TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint: its tag, step and the run state rank 0 wrote with it."""

    tag: str
    step: int
    run_state: RunState


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; nothing is created until a writer asks for it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / RESOLVED_CONFIG

    @property
    def mlflow_record(self) -> Path:
        return self.path / MLFLOW_RECORD

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def job_record(self) -> Path:
        return self.path / JOB_RECORD

    @property
    def slurm_jobs(self) -> Path:
        """submitit's job folders live under here, one per job id."""
        return self.path / SLURM_JOBS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest_file(self) -> Path:
        return self.checkpoints / LATEST

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def run_state_file(self, tag: str) -> Path:
        return self.tag_dir(tag) / RUN_STATE

    def rank_file(self, tag: str, rank: int) -> Path:
        return self.tag_dir(tag) / f"rank_{rank:05d}.pt"

    def tag_steps(self) -> list[int]:
        """Steps of every tag directory present, complete or not, ascending."""
        if not self.checkpoints.is_dir():
            return []
        steps = (step_of(p.name) for p in self.checkpoints.iterdir() if p.is_dir())
        return sorted(s for s in steps if s is not None)

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names, or None when no checkpoint was ever completed."""
        if not self.latest_file.is_file():
            return None
        return self.latest_file.read_text().strip()

    def read_resume_point(self, tag: str) -> ResumePoint:
        state_file = self.run_state_file(tag)
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing: {tag} is not a complete mvar-dist checkpoint")
        run_state = read_run_state(state_file)
        return ResumePoint(tag=tag, step=run_state.step, run_state=run_state)

    def read_latest(self) -> ResumePoint | None:
        """The newest complete checkpoint, or None for a fresh run."""
        tag = self.latest_tag()
        if tag is None:
            return None
        try:
            return self.read_resume_point(tag)
        except FileNotFoundError as missing:
            raise RuntimeError(f"{self.latest_file} names {tag!r} but {missing}; the checkpoint is damaged") from None

    def resolve_tag(self, tag: str) -> str:
        """``latest`` -> the tag the trainer last completed; other names must exist."""
        if tag == LATEST:
            point = self.read_latest()
            if point is None:
                raise FileNotFoundError(f"{self.checkpoints} has no 'latest' file: the run never completed a checkpoint")
            return point.tag
        if not self.tag_dir(tag).is_dir():
            known = [tag_for(s) for s in self.tag_steps()]
            raise FileNotFoundError(f"no checkpoint {tag!r} in {self.checkpoints}; available tags: {known}")
        return tag
