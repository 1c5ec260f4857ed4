"""``mvar-dist export``: a run's DeepSpeed ZeRO checkpoint -> ``model.safetensors`` + ``config.json``
(or the released ``.pth`` layout with ``--format official``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.model.pretrained import read_export_metadata
from mvar_dist.training.export import DTYPES, export_run, log_export_to_mlflow


@reports("export", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist export",
        description="Consolidate a run's DeepSpeed ZeRO checkpoint into a self-contained model directory.",
    )
    parser.add_argument("run_dir", type=Path, help="run directory (holds checkpoints/ and config.yaml)")
    parser.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step_00001000 (default: latest)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "official"), default="safetensors")
    parser.add_argument("--log-to-mlflow", action="store_true", help="also attach the export to the run's MLflow run")
    args = parser.parse_args(list(argv))
    weights = export_run(args.run_dir, args.out, args.tag, args.dtype, args.fmt)
    artifact = log_export_to_mlflow(args.run_dir, args.out) if args.log_to_mlflow else None
    summary = read_export_metadata(args.out)["training"]
    print(f"exported step {summary['steps']} ({summary['checkpoint_tag']}) to {weights}")
    if artifact:
        print(f"logged to MLflow run {summary['mlflow_run_id']} at {artifact}")
    return 0
