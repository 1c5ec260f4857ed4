"""The released VAR / MVAR checkpoint layout (``var_d16.pth``, ``mvar-d16.pth``): reading such a
file into a model, and writing ours in that layout.

The released modules register buffers derived from the config (``lvl_1L``,
``attn_bias_for_masking``, ``zero_k_bias``); our model drops them on load and
:func:`official_state_dict` puts them back, so the paper's code loads our exports strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mvar_dist.model.config import MVARConfig
from mvar_dist.state_files import load_state_dict_file

logger = logging.getLogger(__name__)


def derived_buffers(model_config: MVARConfig) -> dict[str, torch.Tensor]:
    """The buffers VAR/MVAR register at construction (not learned), as the released code builds them."""
    layout = model_config.layout
    scale_of = layout.scale_ids
    if model_config.mode == "mvar":  # each token sees its own scale (token 0: itself)
        allowed = scale_of[:, None] == scale_of[None, :]
    else:  # VAR: block-causal over scales
        allowed = scale_of[None, :] <= scale_of[:, None]
    bias = torch.zeros(layout.num_tokens, layout.num_tokens).masked_fill_(~allowed, float("-inf"))
    return {"lvl_1L": scale_of[None, :].clone(), "attn_bias_for_masking": bias[None, None]}


def official_state_dict(state: dict[str, torch.Tensor], model_config: MVARConfig) -> dict[str, torch.Tensor]:
    """Our state dict with the released derived buffers inserted where the paper's modules have them."""
    buffers = derived_buffers(model_config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[key] = value
        if key == "pos_1LC":
            out.update(buffers)
        elif key.endswith(".attn.v_bias"):  # SelfAttention registers zero_k_bias after v_bias
            out[key.removesuffix("v_bias") + "zero_k_bias"] = torch.zeros_like(value)
    return out


def load_released_weights(model: torch.nn.Module, path: str | Path) -> None:
    """A released VAR/MVAR state dict (or ours) into ``model``, strictly; ValueError naming the keys."""
    state = load_state_dict_file(path, "cpu", what="weights file")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            f"check model.depth and model.patch_nums"
        )
    logger.info("initialised weights from %s", path)
