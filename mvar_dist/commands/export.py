"""``mvar-dist export``: a run's DeepSpeed ZeRO checkpoint -> ``model.safetensors`` + ``config.json``
(or the released ``.pth`` layout with ``--format official``); for a ``train-tokenizer`` run, the
tokenizer as ``tokenizer.safetensors`` and in the released ``.pth`` layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.run_dir import RunDir
from mvar_dist.tasks import export_run
from mvar_dist.training.export import DTYPES


@reports("export", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist export", formatter_class=HelpFormatter,
        description="Consolidate a run's DeepSpeed ZeRO checkpoint into a self-contained model directory:\n"
                    "model.safetensors and config.json, or the released .pth layout with --format official.\n"
                    "For a train-tokenizer run, the tokenizer as tokenizer.safetensors and in the released layout.",
        epilog="exit status: 0 exported; 2 a user error (not a run directory, a tag that does not exist,\n"
               "a run that never completed a checkpoint).",
    )
    parser.add_argument("run_dir", type=Path, help="run directory (holds checkpoints/ and config.yaml)")
    parser.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step_00001000 (default: latest, the newest complete one)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "official"), default="safetensors",
                        help="safetensors: model.safetensors + config.json; official: the released .pth layout")
    parser.add_argument("--log-to-mlflow", action="store_true", help="also attach the export to the run's MLflow run")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even when it holds another run's export (replaced) or other files (kept)")
    args = parser.parse_args(list(argv))
    run = RunDir(args.run_dir)
    if not (run.config_file.is_file() or run.checkpoints.is_dir()):
        why = "no such directory" if not run.path.exists() else f"no {run.config_file.name} or {run.checkpoints.name}/ in it"
        raise FileNotFoundError(f"{run.path} is not a run directory ({why})")
    for line in export_run(args.run_dir, args.out, args.tag, args.dtype, args.fmt, args.log_to_mlflow, args.force):
        print(line)
    return 0
