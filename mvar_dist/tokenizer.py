"""VAR's multi-scale residual tokenizer (checkpoint ``vae_ch160v4096z32.pth``).

An image is encoded to a latent f of P x P vectors (P = patch_nums[-1]) and quantised coarse to
fine: scale s picks, for the area-downsampled residual, the nearest codebook entries; their
bicubic upsampling, passed through phi, is added to f_hat and subtracted from the residual.
See SEMANTICS.md section 2. Everything here runs in float32, whatever autocast says, because
the codes are an argmin that must match the released implementation exactly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mvar_dist.scales import DEFAULT_PATCH_NUMS, ScaleLayout, phi_index
from mvar_dist.tokenizer_nets import Decoder, Encoder

logger = logging.getLogger(__name__)

# usage statistics of the released training run; they play no part in tokenizing
IGNORED_CHECKPOINT_KEYS = ("quantize.ema_vocab_hit_SV",)

Codes = Sequence[torch.Tensor] | torch.Tensor


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture of the tokenizer; the defaults are the released ``vae_ch160v4096z32``."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    quant_resi: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        for name in ("vocab_size", "z_channels", "ch", "share_quant_resi", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult:
            raise ValueError("tokenizer config: ch_mult must name at least one level")
        if not 0 < self.quant_resi <= 1:
            raise ValueError(f"tokenizer config: quant_resi must be in (0, 1], got {self.quant_resi}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _float32_region(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


class Phi(nn.Conv2d):
    """phi(h) = (1 - mix) * h + mix * conv3x3(h), applied to every scale's contribution."""

    def __init__(self, channels: int, mix: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.mix = mix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.mix) + super().forward(h) * self.mix


class SharedPhis(nn.Module):
    """K phi convolutions shared by all scales; scale s uses ``phi_index(s, S, K)``.

    With the released K = 4 this is the published choice; for other K the published code spaces
    its ticks differently (1/(2K) margins), so only K = 4 reproduces a published model.
    """

    def __init__(self, channels: int, num_convs: int, mix: float, num_scales: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, mix) for _ in range(num_convs))
        self.num_scales = num_scales

    def forward(self, h: torch.Tensor, scale: int) -> torch.Tensor:
        return self.qresi_ls[phi_index(scale, self.num_scales, len(self.qresi_ls))](h)


def _drop_usage_statistics(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # load_state_dict hands hooks its own copy of the dict: the caller's stays untouched
    state_dict.pop(prefix + "ema_vocab_hit_SV", None)


class MultiScaleQuantizer(nn.Module):
    """The codebook, the phi convolutions and the coarse-to-fine residual loop."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.layout = ScaleLayout(config.patch_nums)
        # registration order = the released state-dict order
        self.quant_resi = SharedPhis(
            config.z_channels, config.share_quant_resi, config.quant_resi, self.layout.num_scales
        )
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
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


class MultiScaleVQVAE(nn.Module):
    """The frozen VAR tokenizer: images <-> multi-scale codes, and the transformer's teacher input.

    Parameters carry the released names and shapes; a freshly built model has PyTorch's default
    initialisation (codebook N(0, 1)), as the published constructor.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        share_quant_resi: int = 4,
        patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
        **architecture: Any,
    ) -> None:
        super().__init__()
        self.config = TokenizerConfig(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, share_quant_resi=share_quant_resi,
            patch_nums=tuple(patch_nums), **architecture,
        )
        cfg = self.config
        self.layout = ScaleLayout(cfg.patch_nums)
        self.vocab_size = cfg.vocab_size
        self.z_channels = cfg.z_channels
        self.patch_nums = cfg.patch_nums
        # 16 * patch_nums[-1] for the released 5-level network
        self.image_size = cfg.downsample_factor * cfg.patch_nums[-1]

        nets = dict(
            ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels
        )
        self.encoder = Encoder(**nets)
        self.decoder = Decoder(**nets)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)
        # a tokenizer, never trained here: frozen like the published test_mode
        self.requires_grad_(False)
        self.eval()

    # ---- building blocks shared with the sampler and the data pipeline ----

    def scale_contribution(self, codes_s: torch.Tensor, scale: int) -> torch.Tensor:
        """Scale ``scale``'s codes (B, pn*pn) -> its (B, Cv, P, P) addend to f_hat."""
        with _float32_region(codes_s.device):
            return self.quantize.scale_contribution(codes_s, scale)

    def teacher_input_for_scale(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """f_hat (B, Cv, P, P) -> the transformer input of scale ``scale``, (B, pn*pn, Cv)."""
        return self.quantize.teacher_input_for_scale(f_hat.float(), scale)

    def f_hat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cv, P, P) -> image (B, 3, H, W) clamped to [-1, 1]."""
        with _float32_region(f_hat.device):
            return self.decoder(self.post_quant_conv(f_hat.float())).clamp(-1, 1)

    # ---- whole-image conversions ----

    @torch.no_grad()
    def img_to_codes(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1], H = W = image_size -> one (B, pn*pn) LongTensor per scale."""
        self._check_image(img)
        with _float32_region(img.device):
            return self.quantize.quantize(self.quant_conv(self.encoder(img.float())))

    @torch.no_grad()
    def codes_to_teacher_input(self, codes: Codes) -> torch.Tensor:
        """Codes (list per scale, or flat (B, L)) -> teacher-forcing input (B, L-1, Cv), float32."""
        codes = self._check_codes(codes)
        with _float32_region(codes[0].device):
            return self.quantize.teacher_input(codes)

    @torch.no_grad()
    def codes_to_img(self, codes: Codes) -> torch.Tensor:
        """Codes (list per scale, or flat (B, L)) -> images (B, 3, H, W) in [-1, 1]."""
        codes = self._check_codes(codes)
        with _float32_region(codes[0].device):
            return self.f_hat_to_img(self.quantize.f_hat_from_codes(codes))

    # ---- input checks ----

    def _check_image(self, img: torch.Tensor) -> None:
        size = self.image_size
        if img.dim() != 4 or img.shape[1] != 3 or img.shape[2] != size or img.shape[3] != size:
            raise ValueError(
                f"img_to_codes expects images of shape (B, 3, {size}, {size}) ("
                f"{self.config.downsample_factor} x patch_nums[-1]={self.patch_nums[-1]}), got "
                f"{tuple(img.shape)}; resize/crop before tokenizing"
            )
        if not img.is_floating_point():
            raise ValueError(f"img_to_codes expects float images in [-1, 1], got dtype {img.dtype}")

    def _check_codes(self, codes: Codes) -> list[torch.Tensor]:
        return check_codes(codes, self.layout, self.vocab_size)

    # ---- identity and loading ----

    def identity(self) -> dict[str, Any]:
        """What a shard manifest records about the tokenizer that produced its codes."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": config,
            "weights_sha256": state_dict_sha256(self.state_dict()),
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **config: Any
    ) -> "MultiScaleVQVAE":
        """Build the tokenizer with ``config`` (default: the released one) and load a .pth or
        .safetensors state dict into it, strictly."""
        path = Path(path)
        state_dict = load_state_dict_file(path, map_location)
        with torch.device("meta"):  # skip initialising 109M parameters that are overwritten next
            model = cls(**config)
        check_state_dict_matches(model, state_dict, source=str(path))
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        logger.info("loaded tokenizer %s", path)
        return model


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


def load_state_dict_file(
    path: Path, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint {path} does not exist (download vae_ch160v4096z32.pth, see README)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    state_dict = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__}, expected a state dict (name -> tensor)"
        )
    return dict(state_dict)


def check_state_dict_matches(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise a ValueError naming the first missing key, unexpected key and mismatched shape."""
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in IGNORED_CHECKPOINT_KEYS}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and given[k].shape != expected[k].shape]
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
        config = getattr(model, "config", None)
        raise ValueError(
            f"{source} does not fit the tokenizer {config}: " + "; ".join(problems)
            + ". Check vocab_size / z_channels / ch / share_quant_resi against the checkpoint."
        )
