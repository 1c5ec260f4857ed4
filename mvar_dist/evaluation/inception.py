"""The FID Inception-v3: the network of TensorFlow's 2015-12-05 Inception graph, which OpenAI's
ADM evaluator (and every FID since TTUR) runs, written here in PyTorch. The weights are not
ours to ship: the user supplies the widely used conversion ``pt_inception-2015-12-05-6726825d.pth``
(``--inception PATH`` or ``$MVAR_DIST_INCEPTION``); nothing is ever downloaded.

What the ADM evaluator reads from the graph, and what :class:`FIDInceptionV3` returns:

* ``pool_3`` (2048): the FID features;
* ``mixed_6/conv`` (Mixed_6d's 1x1 branch after its ReLU), first 7 channels of the 17x17 grid,
  flattened as TF's NHWC array is (h, w, c): the sFID features (2023);
* softmax of ``pool_3 @ W`` with the logits MatMul's weight only (no bias): the Inception Score's
  class probabilities (1008).

The graph's input (after ``ExpandDims``) is a float image in [0, 255]; it resizes to 299x299 with
TF's legacy bilinear ``ResizeBilinear`` (align_corners=False, no half-pixel centres) and maps to
[-1, 1) with (x - 128) / 128. Both are reproduced here (``resize="tf"``, the default);
``resize="torch"`` is pytorch-fid's preprocessing instead (F.interpolate, x / 127.5 - 1).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mvar_dist.evaluation.inception_blocks import (
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)
from mvar_dist.state_files import load_state_dict_file

logger = logging.getLogger(__name__)

INCEPTION_ENV = "MVAR_DIST_INCEPTION"
WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
RESIZE_MODES = ("tf", "torch")
_BATCH_COUNTER = "num_batches_tracked"


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor  # (N, 2048) float32, pool_3: the FID features
    spatial: torch.Tensor  # (N, 2023) float32, mixed_6/conv[..., :7] flattened (h, w, c): sFID
    probabilities: torch.Tensor  # (N, 1008) float32, softmax(pool @ fc.weight.T), no bias: IS


def tf_legacy_resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float NHWC ``images`` to ``size`` x ``size`` as TF 1.x's
    ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) does: output pixel ``i``
    samples the source at ``i * in / out``, the upper neighbour clamped at the last row/column.
    The coordinates are computed in float32 as TF computes them."""
    _, height, width, _ = images.shape

    def axis(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(size), dtype=torch.float32)
        source = torch.arange(size, dtype=torch.float32) * scale
        lower = source.floor().to(torch.long).clamp(max=in_size - 1)
        upper = (lower + 1).clamp(max=in_size - 1)
        return lower.to(images.device), upper.to(images.device), (source - lower).to(images.device, images.dtype)

    top, bottom, y_weight = axis(height)
    left, right, x_weight = axis(width)
    # TF interpolates along x first, then along y; the same order keeps the float rounding alike
    x_weight = x_weight[None, None, :, None]
    upper_rows, lower_rows = images[:, top], images[:, bottom]
    top_line = upper_rows[:, :, left] + (upper_rows[:, :, right] - upper_rows[:, :, left]) * x_weight
    bottom_line = lower_rows[:, :, left] + (lower_rows[:, :, right] - lower_rows[:, :, left]) * x_weight
    return top_line + (bottom_line - top_line) * y_weight[None, :, None, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 as the FID graph builds it; module names are torchvision's ``Inception3``
    names (without ``AuxLogits``), so the converted weights file loads strictly."""

    def __init__(self, resize: str = "tf") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float NHWC images of any size -> the network's NCHW float32 input."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) images, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"expected uint8 or float images in [0, 255], got {images.dtype}")
        x = images.to(self.fc.weight.device, torch.float32)
        if self.resize == "tf":
            if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
                x = tf_legacy_resize(x, INPUT_SIZE)
            return ((x - 128.0) / 128.0).permute(0, 3, 1, 2).contiguous()
        x = x.permute(0, 3, 1, 2)
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return (x / 127.5 - 1.0).contiguous()

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, branch1x1 = self.Mixed_6d.forward_with_1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        # NHWC flattening, as the evaluator reshapes TF's (N, 17, 17, 7) array
        spatial = branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        probabilities = torch.softmax(pool @ self.fc.weight.T, dim=1)
        return InceptionFeatures(pool, spatial, probabilities)


def inception_state_shapes() -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the weights file, ``num_batches_tracked`` counters left
    out (some conversions hold them, some do not; :func:`load_inception` accepts both)."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.endswith(_BATCH_COUNTER)}


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the weights file's layout with He-scaled random convolutions and identity
    batch norms (finite features through all 94 layers): for tests and speed benchmarks, whose
    figures do not depend on the values. Its features mean nothing."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in inception_state_shapes().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.zeros(shape)
    return state


def resolve_inception_path(path: str | Path | None) -> Path:
    """The weights file: ``path`` (the ``--inception`` flag) if given, else ``$MVAR_DIST_INCEPTION``."""
    if path is None or str(path) == "":
        value = os.environ.get(INCEPTION_ENV, "")
        if not value:
            raise FileNotFoundError(
                f"no Inception weights file: pass --inception PATH or set ${INCEPTION_ENV} to {WEIGHTS_FILE_NAME} "
                "(the converted FID Inception-v3 weights; nothing is downloaded)"
            )
        path, source = value, f"${INCEPTION_ENV}"
    else:
        source = "--inception"
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"Inception weights file {resolved} (from {source}) does not exist; it should be {WEIGHTS_FILE_NAME}, "
            f"given with --inception PATH or ${INCEPTION_ENV} (nothing is downloaded)"
        )
    return resolved


def _mismatch_report(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], shown: int = 5) -> list[str]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} (expected {tuple(expected[k].shape)}, file has {tuple(given[k].shape)})"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            problems.append(f"{len(keys)} {label}: " + ", ".join(keys[:shown]) + more)
    return problems


def load_inception(path: str | Path | None, device: torch.device | str = "cpu", *, resize: str = "tf") -> FIDInceptionV3:
    """The FID Inception-v3 with the weights of ``path`` (or ``$MVAR_DIST_INCEPTION``), loaded
    strictly, in eval mode on ``device``."""
    file = resolve_inception_path(path)
    state = load_state_dict_file(file, "cpu", what="Inception weights")
    model = FIDInceptionV3(resize=resize)
    expected = model.state_dict()
    # the counters only count training batches, which eval mode never reads
    state = {k: v for k, v in state.items() if not k.endswith(_BATCH_COUNTER) or k in expected}
    for key in expected:
        if key.endswith(_BATCH_COUNTER) and key not in state:
            state[key] = expected[key]
    problems = _mismatch_report(expected, state)
    if problems:
        raise ValueError(
            f"Inception weights {file} do not fit the FID Inception-v3 (expected {WEIGHTS_FILE_NAME} "
            "in torchvision's Inception3 key layout): " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded the FID Inception-v3 from %s", file)
    return model.to(device).eval()
