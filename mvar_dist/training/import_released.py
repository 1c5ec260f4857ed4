"""A released VAR / MVAR checkpoint (``var_d16.pth``, ``var_d20.pth``, ``var_d24.pth``,
``mvar-d16.pth``) -> an export directory (``mvar-dist import-released``), the one ``mvar-dist
export`` writes: ``model.safetensors`` (or the released ``.pth`` layout) + ``config.json`` with the
released model config of that depth and mode, the tokenizer identity and the published sampling
settings, so that ``mvar-dist sample --model`` and ``MVAR.from_pretrained`` read it.

The file is checked key by key and shape by shape against the released layout of the chosen
depth and mode (the derived buffers of :mod:`mvar_dist.model.released` included: its attention
mask tells VAR's block-causal file from MVAR's block-diagonal one) before anything is written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvar_dist import __version__
from mvar_dist.config.deepspeed_templates import TEMPLATE_DIR
from mvar_dist.config.loading import read_config_file
from mvar_dist.config.sections import SampleConfig
from mvar_dist.model.config import MVARConfig
from mvar_dist.model.pretrained import EXPORT_FORMAT
from mvar_dist.model.released import derived_buffers, official_state_dict
from mvar_dist.model.transformer import MVAR
from mvar_dist.sampling.exported import check_tokenizer_matches
from mvar_dist.state_files import file_sha256, load_state_dict_file
from mvar_dist.tokenizer import load_tokenizer
from mvar_dist.training.export import DTYPES

logger = logging.getLogger(__name__)

# configs/ beside configs/deepspeed/ (a checkout, or the copy a regular install carries)
PUBLISHED_CONFIG_DIR = TEMPLATE_DIR.parent

# (mode, depth) of a released checkpoint -> the published config whose ``sample`` section holds the
# settings published for those weights; the settings themselves live only in those files. No
# var_d20/var_d24 recipe is published here: the configs that start from those weights (and share
# their depth's settings) stand in.
PUBLISHED_SAMPLE_CONFIGS: dict[tuple[str, int], str] = {
    ("var", 16): "var_d16.yaml",
    ("var", 20): "mvar_d20_ft.yaml",
    ("var", 24): "mvar_d24_ft.yaml",
    ("mvar", 16): "mvar_d16.yaml",
}

# var_d16.pth, mvar-d16.pth, and the mvar_d16.pth that `mvar-dist export --format official` writes
_RELEASED_NAME = re.compile(r"^(?P<mode>mvar|var)[-_]d(?P<depth>\d+)$", re.IGNORECASE)
_SHOWN = 3  # mismatches named per kind


def infer_from_name(path: str | Path) -> tuple[str | None, int | None]:
    """(mode, depth) that a released file name states (``var_d16.pth`` -> ("var", 16)), else (None, None)."""
    match = _RELEASED_NAME.match(Path(path).stem)
    if match is None:
        return None, None
    return match["mode"].lower(), int(match["depth"])


def released_model_config(mode: str, depth: int, **fields: Any) -> MVARConfig:
    """The model config of the released checkpoint of ``mode`` and ``depth`` (width 64 x depth,
    depth heads, 1000 classes, the VQVAE's 4096 x 32 codes on the 10 scales); ``fields`` override
    (tests use tiny models)."""
    return MVARConfig(depth=depth, mode=mode, **fields)  # type: ignore[arg-type]


def published_sample_settings(mode: str, depth: int) -> tuple[dict[str, Any], str]:
    """(cfg / top_p / top_k, where they come from) for the released ``mode`` d``depth``: the
    ``sample`` section of its published config, else the section defaults of docs/config.md."""
    name = PUBLISHED_SAMPLE_CONFIGS.get((mode, depth))
    path = PUBLISHED_CONFIG_DIR / name if name else None
    section: dict[str, Any] = {}
    if path is not None and path.is_file():
        section = read_config_file(path).get("sample") or {}
    elif path is not None:
        logger.warning("published config %s not found: recording the default sampling settings", path)
    defaults = SampleConfig()
    settings = {key: section.get(key, getattr(defaults, key)) for key in ("cfg", "top_p", "top_k")}
    return settings, (f"configs/{name}" if section else "the defaults of the sample section")


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _same_values(given: torch.Tensor, expected: torch.Tensor) -> bool:
    if given.is_meta or tuple(given.shape) != tuple(expected.shape):
        return given.is_meta
    return torch.equal(given.float(), expected.float())


def check_released_state(state: dict[str, torch.Tensor], config: MVARConfig, source: str) -> dict[str, torch.Tensor]:
    """``state`` (a released file's, or ours without the derived buffers) as our model's state dict,
    in its key order; ValueError naming the first missing and unexpected keys, shape mismatches
    and, for ``attn_bias_for_masking``, a mask of the other mode."""
    with torch.device("meta"):
        ours = MVAR(config).state_dict()
    expected = official_state_dict(ours, config)
    derived = set(expected) - set(ours)  # optional: our own layout has none of them
    what = f"depth {config.depth}" + ("" if config.embed_dim == 64 * config.depth else f" (width {config.embed_dim})")
    missing = [k for k in expected if k not in state and k not in derived]
    unexpected = [k for k in state if k not in expected]
    wrong_keys = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    wrong_keys.sort(key=lambda k: (not k.startswith("blocks."), expected[k].dim() < 2))  # a block's matrices say most
    wrong = [f"{k}: file {_shape(state[k])}, {what} expects {_shape(expected[k])}" for k in wrong_keys]
    problems = [f"missing {k}" for k in missing[:_SHOWN]] + [f"unexpected {k}" for k in unexpected[:_SHOWN]] + wrong[:_SHOWN]
    if not problems:  # the shapes fit: the derived buffers tell the mode (and the scale layout)
        buffers = derived_buffers(config)
        mask = state.get("attn_bias_for_masking")
        if mask is not None and not _same_values(mask, buffers["attn_bias_for_masking"]):
            other = "var" if config.mode == "mvar" else "mvar"
            if _same_values(mask, derived_buffers(MVARConfig(**{**config.to_dict(), "mode": other}))["attn_bias_for_masking"]):
                kinds = {"var": "VAR's block-causal mask (mode var)", "mvar": "MVAR's block-diagonal mask (mode mvar)"}
                problems.append(f"attn_bias_for_masking: the file holds {kinds[other]}, --mode {config.mode} expects {kinds[config.mode]}")
            else:
                problems.append(f"attn_bias_for_masking: the file's mask is neither VAR's nor MVAR's for patch_nums {list(config.patch_nums)}")
        level = state.get("lvl_1L")
        if level is not None and not _same_values(level, buffers["lvl_1L"]):
            problems.append(f"lvl_1L: the file's scale of each token differs from patch_nums {list(config.patch_nums)}")
        if mask is None:
            logger.warning("%s has no attn_bias_for_masking: its mode cannot be checked, taking --mode %s", source, config.mode)
    if problems:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shapes"
        raise ValueError(
            f"{source} does not match the released {config.mode} layout of {what} ({counts}): "
            + "; ".join(problems) + ". Check --depth and --mode"
        )
    return {key: state[key] for key in ours}


@dataclass
class PreparedImport:
    """What :func:`mvar_dist.training.export.write_export` writes for one released file."""

    state: dict[str, torch.Tensor]
    model_config: MVARConfig
    metadata: dict[str, Any]


def prepare_import(
    checkpoint: str | Path, tokenizer: str | Path, mode: str | None = None, depth: int | None = None,
    tokenizer_kind: str = "vqvae", dtype: str = "fp32", sample: dict[str, Any] | None = None,
    model_fields: dict[str, Any] | None = None,
) -> PreparedImport:
    """Read and check a released checkpoint and the tokenizer; nothing is written. ``mode`` and
    ``depth`` default to what the file name states; ``sample`` overrides the published settings
    key by key (None values ignored)."""
    checkpoint = Path(checkpoint)
    named_mode, named_depth = infer_from_name(checkpoint)
    mode, depth = mode or named_mode, depth or named_depth
    if mode is None or depth is None:
        raise ValueError(f"cannot tell the mode and depth from the file name {checkpoint.name} (not var_d<N>.pth or "
                         "mvar-d<N>.pth): pass --mode and --depth")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = released_model_config(mode, depth, **(model_fields or {}))
    state = load_state_dict_file(checkpoint, "cpu", what="released checkpoint")
    if "model" in state and isinstance(state["model"], dict):  # a training checkpoint around the weights
        state = state["model"]
    state = check_released_state(state, config, str(checkpoint))

    tok = load_tokenizer(tokenizer, tokenizer_kind)
    settings, origin = published_sample_settings(mode, depth)
    settings.update({k: v for k, v in (sample or {}).items() if v is not None})
    metadata = {
        "format": EXPORT_FORMAT,
        "mvar_dist_version": __version__,
        "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "model": config.to_dict(),
        "patch_nums": list(config.patch_nums),
        "tokenizer": {"kind": tokenizer_kind, "checkpoint": str(tokenizer), "options": {}, "identity": tok.identity()},
        "sample": settings,
        "released": {
            "file": str(checkpoint.resolve()),
            "file_sha256": file_sha256(checkpoint),
            "mode": mode,
            "depth": depth,
            "sample_settings_from": origin,
        },
    }
    check_tokenizer_matches(metadata, tok, str(tokenizer))
    return PreparedImport(state, config, metadata)

