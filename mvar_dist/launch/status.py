"""The state of a submitted run (``mvar-dist status``): SLURM job, requeues, last checkpoint and
MLflow run, all found from the run directory.

``submit`` and ``submit-prep`` leave ``<run_dir>/slurm_job.json`` behind: the job ids, job
folder and log paths of the latest submission, plus the ids of earlier ones.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mvar_dist.atomic import write_json
from mvar_dist.run_dir import RunDir
from mvar_dist.tracking.run_record import LOGGED_THROUGH_TAG, mlflow_link, read_run_record

logger = logging.getLogger(__name__)


# ----- the record -----


def write_job_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write this submission's record atomically; earlier job ids move to ``previous_job_ids``."""
    path = RunDir(run_dir).job_record
    previous: list[str] = []
    old = read_job_record(run_dir)
    if old is not None:
        previous = list(old.get("previous_job_ids", [])) + [str(old["job_id"])]
    record = dict(record, submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  previous_job_ids=previous)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, indent=2)
    return path


def read_job_record(run_dir: Path) -> dict[str, Any] | None:
    path = RunDir(run_dir).job_record
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# ----- what the cluster says -----


def sacct_rows(job_id: str) -> list[dict[str, str]]:
    """One row per job allocation (array tasks and requeued runs included, job steps not)."""
    fields = ["JobID", "State", "Elapsed", "NodeList", "ExitCode"]
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", ",".join(fields)],
            capture_output=True, text=True, timeout=60,
        )
    except FileNotFoundError:
        return []
    if out.returncode != 0:
        logger.warning("sacct -j %s failed: %s", job_id, out.stderr.strip())
        return []
    return [dict(zip(fields, line.split("|"))) for line in out.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> dict[str, Any]:
    """Current state and how many times Slurm requeued the job (sacct keeps one row per run).

    Records reach the accounting database asynchronously: a job that just started may not be
    listed yet (state UNKNOWN).
    """
    rows = sacct_rows(job_id)
    if not rows:
        return {"state": "UNKNOWN", "requeues": 0, "elapsed": "", "nodes": "", "attempts": []}
    by_id: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_id.setdefault(row["JobID"], []).append(row)
    # every run of the job (or of each array task), oldest first: where it ran and how it ended
    attempts = [{"job_id": row["JobID"], "state": row["State"].split()[0], "nodes": row["NodeList"],
                 "elapsed": row["Elapsed"], "exit_code": row["ExitCode"]} for row in rows]
    if len(by_id) == 1:  # a plain job: earlier runs are REQUEUED/PREEMPTED rows, the last is current
        runs = next(iter(by_id.values()))
        current = runs[-1]
        return {"state": current["State"], "requeues": len(runs) - 1,
                "elapsed": current["Elapsed"], "nodes": current["NodeList"], "attempts": attempts}
    states = Counter(runs[-1]["State"].split()[0] for runs in by_id.values())  # an array: its tasks
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    requeues = sum(len(runs) - 1 for runs in by_id.values())
    return {"state": summary, "requeues": requeues, "elapsed": "", "nodes": "", "tasks": dict(states),
            "attempts": attempts}


# ----- what the run directory says -----


def last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    point = RunDir(run_dir).read_latest()
    if point is None:
        return None
    return {"step": point.step, "tag": point.tag,
            "world_sizes": [list(stretch) for stretch in point.run_state.with_world_size(point.step, point.run_state.world_size)]}


def mlflow_run_info(run_dir: Path) -> dict[str, Any] | None:
    record = read_run_record(run_dir)
    if record is None:
        return None
    info: dict[str, Any] = {"run_id": record.run_id, "tracking_uri": record.tracking_uri,
                            "link": mlflow_link(record.tracking_uri, record.experiment_id, record.run_id)}
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=record.tracking_uri).get_run(record.run_id)
        tags = run.data.tags
        info.update(status=run.info.status, logged_through=tags.get(LOGGED_THROUGH_TAG),
                    requeues=tags.get("slurm_requeues"), slurm_restart_count=tags.get("slurm_requeue_count"))
    except Exception as err:  # a tracking server that is down must not hide the job state
        info["error"] = str(err)
    return info


def run_status(run_dir: Path) -> dict[str, Any]:
    record = read_job_record(run_dir)
    if record is None:
        raise FileNotFoundError(
            f"{RunDir(run_dir).job_record} not found: {run_dir} was not submitted with 'mvar-dist submit' "
            "or 'mvar-dist submit-prep'"
        )
    status: dict[str, Any] = {"run_dir": str(run_dir), "record": record}
    if record.get("cluster", "slurm") == "slurm":
        status["job"] = job_state(str(record["job_id"]))
        if record.get("merge_job_id"):
            status["merge_job"] = job_state(str(record["merge_job_id"]))
    if record.get("kind", "train") == "train":
        status["checkpoint"] = last_checkpoint(run_dir)
        status["mlflow"] = mlflow_run_info(run_dir)
    return status
