"""``mvar-dist import-released``: a released VAR/MVAR checkpoint (``var_d16.pth``, ``mvar-d16.pth``, ...)
-> an export directory (``model.safetensors`` + ``config.json``) that ``mvar-dist sample --model``
and ``MVAR.from_pretrained`` read. The work is :func:`mvar_dist.tasks.import_released`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvar_dist.commands.reporting import HelpFormatter, reports
from mvar_dist.tasks import import_released
from mvar_dist.training.export import DTYPES


def _field(text: str) -> tuple[str, Any]:
    """FIELD=VALUE of the hidden --model-field; VALUE as JSON where it parses, else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


@reports("import-released", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mvar-dist import-released", formatter_class=HelpFormatter,
        description="Turn a released VAR/MVAR checkpoint into an export directory (model.safetensors + config.json,\n"
                    "as mvar-dist export writes), for example:\n\n"
                    "  mvar-dist import-released checkpoints/var_d16.pth --tokenizer checkpoints/vae_ch160v4096z32.pth \\\n"
                    "      --out exports/var_d16\n\n"
                    "config.json records the released model config of that depth and mode, the tokenizer's path and\n"
                    "identity and the published sampling settings; mvar-dist sample --model and MVAR.from_pretrained\n"
                    "then read the directory. --mode and --depth default to what the file name says (var_d16.pth:\n"
                    "var, 16; mvar-d16.pth: mvar, 16). Every key and shape is checked before anything is written.",
        epilog="exit status: 0 imported; 2 a user error (a missing file, keys or shapes that do not match the\n"
               "depth and mode, named; a tokenizer that does not fit; an --out that holds something else).",
    )
    parser.add_argument("checkpoint", type=Path, help="released weights file, e.g. checkpoints/var_d16.pth")
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="the tokenizer the weights were trained with (checkpoints/vae_ch160v4096z32.pth); "
                             "config.json records its path and identity")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--mode", choices=("var", "mvar"),
                        help="var (block-causal) or mvar (Markovian); default: from the file name")
    parser.add_argument("--depth", type=int, help="transformer depth (16, 20, 24); default: from the file name")
    parser.add_argument("--tokenizer-kind", choices=("vqvae", "patch"), default="vqvae", help="tokenizer class")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "official"), default="safetensors",
                        help="safetensors: model.safetensors + config.json; official: the released .pth layout")
    parser.add_argument("--cfg", type=float, help="record this guidance scale instead of the published one")
    parser.add_argument("--top-p", type=float, help="record this top-p instead of the published one")
    parser.add_argument("--top-k", type=int, help="record this top-k instead of the published one")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even when it holds another export or import (replaced) or other files (kept)")
    # testing: model config fields beyond the released ones (a tiny model), FIELD=JSON, repeated
    parser.add_argument("--model-field", type=_field, action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    lines = import_released(
        args.checkpoint, args.out, args.tokenizer, args.mode, args.depth, args.tokenizer_kind, args.dtype, args.fmt,
        sample={"cfg": args.cfg, "top_p": args.top_p, "top_k": args.top_k}, model_fields=dict(args.model_field),
        force=args.force,
    )
    for line in lines:
        print(line)
    return 0
