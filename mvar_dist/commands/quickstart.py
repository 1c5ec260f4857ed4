"""``mvar-dist quickstart``: the whole chain on CPU in minutes: digits -> tokenizer -> shards ->
verify -> 2-rank DeepSpeed training -> export -> judged samples (:mod:`mvar_dist.quickstart`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.quickstart.experiment import DEFAULT_STEPS, EXPERIMENT
from mvar_dist.quickstart.pipeline import QuickstartError, run_quickstart


def format_summary(summary: dict[str, Any]) -> str:
    total, mlflow = summary["total"], summary["mlflow"]
    lines = [
        f"quickstart ({summary['mode']}, {summary['steps']} steps) finished in {total['wall_s']:.0f} s "
        f"(CPU time {total['cpu_s']:.0f} s)",
        f"  judged accuracy of generated digits: {100 * summary['judged_accuracy']:.1f}% "
        f"({summary['judged_samples']} samples, intended class)",
        f"  judge on real validation digits:     {100 * summary['real_val_accuracy']:.1f}%",
        format_fid(summary),
    ]
    quality = summary.get("tokenizer_quality")
    if quality:
        lines.append(f"  VQVAE tokenizer: judge on its reconstructions {100 * quality['reconstruction_judged_accuracy']:.1f}%, "
                     f"L1 {quality['reconstruction_l1']:.4f}, {100 * quality['codes_used_fraction']:.0f}% of codes used")
    lines += [
        f"  sample grid (one row per class): {summary['grid']}",
        f"  exported model:                  {summary['model_dir']}",
        f"  run (checkpoints, config):       {summary['run_dir']}",
        f"  shards manifest:                 {summary['shards']}",
        f"  MLflow store:                    {mlflow['tracking_uri']} (experiment {mlflow['experiment']!r})",
        f"  browse it:   {mlflow['ui_command']}",
        f"  compare runs: {mlflow['compare_command']}",
        "  stage times (wall / CPU s): " + ", ".join(
            f"{name} {t['wall_s']:.0f}/{t['cpu_s']:.0f}" for name, t in summary["stages"].items()),
        f"  summary: {Path(summary['out']) / 'summary.json'}",
    ]
    return "\n".join(lines)


def format_fid(summary: dict[str, Any]) -> str:
    """The FID line; a summary written before the quickstart computed the FID has none."""
    def figure(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return (f"  FID in the judge's feature space:    {figure('judged_fid')} against the real validation digits "
            f"(real digits at this sample size: {figure('real_fid_floor')}; lower is better)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist quickstart", formatter_class=HelpFormatter,
        description="The whole chain on CPU in minutes: digits -> tokenizer -> shards -> verify -> DeepSpeed\n"
                    "training on 2 CPU ranks -> export -> samples, judged by a classifier of real digits.\n"
                    "A rerun reuses every finished stage.",
        epilog="exit status: 0 done; 1 a stage failed (the message names it and what to do);\n"
               "2 a user error (a flag, an override, an output directory written by something else).",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of 64 images")
    parser.add_argument("--mode", choices=("mvar", "var"), default="mvar", help="MVAR, or the VAR baseline (same MLflow experiment)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--nproc", type=int, default=2, help="local training ranks")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class that the judge scores")
    parser.add_argument("--grid-per-class", type=int, default=10, help="samples per class shown in the grid")
    parser.add_argument("--fresh", action="store_true", help="discard this mode's previous run and train from scratch")
    parser.add_argument("--tokenizer", choices=("patch", "vqvae"), default="patch",
                        help="patch: fit the k-means pixel-patch tokenizer (seconds); vqvae: train a multi-scale VQVAE "
                             "with mvar-dist train-tokenizer on 2 ranks first (about a minute more)")
    parser.add_argument("overrides", nargs="*", help=f"experiment overrides, e.g. optim.lr=1e-3 (experiment {EXPERIMENT!r})")
    return parser


def check_counts(args: argparse.Namespace) -> None:
    """Counts the pipeline cannot use are a user error, reported before any stage runs."""
    for flag, value in (("--steps", args.steps), ("--nproc", args.nproc), ("--per-class", args.per_class)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 1 <= args.grid_per_class <= args.per_class:
        raise ValueError(f"--grid-per-class must be in 1..--per-class ({args.per_class}), got {args.grid_per_class}")


@reports("quickstart", ValueError, FileExistsError, failures=(QuickstartError,))
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    check_counts(args)
    summary = run_quickstart(args.out, args.mode, args.steps, args.seed, args.nproc, args.per_class,
                             args.grid_per_class, args.fresh, args.overrides, args.tokenizer)
    print(format_summary(summary))
    return 0
