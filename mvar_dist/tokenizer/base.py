"""What every tokenizer offers the rest of the system (the :class:`Tokenizer` protocol), and
:class:`ResidualTokenizer`, the part both of ours share: VAR's residual quantiser between an
encoder to a latent grid and a decoder back to pixels.

Everything here runs in float32, whatever autocast says: the codes are an argmin that must
match the released implementation exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from mvar_dist.scales import ScaleLayout
from mvar_dist.tokenizer.quantizer import MultiScaleQuantizer

Codes = Sequence[torch.Tensor] | torch.Tensor


@runtime_checkable
class Tokenizer(Protocol):
    """Images <-> multi-scale codes, and the transformer's teacher input.

    Used by the data pipeline (``img_to_codes``, ``identity``), the trainer
    (``codes_to_teacher_input``) and the sampler (``scale_contribution``,
    ``teacher_input_for_scale``, ``f_hat_to_img``). Load one with
    :func:`mvar_dist.tokenizer.load_tokenizer`.
    """

    layout: ScaleLayout
    vocab_size: int
    z_channels: int
    patch_nums: tuple[int, ...]
    image_size: int

    def img_to_codes(self, img: torch.Tensor) -> list[torch.Tensor]: ...
    def codes_to_teacher_input(self, codes: Codes) -> torch.Tensor: ...
    def codes_to_img(self, codes: Codes) -> torch.Tensor: ...
    def scale_contribution(self, codes_s: torch.Tensor, scale: int) -> torch.Tensor: ...
    def teacher_input_for_scale(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor: ...
    def f_hat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor: ...
    def identity(self) -> dict[str, Any]: ...
    def save(self, path: str | Path) -> Path: ...


def float32_region(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def check_codes(codes: Codes, layout: ScaleLayout, vocab_size: int) -> list[torch.Tensor]:
    """Validate codes given per scale or flat (B, L); returns one long tensor per scale."""
    if isinstance(codes, torch.Tensor):
        if codes.dim() != 2:
            raise ValueError(
                f"flat codes must have shape (B, {layout.num_tokens}), got {tuple(codes.shape)}"
            )
        codes = layout.split(codes, dim=1)
    codes = list(codes)
    if len(codes) != layout.num_scales:
        raise ValueError(
            f"expected codes for {layout.num_scales} scales (patch_nums={layout.patch_nums}), "
            f"got {len(codes)}"
        )
    batch = codes[0].shape[0] if codes[0].dim() == 2 else "B"
    for scale, codes_s in enumerate(codes):
        length = layout.scale_len(scale)
        if tuple(codes_s.shape) != (batch, length):
            raise ValueError(
                f"codes of scale {scale} must have shape ({batch}, {length}), got {tuple(codes_s.shape)}"
            )
        if codes_s.is_floating_point() or codes_s.is_complex() or codes_s.dtype == torch.bool:
            raise ValueError(
                f"codes must be integer tensors, scale {scale} has dtype {codes_s.dtype}"
            )
    if codes[0].numel():
        # one host sync for all scales: this runs every training step
        extremes = torch.stack([torch.stack(torch.aminmax(c.long())) for c in codes])
        low, high = torch.stack((extremes[:, 0].min(), extremes[:, 1].max())).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"codes must lie in [0, {vocab_size}), got values in [{low}, {high}]"
            )
    return [c.long() for c in codes]


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors, keys in sorted order: for each key, the UTF-8 header
    ``"{key}\\t{dtype}\\t{shape}\\n"`` (e.g. ``quant_conv.bias\\ttorch.float32\\t[32]``),
    then the tensor's C-contiguous bytes, little-endian."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\t{tensor.dtype}\t{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ResidualTokenizer(nn.Module):
    """VAR's residual quantiser between ``encode_latent`` (images -> (B, Cv, P, P)) and
    ``decode_latent`` (f_hat -> images), which subclasses provide.

    ``IDENTITY_CLASS`` is the class name recorded in shard manifests and exports: it stays fixed
    when the Python class moves, so that data written by earlier versions keeps matching.
    """

    IDENTITY_CLASS = ""
    CONFIG_METADATA_KEY = ""  # where save() records the architecture in a .safetensors file
    channels = 3
    quantize: MultiScaleQuantizer

    def _set_geometry(self, image_size: int) -> None:
        """Called by a subclass once it has registered ``self.quantize`` (subclasses register
        their modules themselves: the order is the released state-dict order)."""
        self.layout = self.quantize.layout
        self.patch_nums = self.layout.patch_nums
        self.vocab_size = self.quantize.embedding.num_embeddings
        self.z_channels = self.quantize.embedding.embedding_dim
        self.image_size = image_size

    # ---- what a subclass provides ----

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The architecture, as JSON-friendly values (recorded in the identity)."""
        raise NotImplementedError

    def image_shape_hint(self) -> str:
        return f"resize/crop to {self.image_size} px before tokenizing"

    # ---- building blocks shared with the sampler and the data pipeline ----

    def scale_contribution(self, codes_s: torch.Tensor, scale: int) -> torch.Tensor:
        """Scale ``scale``'s codes (B, pn*pn) -> its (B, Cv, P, P) addend to f_hat."""
        with float32_region(codes_s.device):
            return self.quantize.scale_contribution(codes_s, scale)

    def teacher_input_for_scale(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """f_hat (B, Cv, P, P) -> the transformer input of scale ``scale``, (B, pn*pn, Cv)."""
        return self.quantize.teacher_input_for_scale(f_hat.float(), scale)

    def f_hat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cv, P, P) -> image (B, 3, H, W) clamped to [-1, 1]."""
        with float32_region(f_hat.device):
            return self.decode_latent(f_hat.float()).clamp(-1, 1)

    # ---- whole-image conversions ----

    @torch.no_grad()
    def img_to_codes(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1], H = W = image_size -> one (B, pn*pn) LongTensor per scale."""
        self._check_image(img)
        with float32_region(img.device):
            return self.quantize.quantize(self.encode_latent(img.float()))

    @torch.no_grad()
    def codes_to_teacher_input(self, codes: Codes) -> torch.Tensor:
        """Codes (list per scale, or flat (B, L)) -> teacher-forcing input (B, L-1, Cv), float32."""
        codes = check_codes(codes, self.layout, self.vocab_size)
        with float32_region(codes[0].device):
            return self.quantize.teacher_input(codes)

    @torch.no_grad()
    def codes_to_img(self, codes: Codes) -> torch.Tensor:
        """Codes (list per scale, or flat (B, L)) -> images (B, 3, H, W) in [-1, 1]."""
        codes = check_codes(codes, self.layout, self.vocab_size)
        with float32_region(codes[0].device):
            return self.f_hat_to_img(self.quantize.f_hat_from_codes(codes))

    def _check_image(self, img: torch.Tensor) -> None:
        size, channels = self.image_size, self.channels
        if img.dim() != 4 or img.shape[1] != channels or img.shape[2] != size or img.shape[3] != size:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {channels}, {size}, {size}), got "
                f"{tuple(img.shape)}; {self.image_shape_hint()}"
            )
        if not img.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects float images in [-1, 1], got dtype {img.dtype}")

    # ---- identity ----

    def identity(self) -> dict[str, Any]:
        """What a shard manifest records about the tokenizer that produced its codes."""
        return {
            "class": self.IDENTITY_CLASS,
            "config": self.config_dict(),
            "weights_sha256": state_dict_sha256(self.state_dict()),
        }
