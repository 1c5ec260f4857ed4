"""``mvar-dist sample``: class-conditional samples of an exported model, as a PNG grid or as the
``.npz`` sample batch of the ADM (guided-diffusion) FID/IS evaluator.

Sampling settings: command-line flags, else the ``sample`` section that ``mvar-dist export``
records in config.json (the training config's published settings), else the defaults of
:func:`mvar_dist.sample.generate`. The tokenizer must be the one the model was trained with;
it is checked against the identity recorded in config.json before any sampling.

Seeds: images are generated in batches of ``--batch-size`` in class order, and batch ``b`` is
sampled with a seed derived from ``(--seed, b)``. The same seed, batch size and device give the
same images; another batch size gives other (equally valid) samples, because the sampler draws
a whole batch from one random stream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

PATCH_TOKENIZER_CLASS = "mvar_dist.patch_tokenizer.PatchResidualTokenizer"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenizerMismatch(ValueError):
    """The tokenizer given to ``sample`` is not the one the model was trained with."""


@dataclass(frozen=True)
class SamplingSettings:
    """None leaves the setting to :func:`mvar_dist.sample.generate`'s default."""

    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in (("cfg", self.cfg), ("top_k", self.top_k), ("top_p", self.top_p)) if v is not None}


def resolve_settings(recorded: dict[str, Any] | None, cfg: float | None, top_k: int | None, top_p: float | None) -> SamplingSettings:
    """Flags override the export's recorded ``sample`` section."""
    recorded = recorded or {}
    flags = {"cfg": cfg, "top_k": top_k, "top_p": top_p}
    return SamplingSettings(**{name: recorded.get(name) if flag is None else flag for name, flag in flags.items()})


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch ``batch_index``, independent across (seed, batch) pairs."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    low, high = np.random.SeedSequence([seed, batch_index]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``"0,1,207"`` or ranges ``"0-9,207"`` -> class ids, checked against the model."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise ValueError(f"--classes: {part!r} is not a class id or a range like 0-9") from None
        classes.extend(span)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"--classes must name classes in 0..{num_classes - 1} (the model's num_classes), got {text!r}")
    return classes


# ----- model and tokenizer -----


def read_export_metadata(model_dir: Path) -> dict[str, Any]:
    from mvar_dist.export import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --model must be a directory written by 'mvar-dist export'")
    return json.loads(path.read_text())


def load_tokenizer(path: Path, recorded: dict[str, Any], device: torch.device) -> Any:
    """The tokenizer class recorded in config.json (identity class, else kind), loaded from ``path``."""
    from safetensors import SafetensorError

    identity = recorded.get("identity") or {}
    recorded_class = identity.get("class")
    is_patch = recorded_class == PATCH_TOKENIZER_CLASS or (recorded_class is None and recorded.get("kind") == "patch")
    try:
        if is_patch:
            from mvar_dist.patch_tokenizer import PatchResidualTokenizer

            tokenizer = PatchResidualTokenizer.from_checkpoint(path, map_location=device)
        else:
            from mvar_dist.tokenizer import MultiScaleVQVAE

            options = identity.get("config") or recorded.get("options") or {}
            tokenizer = MultiScaleVQVAE.from_checkpoint(path, map_location=device, **options)
    except (ValueError, TypeError, RuntimeError, SafetensorError) as err:
        kind = recorded_class or recorded.get("kind", "vqvae")
        raise TokenizerMismatch(f"{path} cannot be loaded as the tokenizer the model was trained with ({kind}): {err}") from None
    return tokenizer.to(device).eval()


def check_tokenizer_matches(metadata: dict[str, Any], tokenizer: Any, source: str, allow_other_weights: bool = False) -> None:
    """Raise :class:`TokenizerMismatch` naming every difference between ``tokenizer`` and the model."""
    model = metadata["model"]
    problems = []
    for name, ours in (("vocab_size", tokenizer.vocab_size), ("z_channels", tokenizer.z_channels),
                       ("patch_nums", [int(p) for p in tokenizer.patch_nums])):
        theirs = list(model[name]) if name == "patch_nums" else model[name]
        if theirs != ours:
            problems.append(f"{name} is {ours}, the model's is {theirs}")
    recorded = (metadata.get("tokenizer") or {}).get("identity")
    if recorded:
        mine = tokenizer.identity()
        if mine["class"] != recorded["class"]:
            problems.append(f"class is {mine['class']}, the model was trained with {recorded['class']}")
        elif mine["config"] != recorded["config"]:
            keys = sorted(k for k in set(mine["config"]) | set(recorded["config"]) if mine["config"].get(k) != recorded["config"].get(k))
            problems.append("config differs in " + ", ".join(f"{k} ({mine['config'].get(k)} vs {recorded['config'].get(k)})" for k in keys))
        elif mine["weights_sha256"] != recorded["weights_sha256"] and not allow_other_weights:
            problems.append(
                f"weights differ (sha256 {mine['weights_sha256'][:12]}, the model's tokenizer {recorded['weights_sha256'][:12]}); "
                f"pass --allow-other-tokenizer-weights if the codebook is known to be the same"
            )
    else:
        logger.warning("config.json records no tokenizer identity: only vocab_size, z_channels and patch_nums are checked")
    if problems:
        trained_with = (metadata.get("tokenizer") or {}).get("checkpoint")
        raise TokenizerMismatch(
            f"tokenizer {source} does not match the model: " + "; ".join(problems)
            + (f". The model was trained with {trained_with}" if trained_with else "")
        )


# ----- sampling -----


def sample_batches(
    model: Any, tokenizer: Any, labels: Sequence[int], batch_size: int, seed: int, settings: SamplingSettings,
    device: torch.device, precision: str = "fp32", progress: bool = True,
) -> Iterator[np.ndarray]:
    """uint8 (b, H, W, 3) images for ``labels`` in order, ``batch_size`` at a time."""
    from tqdm import tqdm

    from mvar_dist.images import to_uint8_hwc
    from mvar_dist.sample import generate

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress) as bar:
        for index, start in enumerate(range(0, len(labels), batch_size)):
            batch = torch.tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
            with autocast:
                _, images = generate(model, batch, tokenizer, seed=batch_seed(seed, index), **settings.kwargs())
            yield to_uint8_hwc(images)
            bar.update(len(batch))


# ----- command line -----


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist sample",
        description="Sample an exported model: a PNG grid (one row per class) or, with --npz, the ADM evaluator's sample batch.",
    )
    parser.add_argument("--model", type=Path, required=True, help="directory written by 'mvar-dist export'")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: the one recorded in config.json)")
    parser.add_argument("--classes", help="class ids, e.g. 0,1,207 or 0-9 (default: every class of the model)")
    parser.add_argument("--per-class", type=int, help="images per class (grid default: 8; npz: --num / number of classes)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: config.json, else 2.7)")
    parser.add_argument("--top-k", type=int, help="top-k filtering, 0 disables (default: config.json, else 1200)")
    parser.add_argument("--top-p", type=float, help="top-p filtering, 0 disables (default: config.json, else 0.99)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; batch b uses a seed derived from (seed, b)")
    parser.add_argument("--out", type=Path, required=True, help="output .png (grid) or .npz (with --npz)")
    parser.add_argument("--npz", action="store_true", help="write arr_0 = uint8 (N, H, W, 3), classes in order")
    parser.add_argument("--num", type=int, help="--npz: total number of images (default 50000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generate call (default 64)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype of the transformer")
    parser.add_argument("--padding", type=int, default=2, help="grid: white pixels between images (default 2)")
    parser.add_argument("--allow-other-tokenizer-weights", action="store_true",
                        help="accept a tokenizer whose class and config match but whose weights hash differs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def _labels(args: argparse.Namespace, num_classes: int) -> tuple[list[int], int]:
    """Labels in class order (each class repeated per-class times), and the number of rows."""
    classes = parse_classes(args.classes, num_classes) if args.classes else list(range(num_classes))
    per_class = args.per_class
    if args.npz:
        if args.num is not None and per_class is not None and args.num != per_class * len(classes):
            raise ValueError(f"--num {args.num} != --per-class {per_class} x {len(classes)} classes; give one of them")
        if per_class is None:
            num = 50_000 if args.num is None else args.num
            if num % len(classes):
                raise ValueError(f"--num {num} is not divisible by the {len(classes)} classes; the evaluator wants equal counts per class")
            per_class = num // len(classes)
    elif args.num is not None:
        raise ValueError("--num only applies with --npz; use --per-class for a grid")
    per_class = 8 if per_class is None else per_class
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    return [c for c in classes for _ in range(per_class)], len(classes)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> str:
    """Do the sampling; returns the summary line."""
    from mvar_dist.export import load_pretrained
    from mvar_dist.images import NpzSampleWriter, compose_grid, write_png

    metadata = read_export_metadata(args.model)
    recorded = metadata.get("tokenizer") or {}
    tokenizer_path = args.tokenizer or (Path(recorded["checkpoint"]) if recorded.get("checkpoint") else None)
    if tokenizer_path is None:
        raise ValueError(f"{args.model}/config.json names no tokenizer checkpoint: pass --tokenizer")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {tokenizer_path} does not exist")
    labels, rows = _labels(args, int(metadata["model"]["num_classes"]))
    settings = resolve_settings(metadata.get("sample"), args.cfg, args.top_k, args.top_p)
    device = _device(args.device)

    tokenizer = load_tokenizer(tokenizer_path, recorded, device)
    check_tokenizer_matches(metadata, tokenizer, str(tokenizer_path), args.allow_other_tokenizer_weights)
    model = load_pretrained(args.model, device=device)
    logger.info("sampling %d images on %s with %s, seed %d", len(labels), device, settings.kwargs() or "generate's defaults", args.seed)
    batches = sample_batches(model, tokenizer, labels, args.batch_size, args.seed, settings, device, args.precision,
                             progress=not args.no_progress)
    shown = ", ".join(f"{k}={v}" for k, v in settings.kwargs().items()) or "default settings"
    if args.npz:
        writer = None
        try:
            for images in batches:
                if writer is None:
                    writer = NpzSampleWriter(args.out, len(labels), images.shape[1], images.shape[2])
                writer.write(images)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        writer.close()
        return f"wrote {args.out}: arr_0 uint8 {writer.shape} ({rows} classes x {len(labels) // rows}; {shown}; seed {args.seed})"
    images = np.concatenate(list(batches))
    write_png(compose_grid(images, rows, args.padding), args.out)
    return f"wrote {args.out}: {rows} classes x {len(labels) // rows} images of {images.shape[1]}x{images.shape[2]} px ({shown}; seed {args.seed})"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"mvar-dist sample: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0
