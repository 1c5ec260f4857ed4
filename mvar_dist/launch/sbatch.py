"""The sbatch script of a submission, as text: what ``--dry-run`` prints.

submitit writes the script it submits itself and has no public call that renders it, so we
render the same format from the same parameters: ``#SBATCH`` lines sorted by name, the setup
lines, then srun running submitit's job entry. A SLURM test compares this text with the
script submitit actually submitted, so a change on either side is caught.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

# submitit's per-task log names under a job folder; %t is the task number
_STDOUT, _STDERR = "%j_%t_log.out", "%j_%t_log.err"
# parameters that do not become #SBATCH lines
_NOT_SBATCH = ("setup", "srun_args", "signal_delay_s", "additional_parameters")


def _flag(name: str, value: Any) -> str:
    name = name.replace("_", "-")
    if value is True:
        return f"#SBATCH --{name}"
    return f"#SBATCH --{name}={shlex.quote(str(value))}"


def render(parameters: dict[str, Any], folder: Path, array_tasks: int | None = None, parallelism: int = 256) -> str:
    """The script for ``parameters`` (:func:`mvar_dist.launch.slurm.slurm_parameters` names) with
    job folder ``folder`` (``.../slurm/%j``); ``array_tasks`` makes it a job array."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    stdout, stderr = str(folder / _STDOUT), str(folder / _STDERR)
    flags = {k: v for k, v in parameters.items() if k not in _NOT_SBATCH and v is not None}
    flags["signal"] = f"USR2@{parameters.get('signal_delay_s', 90)}"
    flags.setdefault("wckey", "submitit")
    if array_tasks is not None:
        flags["array"] = f"0-{array_tasks - 1}%{min(array_tasks, parallelism)}"
        stdout, stderr = stdout.replace("%j", "%A_%a"), stderr.replace("%j", "%A_%a")
    flags.update({"output": stdout.replace("%t", "0"), "error": stderr.replace("%t", "0"), "open-mode": "append"})
    flags.update(parameters.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [_flag(k, flags[k]) for k in sorted(flags)]
    if parameters.get("setup"):
        lines += ["", "# setup", *parameters["setup"]]
    srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr, *(parameters.get("srun_args") or [])])
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", f"{srun} {command}", ""]
    return "\n".join(lines)
