"""The convolutional encoder and decoder of the VAR tokenizer (a VQGAN f16 network).

Module names follow the released checkpoint ``vae_ch160v4096z32.pth`` exactly
(``down.N.block.M``, ``down.N.attn.M``, ``mid.block_1``, ``up.N.upsample.conv``, ...), so that
its state dict loads without renaming. The operations and their order also follow the
published network, so that the same weights give the same floats.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % GROUP_NORM_GROUPS:
        raise ValueError(
            f"{channels} channels cannot be split into {GROUP_NORM_GROUPS} GroupNorm groups; "
            f"choose ch so that ch * ch_mult[i] is a multiple of {GROUP_NORM_GROUPS}"
        )
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3x3, GN, SiLU, (dropout), conv3x3, plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = (
            conv1x1(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv1x1(channels, 3 * channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # explicit bmm/softmax in the published order rather than a fused kernel: the codes are
        # an argmin over encoder outputs, so the encoder must reproduce the released floats
        q_by_position = q.permute(0, 2, 1).contiguous()  # (B, HW, C)
        scores = torch.bmm(q_by_position, k.contiguous()).mul_(channels**-0.5)  # (B, HW_q, HW_k)
        weights = F.softmax(scores, dim=2)
        attended = torch.bmm(v.contiguous(), weights.permute(0, 2, 1).contiguous())  # (B, C, HW_q)
        return x + self.proj_out(attended.view(batch, channels, height, width))


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnet blocks, each followed by attention where ``attn`` is non-empty."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, with_attention: bool, dropout: float
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout) for a, b in zip(widths, widths[1:]))
        num_attention = num_blocks if with_attention else 0
        self.attn = nn.ModuleList(AttentionBlock(out_channels) for _ in range(num_attention))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class EncoderLevel(Level):
    def __init__(self, *level_args: Any, downsample: bool, **level_kwargs: Any) -> None:
        super().__init__(*level_args, **level_kwargs)
        out_channels = self.block[-1].conv2.out_channels
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(h)
        return h if self.downsample is None else self.downsample(h)


class DecoderLevel(Level):
    def __init__(self, *level_args: Any, upsample: bool, **level_kwargs: Any) -> None:
        super().__init__(*level_args, **level_kwargs)
        out_channels = self.block[-1].conv2.out_channels
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(h)
        return h if self.upsample is None else self.upsample(h)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttentionBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H / 2**(levels-1), W / 2**(levels-1))."""

    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
        in_channels: int = 3, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = conv3x3(in_channels, ch)
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.down = nn.ModuleList(
            EncoderLevel(
                widths[i], widths[i + 1], num_res_blocks,
                with_attention=i == last, dropout=dropout, downsample=i != last,
            )
            for i in range(len(ch_mult))
        )
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3x3(widths[-1], z_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(image)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * 2**(levels-1), w * 2**(levels-1)), unclamped."""

    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
        out_channels: int = 3, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        deepest = ch * ch_mult[last]
        self.conv_in = conv3x3(z_channels, deepest)
        self.mid = MidBlock(deepest, dropout)
        # up[i] works at the resolution of encoder level i; it runs from the deepest level up,
        # each level taking the width of the level below it (in run order) as input
        in_widths = [ch * m for m in ch_mult[1:]] + [deepest]
        self.up = nn.ModuleList(
            DecoderLevel(
                in_widths[i], ch * ch_mult[i], num_res_blocks + 1,
                with_attention=i == last, dropout=dropout, upsample=i != 0,
            )
            for i in range(len(ch_mult))
        )
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = conv3x3(ch * ch_mult[0], out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
