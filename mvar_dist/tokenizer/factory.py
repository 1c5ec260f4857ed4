"""The one place that turns a tokenizer's description into a tokenizer: the experiment's
``tokenizer`` section (``kind``, ``checkpoint``, ``options``), or the identity a manifest or an
export recorded."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from mvar_dist.tokenizer.base import ResidualTokenizer
from mvar_dist.tokenizer.export_files import resolve_checkpoint, verify_checkpoint
from mvar_dist.tokenizer.patch import PatchResidualTokenizer, QuickstartTokenizerConfig
from mvar_dist.tokenizer.saving import read_saved_config
from mvar_dist.tokenizer.vqvae import MultiScaleVQVAE, TokenizerConfig

Kind = Literal["vqvae", "patch"]
KINDS: dict[str, type[ResidualTokenizer]] = {"vqvae": MultiScaleVQVAE, "patch": PatchResidualTokenizer}


ARCHITECTURES: dict[str, type] = {"vqvae": TokenizerConfig, "patch": QuickstartTokenizerConfig}


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """ValueError naming the first option ``kind``'s architecture does not have, or its first bad
    value: what building the tokenizer would find, without building it."""
    architecture = ARCHITECTURES[kind]
    names = [f.name for f in dataclasses.fields(architecture)]
    for name in options:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown option {str(name)[:60]!r} of the {kind} tokenizer{hint} (options: {', '.join(names)})")
    try:
        architecture(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)[:300]) from None


def kind_of(identity: Mapping[str, Any] | None, default: str = "vqvae") -> str:
    """The kind of the tokenizer an identity describes (its recorded class), else ``default``."""
    recorded = (identity or {}).get("class")
    for kind, cls in KINDS.items():
        if cls.IDENTITY_CLASS == recorded:
            return kind
    if recorded is not None:
        raise ValueError(f"unknown tokenizer class {recorded!r}; known: {sorted(c.IDENTITY_CLASS for c in KINDS.values())}")
    return default


def load_tokenizer(
    checkpoint: str | Path, kind: str = "vqvae", options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu", verify: bool = True,
) -> ResidualTokenizer:
    """A tokenizer of ``kind`` with architecture ``options`` and the weights of ``checkpoint``,
    in eval mode on ``device``. ``checkpoint`` may be a tokenizer export directory (its
    ``tokenizer.safetensors``); ``verify`` checks a file of an export against the sha256 its
    config.json records (:func:`~mvar_dist.tokenizer.export_files.verify_checkpoint`). Raises
    FileNotFoundError or ValueError naming the file."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {sorted(KINDS)}, got {kind!r}")
    checkpoint = resolve_checkpoint(checkpoint)
    if verify:  # before anything in the file is read: a damaged file is named as such
        verify_checkpoint(checkpoint)
    try:
        tokenizer = KINDS[kind].from_checkpoint(checkpoint, map_location=device, **dict(options or {}))
    except TypeError as error:  # an option the class does not have
        raise ValueError(f"tokenizer options {dict(options or {})} do not fit the {kind} tokenizer: {error}") from None
    return tokenizer.to(device).eval()


def load_recorded_tokenizer(
    checkpoint: str | Path, recorded: Mapping[str, Any], device: str | torch.device = "cpu", verify: bool = True
) -> ResidualTokenizer:
    """The tokenizer an export's config.json records (``kind``, ``options``, ``identity``),
    with the weights of ``checkpoint`` (checked as :func:`load_tokenizer` checks it)."""
    checkpoint = resolve_checkpoint(checkpoint)
    if verify:  # before read_saved_config parses the file
        verify_checkpoint(checkpoint)
    identity = recorded.get("identity") or {}
    kind = kind_of(identity, default=str(recorded.get("kind", "vqvae")))
    # a file that records its own architecture is loaded as it is (the caller compares it with
    # the identity); a bare state dict needs the recorded architecture to be built
    described = read_saved_config(checkpoint, KINDS[kind].CONFIG_METADATA_KEY) is not None
    options = {} if described else identity.get("config") or recorded.get("options") or {}
    return load_tokenizer(checkpoint, kind, options, device, verify=False)  # verified above
