"""``mvar-dist compare``: runs of one MLflow experiment side by side, as a markdown table and plots.

For each metric and run: the final value, the best value and the value at the equal step (the
largest step every compared run reached); see :mod:`mvar_dist.tracking.compare`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.tracking.compare import (
    DEFAULT_METRICS,
    CompareError,
    compare,
    resolve_tracking_uri,
)


def _list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in text.split(",") if t.strip()] if text else []
    return items or None


@reports("compare", CompareError)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist compare", formatter_class=HelpFormatter,
        description="Compare the runs of one MLflow experiment side by side, as a markdown table and PNG plots.\n"
                    "For each metric and run: the final value, the best value and the value at the equal step\n"
                    "(the largest step every compared run reached).",
        epilog="exit status: 0 printed; 2 a user error (no MLflow store, an unknown experiment, run or metric).",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment of the runs)")
    parser.add_argument("--runs", help="comma-separated run ids or run names (default: every run of the experiment)")
    parser.add_argument("--metrics", help=f"comma-separated metric keys (default: those of {', '.join(DEFAULT_METRICS)} that exist)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else <run-dir>/mlflow.db)")
    parser.add_argument("--run-dir", type=Path, default=Path("."), help="run directory whose sqlite store (mlflow.db) to read when no URI is given")
    parser.add_argument("--out", type=Path, help="directory for table.md and the PNG plots (default: compare-<experiment>)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(list(argv))
    out_dir = None if args.no_plots else (args.out or Path(f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.experiment)}"))
    uri = resolve_tracking_uri(args.tracking_uri, args.run_dir)
    table, _, plots = compare(args.experiment, _list(args.runs), _list(args.metrics), uri, out_dir)
    print(table)
    if plots:
        print("\nplots: " + ", ".join(str(p) for p in plots))
    return 0
