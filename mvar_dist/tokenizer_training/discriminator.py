"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as VQGAN trains its tokenizer with.

It maps an image to a grid of logits, each judging one receptive-field patch (70 x 70 px for
three layers), so the adversarial loss sharpens local texture without a global judgement.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL = 4
PADDING = 1
MAX_WIDTH_FACTOR = 8  # channels double per layer up to channels * 8, as in pix2pix


def _conv(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=KERNEL, stride=stride, padding=PADDING, bias=bias)


def _normed_block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    # the conv bias is redundant in front of BatchNorm's shift
    return [_conv(in_channels, out_channels, stride, bias=False), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2)]


def init_weights(module: nn.Module) -> None:
    """VQGAN's initialisation: conv weights ~ N(0, 0.02) (biases keep torch's default),
    BatchNorm scale ~ N(1, 0.02) and shift 0. Use with ``model.apply``."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def min_input_size(num_layers: int) -> int:
    """Smallest image side that still gives a logit map of at least 1 x 1.

    ``num_layers`` stride-2 convolutions halve the side (n -> n // 2); each of the two last
    stride-1 4x4 convolutions (padding 1) takes one pixel off, so n // 2**L must be >= 3.
    """
    return 3 * 2**num_layers


class PatchDiscriminator(nn.Module):
    """NLayerDiscriminator: image (B, in_channels, H, W) -> logits (B, 1, h, w).

    Layers (all 4x4 convolutions, padding 1):

    - conv stride 2 to ``channels`` (with bias), LeakyReLU(0.2);
    - ``num_layers - 1`` blocks of conv stride 2 (no bias), BatchNorm, LeakyReLU(0.2), the width
      doubling each block up to ``8 * channels``;
    - one conv stride 1 (no bias), BatchNorm, LeakyReLU(0.2), at width ``min(2**num_layers, 8) * channels``;
    - conv stride 1 to one logit channel (with bias).

    For 256 px and ``num_layers=3`` the map is 30 x 30. Inputs must have a side of at least
    :func:`min_input_size` (24 px for three layers; 16 px images need ``num_layers <= 2``).
    The BatchNorm layers use per-call batch statistics in train mode, so real and fake images
    should be judged in separate calls, as VQGAN does.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator: num_layers must be >= 1, got {num_layers}")
        if in_channels < 1 or channels < 1:
            raise ValueError(
                f"PatchDiscriminator: in_channels and channels must be >= 1, got {in_channels}, {channels}"
            )
        self.num_layers = num_layers
        layers: list[nn.Module] = [_conv(in_channels, channels, stride=2, bias=True), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers):
            next_width = channels * min(2**n, MAX_WIDTH_FACTOR)
            layers += _normed_block(width, next_width, stride=2)
            width = next_width
        next_width = channels * min(2**num_layers, MAX_WIDTH_FACTOR)
        layers += _normed_block(width, next_width, stride=1)
        layers.append(_conv(next_width, 1, stride=1, bias=True))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4:
            raise ValueError(f"PatchDiscriminator: expected images (B, C, H, W), got shape {tuple(image.shape)}")
        smallest = min_input_size(self.num_layers)
        if min(image.shape[-2:]) < smallest:
            raise ValueError(
                f"PatchDiscriminator: images of {tuple(image.shape[-2:])} px are too small for num_layers="
                f"{self.num_layers} (needs a side of at least {smallest} px); lower num_layers"
            )
        return self.main(image)
