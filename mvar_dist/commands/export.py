"""``mvar-dist export``: a run's DeepSpeed ZeRO checkpoint -> ``model.safetensors`` + ``config.json``
(or the released ``.pth`` layout with ``--format official``); for a ``train-tokenizer`` run, the
tokenizer as ``tokenizer.safetensors`` and in the released ``.pth`` layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.model.pretrained import read_export_metadata
from mvar_dist.tokenizer_training.export import export_tokenizer_run, is_tokenizer_run
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
    if is_tokenizer_run(args.run_dir):  # a train-tokenizer run: the tokenizer's files, both layouts
        paths = export_tokenizer_run(args.run_dir, args.out, args.tag)
        print(f"exported the tokenizer to {paths['safetensors']} and {paths['released']} (released layout)")
        return 0
    weights = export_run(args.run_dir, args.out, args.tag, args.dtype, args.fmt)
    artifact = log_export_to_mlflow(args.run_dir, args.out) if args.log_to_mlflow else None
    summary = read_export_metadata(args.out)["training"]
    print(f"exported step {summary['steps']} ({summary['checkpoint_tag']}) to {weights}")
    if artifact:
        print(f"logged to MLflow run {summary['mlflow_run_id']} at {artifact}")
    return 0
