"""VAR's multi-scale residual quantiser: the codebook, the phi convolutions and the
coarse-to-fine residual loop (docs/semantics.md, section 2), shared by both tokenizers.

Scale s picks, for the area-downsampled residual, the nearest codebook entries; their bicubic
upsampling, passed through phi, is added to f_hat and subtracted from the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mvar_dist.scales import ScaleLayout, phi_index


class Phi(nn.Conv2d):
    """phi(h) = (1 - mix) * h + mix * conv3x3(h), applied to every scale's contribution."""

    def __init__(self, channels: int, mix: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.mix = mix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.mix) + super().forward(h) * self.mix


class SharedPhis(nn.Module):
    """K phi convolutions shared by all scales; scale s uses ``phi_index(s, S, K)`` (the
    published tick rule for any K: 1/(3K) margins for K = 4, 1/(2K) otherwise)."""

    def __init__(self, channels: int, num_convs: int, mix: float, num_scales: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, mix) for _ in range(num_convs))
        self.num_scales = num_scales

    def forward(self, h: torch.Tensor, scale: int) -> torch.Tensor:
        return self.qresi_ls[phi_index(scale, self.num_scales, len(self.qresi_ls))](h)


class IdentityPhi(nn.Module):
    """phi = identity (the quickstart's patch tokenizer has no phi convolutions)."""

    def forward(self, h: torch.Tensor, scale: int) -> torch.Tensor:
        return h


def _drop_usage_statistics(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # load_state_dict hands hooks its own copy of the dict: the caller's stays untouched
    state_dict.pop(prefix + "ema_vocab_hit_SV", None)


@dataclass
class TrainingQuantization:
    """What the residual loop gives training: f_hat (gradient straight through to f), the VQ loss,
    the codes per scale (B, pn*pn), and the residual vectors each scale quantised (for code
    usage statistics and dead-code restarts)."""

    f_hat: torch.Tensor
    vq_loss: torch.Tensor
    codes: list[torch.Tensor]
    targets: list[torch.Tensor]


class MultiScaleQuantizer(nn.Module):
    """The codebook, the phi convolutions and the coarse-to-fine residual loop."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], phis: nn.Module) -> None:
        """``phis(h, scale)`` maps each scale's upsampled codes to its contribution
        (:class:`SharedPhis` in VAR's tokenizer, :class:`IdentityPhi` for the patch tokenizer)."""
        super().__init__()
        self.layout = ScaleLayout(patch_nums)
        # registration order = the released state-dict order
        self.quant_resi = phis
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # the released file carries a usage-statistics buffer we do not keep
        self.register_load_state_dict_pre_hook(_drop_usage_statistics)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Cv, h, w) -> (B, h*w) indices of the nearest codebook entries (squared L2).

        The distance is expanded as |z|^2 + |e|^2 - 2 z.e in the published order: exact ties
        and float round-off decide some codes, so another formula could pick other codes.
        """
        batch, channels = z.shape[:2]
        vectors = z.permute(0, 2, 3, 1).reshape(-1, channels)
        codebook = self.embedding.weight
        distances = vectors.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        distances.addmm_(vectors, codebook.T, alpha=-2, beta=1)
        return distances.argmin(dim=1).view(batch, -1)

    def scale_contribution(self, codes: torch.Tensor, scale: int) -> torch.Tensor:
        """phi(bicubic_up(e[codes])): scale ``scale``'s (B, pn*pn) codes as a (B, Cv, P, P) addend."""
        pn, final = self.layout.patch_nums[scale], self.layout.final_size
        if codes.dim() != 2 or codes.shape[1] != pn * pn:
            raise ValueError(
                f"scale {scale} ({pn}x{pn}) needs codes of shape (B, {pn * pn}), got {tuple(codes.shape)}"
            )
        # channels-last view, as the published lookup: the bicubic kernel then runs the same path
        h = self.embedding(codes).view(codes.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        if scale != self.layout.num_scales - 1:
            h = F.interpolate(h, size=(final, final), mode="bicubic")
        return self.quant_resi(h.contiguous(), scale)

    def teacher_input_for_scale(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """f_hat (B, Cv, P, P) area-downsampled to scale ``scale``'s grid -> (B, pn*pn, Cv), raster order."""
        pn = self.layout.patch_nums[scale]
        if pn != f_hat.shape[-1]:
            f_hat = F.interpolate(f_hat, size=(pn, pn), mode="area")
        return f_hat.flatten(2).transpose(1, 2)

    def quantize(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B, Cv, P, P) -> codes, one (B, pn*pn) LongTensor per scale."""
        residual, f_hat = f.clone(), torch.zeros_like(f)
        codes = []
        for scale, pn in enumerate(self.layout.patch_nums):
            last = scale == self.layout.num_scales - 1
            target = residual if last else F.interpolate(residual, size=(pn, pn), mode="area")
            codes.append(self.nearest_codes(target))
            contribution = self.scale_contribution(codes[-1], scale)
            f_hat.add_(contribution)
            residual.sub_(contribution)
        return codes

    def quantize_for_training(self, f: torch.Tensor, beta: float = 0.25) -> TrainingQuantization:
        """The residual loop with gradients (VAR's training recipe): codes as :meth:`quantize`
        picks them; per scale the codebook term |f_hat - sg(f)|^2 (to the codebook and phi) plus
        ``beta`` x the commitment term |sg(f_hat) - f|^2 (to the encoder), both after adding the
        scale, averaged over scales; the returned f_hat passes the decoder's gradient straight
        through to f (its value is f_hat's)."""
        fixed = f.detach()
        residual, f_hat = fixed.clone(), torch.zeros_like(fixed)
        loss = f.new_zeros(())
        codes, targets = [], []
        for scale, pn in enumerate(self.layout.patch_nums):
            last = scale == self.layout.num_scales - 1
            with torch.no_grad():
                target = residual if last else F.interpolate(residual, size=(pn, pn), mode="area")
                codes.append(self.nearest_codes(target))
            targets.append(target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]))
            contribution = self.scale_contribution(codes[-1], scale)
            f_hat = f_hat + contribution
            residual = residual - contribution.detach()
            loss = loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, fixed)
        straight_through = f + (f_hat - fixed).detach()
        return TrainingQuantization(straight_through, loss / self.layout.num_scales, codes, targets)

    def empty_f_hat(self, batch: int) -> torch.Tensor:
        final = self.layout.final_size
        return self.embedding.weight.new_zeros(batch, self.embedding.embedding_dim, final, final)

    def f_hat_from_codes(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        f_hat = self.empty_f_hat(codes[0].shape[0])
        for scale, codes_s in enumerate(codes):
            f_hat.add_(self.scale_contribution(codes_s, scale))
        return f_hat

    def teacher_input(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, L-1, Cv): f_hat after scales 0..s, downsampled to scale s+1, for s = 0..S-2."""
        f_hat = self.empty_f_hat(codes[0].shape[0])
        pieces = [f_hat.new_zeros(f_hat.shape[0], 0, f_hat.shape[1])]
        for scale in range(self.layout.num_scales - 1):
            f_hat.add_(self.scale_contribution(codes[scale], scale))
            pieces.append(self.teacher_input_for_scale(f_hat, scale + 1))
        return torch.cat(pieces, dim=1)
