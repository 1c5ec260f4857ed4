"""``mvar-dist status RUN_DIR`` (alias ``jobs``): a submitted run's SLURM state, requeues, last
checkpoint and MLflow run, all found from the run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.launch.status import run_status


def format_status(status: dict[str, Any]) -> str:
    record = status["record"]
    lines = [f"run dir:     {status['run_dir']}"]
    job = status.get("job")
    name = f"{record.get('kind', 'train')} job {record['job_id']} ({record.get('cluster', 'slurm')})"
    if job is not None:
        name += f": {job['state']}, requeued {job['requeues']} time(s)"
        if job.get("elapsed"):
            name += f", elapsed {job['elapsed']} on {job['nodes']}"
    lines.append(f"job:         {name}")
    if "merge_job" in status:
        lines.append(f"merge job:   {record['merge_job_id']}: {status['merge_job']['state']}")
    lines.append(f"job folder:  {record['folder']}")
    lines.append(f"logs:        {record['stdout']}")
    lines.append(f"             {record['stderr']}")
    if record.get("previous_job_ids"):
        lines.append(f"earlier:     {', '.join(record['previous_job_ids'])}")
    if "checkpoint" in status:
        point = status["checkpoint"]
        lines.append(f"checkpoint:  {'none yet' if point is None else 'step %d (%s)' % (point['step'], point['tag'])}")
    if "mlflow" in status:
        run = status["mlflow"]
        if run is None:
            lines.append("MLflow:      no run yet (the trainer creates it when it starts)")
        else:
            detail = f"{run['run_id']} {run.get('status', '?')}, metrics through step {run.get('logged_through')}"
            lines.append(f"MLflow:      {detail}, requeues tag {run.get('requeues')}")
            lines.append(f"             {run['link']}")
    return "\n".join(lines)


@reports("status", FileNotFoundError, code=2)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mvar-dist status", description="State of a submitted run.")
    parser.add_argument("run_dir", type=Path, help="the run directory given to submit (config run.dir)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(list(argv))
    status = run_status(args.run_dir.absolute())
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
