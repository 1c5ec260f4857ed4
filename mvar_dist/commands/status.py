"""``mvar-dist status RUN_DIR`` (alias ``jobs``): a submitted run's SLURM state, requeues, last
checkpoint and MLflow run, all found from the run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.launch.status import run_status
from mvar_dist.run_dir import RunDir


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
    attempts = (job or {}).get("attempts", [])
    if len(attempts) > 1 or (attempts and "tasks" in job):  # requeued runs, or array tasks: where each ran
        for attempt in attempts:
            where = f" on {attempt['nodes']}" if attempt["nodes"] and attempt["nodes"] != "None assigned" else ""
            lines.append(f"             {attempt['job_id']} {attempt['state']}{where}"
                         + (f", {attempt['elapsed']}" if attempt["elapsed"] else ""))
    if "merge_job" in status:
        lines.append(f"merge job:   {record['merge_job_id']}: {status['merge_job']['state']}")
    lines.append(f"job folder:  {record['folder']}")
    lines.append(f"logs:        {record['stdout']}")
    lines.append(f"             {record['stderr']}")
    if record.get("previous_job_ids"):
        lines.append(f"earlier:     {', '.join(record['previous_job_ids'])}")
    if "checkpoint" in status:
        last = status["checkpoint"]
        lines.append(f"checkpoint:  {'none yet' if last is None else 'step %d (%s)' % (last['step'], last['tag'])}")
        if last is not None and len(last.get("world_sizes", ())) > 1:  # the run changed its cluster size
            lines.append("world sizes: " + ", ".join(f"{w} ranks from step {s}" for s, w in last["world_sizes"]))
    if "mlflow" in status:
        run = status["mlflow"]
        if run is None:
            lines.append("MLflow:      no run yet (the trainer creates it when it starts)")
        else:
            detail = f"{run['run_id']} {run.get('status', '?')}, metrics through step {run.get('logged_through')}"
            lines.append(f"MLflow:      {detail}, requeues tag {run.get('requeues')}")
            lines.append(f"             {run['link']}")
    return "\n".join(lines)


@reports("status", FileNotFoundError)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist status", formatter_class=HelpFormatter,
        description="State of a submitted run: its SLURM job and requeues, the last checkpoint and the MLflow run,\n"
                    "all found from the run directory (mvar-dist jobs is the same command).",
        epilog="exit status: 0 shown; 2 a user error (not a run directory, or one that was never submitted).",
    )
    parser.add_argument("run_dir", type=Path,
                        help="the run directory given to submit (run.dir of the config), or OUT/<split> of submit-prep")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(list(argv))
    run = RunDir(args.run_dir.absolute())
    if not run.path.is_dir():
        why = "no such directory" if not run.path.exists() else "not a directory"
        raise FileNotFoundError(f"{args.run_dir} is not a run directory ({why})")
    status = run_status(run.path)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
