"""Reading weight files a user was given: ``.safetensors``, or ``.pth`` state dicts loaded with
``weights_only=True`` so that a file from elsewhere cannot run code while it is read."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """name -> tensor from ``path``; ``what`` names the file in error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends: refuse, never fall back to full unpickling
        raise ValueError(f"{what} {path} is not a plain tensor state dict ({type(error).__name__}: {error})") from None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a state dict (name -> tensor)")
    return dict(state_dict)


def check_state_dict_matches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, target: str, hint: str = ""
) -> None:
    """Raise a ValueError naming the first missing key, unexpected key and mismatched shape."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    if mismatched:
        key = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatch(es), first {key!r}: {tuple(given[key].shape)} in the "
            f"checkpoint, {tuple(expected[key].shape)} in the model"
        )
    if problems:
        raise ValueError(f"{source} does not fit {target}: " + "; ".join(problems) + (f". {hint}" if hint else ""))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (weights and shards are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class ChecksumMismatch(ValueError):
    """A file's bytes are not those whose sha256 was recorded when it was written."""


def verify_file_sha256(path: str | Path, expected: str, record: str | Path) -> None:
    """:class:`ChecksumMismatch` naming ``path`` unless its sha256 is ``expected``, the value
    ``record`` (an export's config.json) holds for it. Model and tokenizer exports share it, so
    that a damaged or swapped file reads the same whichever export it belongs to."""
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatch(
            f"{path}: sha256 {actual[:12]}... differs from {expected[:12]}... recorded in {record}: the file is "
            "damaged or belongs to another export; export again (or pass verify=False / --no-verify to load it anyway)"
        )
