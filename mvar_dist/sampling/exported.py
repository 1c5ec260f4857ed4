"""An exported model and its tokenizer, loaded together: the tokenizer must be the one the model
was trained with, checked against the identity ``mvar-dist export`` recorded in config.json
before any sampling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mvar_dist.model.pretrained import read_export_metadata
from mvar_dist.model.transformer import MVAR
from mvar_dist.state_files import ChecksumMismatch
from mvar_dist.tokenizer.base import Tokenizer
from mvar_dist.tokenizer.factory import load_recorded_tokenizer

logger = logging.getLogger(__name__)


class TokenizerMismatch(ValueError):
    """The tokenizer given to ``sample`` is not the one the model was trained with."""


def load_tokenizer(path: str | Path, recorded: dict[str, Any], device: torch.device, verify: bool = True) -> Tokenizer:
    """The tokenizer an export records (its identity class, else its kind), loaded from ``path``;
    ``verify`` checks a tokenizer export's file against the sha256 its config.json records."""
    from safetensors import SafetensorError

    try:
        return load_recorded_tokenizer(path, recorded, device, verify)
    except ChecksumMismatch:
        raise  # a damaged or swapped file, not another kind of tokenizer: its own message says so
    except (ValueError, RuntimeError, SafetensorError) as err:
        identity = recorded.get("identity") or {}
        kind = identity.get("class") or recorded.get("kind", "vqvae")
        raise TokenizerMismatch(f"{path} cannot be loaded as the tokenizer the model was trained with ({kind}): {err}") from None


def check_tokenizer_matches(metadata: dict[str, Any], tokenizer: Tokenizer, source: str, allow_other_weights: bool = False) -> None:
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


def load_exported(
    model_dir: str | Path, tokenizer_path: str | Path | None = None, device: torch.device = torch.device("cpu"),
    allow_other_weights: bool = False, verify: bool = True,
) -> tuple[MVAR, Tokenizer, dict[str, Any]]:
    """(model in eval mode, its tokenizer, config.json) of an export; the tokenizer file defaults
    to the one config.json names, and must match the identity recorded there. ``verify`` checks
    the model's weights, and a tokenizer export's file, against the sha256 their config.json records."""
    metadata = read_export_metadata(model_dir)
    recorded = metadata.get("tokenizer") or {}
    if tokenizer_path is None:
        if not recorded.get("checkpoint"):
            raise ValueError(f"{model_dir}/config.json names no tokenizer checkpoint: pass --tokenizer")
        tokenizer_path = recorded["checkpoint"]
    if not Path(tokenizer_path).exists():  # a file, or a tokenizer export directory
        raise FileNotFoundError(f"tokenizer checkpoint {tokenizer_path} does not exist")
    tokenizer = load_tokenizer(tokenizer_path, recorded, device, verify)
    check_tokenizer_matches(metadata, tokenizer, str(tokenizer_path), allow_other_weights)
    return MVAR.from_pretrained(model_dir, device=device, verify=verify), tokenizer, metadata
