"""What runs inside a submitted job (the in-job entry of ``mvar-dist submit``): rendezvous from the
SLURM environment, the run skeleton (:func:`mvar_dist.runtime.loop.run_training`) on each rank
with the task of the experiment's kind, and requeueing on preemption or time limit through
submitit's checkpoint mechanism.

Order of events on preemption: Slurm sends USR2 to every task (``--signal=USR2@signal_delay_s``
before the time limit, ``scancel --signal=USR2``, or a job in a higher-priority partition).
submitit installed its checkpoint-and-requeue handler for USR2 before calling us; the trainer's
stop flag replaces it while training runs, so the trainer sees the signal first: all ranks agree
at the next step, save a checkpoint and return. Then rank 0 calls submitit's handler, captured
before training: it calls :meth:`TrainingJob.checkpoint` (this job with the requeue counter + 1,
or None past ``max_requeues``), rewrites the job pickle, runs ``scontrol requeue`` and exits.
The requeued job resumes from the checkpoint into the same MLflow run. Ranks > 0 exit quietly.

A signal that arrives before the trainer installs its flag (while building the model) goes to
submitit's handler directly: the job requeues at once and resumes from the previous checkpoint,
losing no step since none was taken. ``scontrol requeue`` from outside bypasses all of this
(submitit ignores SIGTERM): the job restarts and resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from mvar_dist.config import Experiment
from mvar_dist.run_dir import RunDir
from mvar_dist.runtime.distributed import RankEnv
from mvar_dist.runtime.watchdog import on_hang
from mvar_dist.tracking.run_record import read_run_record

logger = logging.getLogger(__name__)

REQUEUE_TAG = "slurm_requeues"
REQUEUE_LIMIT_TAG = "slurm_requeue_limit_reached"


def master_port(job_id: str, restart_count: int) -> int:
    """Same on every task of a job; moves on each requeue so a lingering socket cannot collide."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + (digits % 5000) * 8 + restart_count % 8


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, expanded by scontrol: the rendezvous host."""
    listing = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    hosts = listing.stdout.split()
    if listing.returncode != 0 or not hosts:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {listing.stderr.strip()}")
    return hosts[0]


def export_rendezvous_env(cluster: str) -> dict[str, str]:
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for env:// from submitit's JobEnvironment.

    CUDA_VISIBLE_DEVICES is left as Slurm set it; the trainer picks ``cuda:LOCAL_RANK``.
    """
    job_env = submitit.JobEnvironment()
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    addr = first_host(nodelist) if cluster == "slurm" and nodelist else "127.0.0.1"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    rank_env = RankEnv(job_env.global_rank, job_env.num_tasks, job_env.local_rank, addr,
                       master_port(job_env.raw_job_id, restarts))
    values = {**rank_env.as_environ(), "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(job_env.num_nodes, 1))}
    os.environ.update(values)
    return values


def requeue_after_hang(job_id: str, max_requeues: int) -> None:
    """A rank ended itself hung: requeue the whole job (Slurm kills every task, stopped ones
    included) so that it resumes from the last checkpoint, at most ``max_requeues`` times in
    all (SLURM_RESTART_COUNT counts every requeue: preemptions and hangs alike)."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        logger.error("not requeueing job %s after the hang: it was requeued %d times (launch.max_requeues=%d); "
                     "resubmit with the same run dir to resume", job_id, restarts, max_requeues)
        return
    logger.error("requeueing job %s after the hang (requeue %d of at most %d); it resumes from the last checkpoint",
                 job_id, restarts + 1, max_requeues)
    # every rank whose watchdog fires asks; Slurm takes the first and refuses the others
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        logger.warning("scontrol requeue %s: %s", job_id, result.stderr.strip())


def tag_mlflow_run(run_dir: Path, tags: dict[str, str]) -> None:
    """Best effort: the run's MLflow record exists once the trainer has started tracking."""
    record = read_run_record(run_dir)
    if record is None:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=record.tracking_uri)
        for key, value in tags.items():
            client.set_tag(record.run_id, key, value)
    except Exception as err:  # tracking must never fail a training job
        logger.warning("could not tag MLflow run %s: %s", record.run_id, err)


def stopped_before_end(config: Experiment) -> bool:
    """True when the trainer returned on a stop signal: its last checkpoint is before total_steps."""
    point = RunDir(Path(config.run.dir)).read_latest()
    return point is None or point.step < config.train.total_steps


@dataclass
class TrainingJob(submitit.helpers.Checkpointable):
    """Every task of the job runs this: the trainer, in-process, on its rank."""

    config: Experiment
    cluster: str = "slurm"
    max_requeues: int = 10
    requeues: int = 0  # how many times this job has requeued itself so far

    def __call__(self) -> dict[str, Any]:
        from mvar_dist.runtime.loop import run_training
        from mvar_dist.tasks import training_task

        # the task's stderr is its log file; submitit configures only its own logger
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        rendezvous = export_rendezvous_env(self.cluster)
        rank = int(rendezvous["RANK"])
        logger.info("rank %d of %s on %s, rendezvous %s:%s, requeued %s times so far (%d on a stop signal)", rank,
                    rendezvous["WORLD_SIZE"], socket.gethostname(), rendezvous["MASTER_ADDR"], rendezvous["MASTER_PORT"],
                    os.environ.get("SLURM_RESTART_COUNT", "0") or "0", self.requeues)
        if self.cluster == "slurm" and os.environ.get("SLURM_JOB_ID"):
            on_hang(lambda: requeue_after_hang(os.environ["SLURM_JOB_ID"], self.max_requeues))
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's; the trainer replaces it
        code = run_training(training_task(self.config))
        if code != 0:
            raise RuntimeError(f"training exited with code {code} on rank {rank}; see this task's log")
        run_dir = Path(self.config.run.dir)
        if not stopped_before_end(self.config):
            if rank == 0:
                tag_mlflow_run(run_dir, {REQUEUE_TAG: str(self.requeues)})
            return {"rank": rank, "requeues": self.requeues, "finished": True}
        if rank != 0:
            sys.exit(0)  # rank 0 requeues the whole job; no result file: the job is not over
        if callable(requeue_handler):
            requeue_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
        # the debug cluster installs no handler: report the stop instead of requeueing
        return {"rank": rank, "requeues": self.requeues, "finished": False}

    def checkpoint(self) -> Any:
        """The job to requeue (the trainer has saved already), or None past max_requeues."""
        run_dir = Path(self.config.run.dir)
        if self.requeues >= self.max_requeues:
            logger.error("not requeueing: launch.max_requeues=%d reached; resubmit with the same run dir to resume",
                         self.max_requeues)
            tag_mlflow_run(run_dir, {REQUEUE_LIMIT_TAG: "true"})
            return None
        tag_mlflow_run(run_dir, {REQUEUE_TAG: str(self.requeues + 1)})
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))
