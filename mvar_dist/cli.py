"""``mvar-dist`` command line: one subcommand per user task, each in its own module of
:mod:`mvar_dist.commands`, named after it.

Subcommand modules are imported lazily so that ``mvar-dist --help`` stays fast and a command
never pays for the imports of another (DeepSpeed, MLflow, submitit are heavy).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable, Sequence

from mvar_dist.commands.reporting import FAILED, USER_ERROR, declared, report

# name -> (module, function, one-line help); the function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("mvar_dist.commands.train", "main", "train MVAR or VAR with DeepSpeed on code shards (--nproc N: N local ranks)"),
    "train-tokenizer": ("mvar_dist.commands.train_tokenizer", "main", "train the multi-scale VQVAE tokenizer on images (kind: tokenizer experiments; --nproc N)"),
    "plan": ("mvar_dist.commands.plan", "main", "will a config fit: per-GPU memory under ZeRO 1/2/3, largest micro batch, recommended stage"),
    "submit": ("mvar_dist.commands.submit", "main", "submit a training run to SLURM with submitit (--dry-run: print the sbatch script)"),
    "submit-prep": ("mvar_dist.commands.submit_prep", "main", "run prep as a SLURM job array, then merge the manifest in a dependent job"),
    "status": ("mvar_dist.commands.status", "main", "state of a submitted run: SLURM job, requeues, last checkpoint, MLflow run"),
    "jobs": ("mvar_dist.commands.status", "main", "alias of status"),
    "prep": ("mvar_dist.commands.prep", "main", "tokenize an image folder into WebDataset code shards (--merge: write the manifest)"),
    "verify-shards": ("mvar_dist.commands.verify_shards", "main", "check code shards against their manifest (checksums, counts, code ranges)"),
    "export": ("mvar_dist.commands.export", "main", "consolidate a run's ZeRO checkpoint into model.safetensors + config.json (or the released .pth)"),
    "import-released": ("mvar_dist.commands.import_released", "main", "a released var_d16.pth / mvar-d16.pth -> an export directory that sample and from_pretrained read"),
    "sample": ("mvar_dist.commands.sample", "main", "sample an exported model: a PNG grid per class, or the ADM evaluator's .npz (--npz)"),
    "evaluate": ("mvar_dist.commands.evaluate", "main", "FID, sFID, IS, precision, recall of samples (an .npz, or an export sampled here) against a reference batch"),
    "quickstart": ("mvar_dist.commands.quickstart", "main", "the whole chain on CPU in minutes: digits -> tokenizer -> shards -> train (2 ranks) -> export -> judged samples"),
    "compare": ("mvar_dist.commands.compare", "main", "compare MLflow runs of an experiment: markdown table of metrics + PNG plots"),
}


def _usage() -> str:
    width = max((len(name) for name in COMMANDS), default=0)
    lines = ["usage: mvar-dist <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'mvar-dist <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mvar_dist import __version__

        print(f"mvar-dist {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mvar-dist: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    command: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    reported, user_errors, failures = declared(command) or (name, (), ())
    try:
        return int(command(rest) or 0)
    except failures as error:
        return report(reported, error, FAILED)
    except user_errors as error:
        return report(reported, error, USER_ERROR)


if __name__ == "__main__":
    sys.exit(main())
