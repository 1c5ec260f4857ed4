"""VAR's multi-scale VQVAE tokenizer (the released checkpoint ``vae_ch160v4096z32.pth``):
a conv encoder to a P x P latent grid (P = patch_nums[-1]), the residual quantiser, and the
decoder. See docs/semantics.md, section 2.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mvar_dist.scales import DEFAULT_PATCH_NUMS
from mvar_dist.state_files import check_state_dict_matches, load_state_dict_file
from mvar_dist.tokenizer.base import ResidualTokenizer
from mvar_dist.tokenizer.nets import Decoder, Encoder
from mvar_dist.tokenizer.quantizer import MultiScaleQuantizer, SharedPhis, TrainingQuantization
from mvar_dist.tokenizer.saving import read_saved_config, save_with_config

logger = logging.getLogger(__name__)

# usage statistics of the released training run; they play no part in tokenizing
IGNORED_CHECKPOINT_KEYS = ("quantize.ema_vocab_hit_SV",)


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


class MultiScaleVQVAE(ResidualTokenizer):
    """The frozen VAR tokenizer: images <-> multi-scale codes, and the transformer's teacher input.

    Parameters carry the released names and shapes; a freshly built model has PyTorch's default
    initialisation (codebook N(0, 1)), as the published constructor.
    """

    IDENTITY_CLASS = "mvar_dist.tokenizer.MultiScaleVQVAE"
    CONFIG_METADATA_KEY = "vqvae_config"

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
        nets = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels)
        # registration order = the released state-dict order
        self.encoder = Encoder(**nets)
        self.decoder = Decoder(**nets)
        phis = SharedPhis(cfg.z_channels, cfg.share_quant_resi, cfg.quant_resi, len(cfg.patch_nums))
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums, phis)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)
        # 16 * patch_nums[-1] for the released 5-level network
        self._set_geometry(cfg.downsample_factor * cfg.patch_nums[-1])
        # a tokenizer, frozen like the published test_mode
        self.requires_grad_(False)
        self.eval()

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(img))

    def forward(self, img: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, TrainingQuantization]:
        """Training: images (B, 3, H, W) in [-1, 1] -> (reconstruction, not clamped, and the
        quantisation: VQ loss, codes, residual targets). Call ``requires_grad_(True).train()``
        first: a tokenizer is built frozen, as it is used everywhere else."""
        quantized = self.quantize.quantize_for_training(self.encode_latent(img), beta)
        return self.decode_latent(quantized.f_hat), quantized

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat))

    def config_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}

    def image_shape_hint(self) -> str:
        return (f"{self.config.downsample_factor} x patch_nums[-1]={self.patch_nums[-1]}; "
                "resize/crop before tokenizing")

    def save(self, path: str | Path) -> Path:
        """Weights and architecture as one .safetensors file (atomically)."""
        return save_with_config(self, path, self.CONFIG_METADATA_KEY, self.config_dict())

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **config: Any
    ) -> "MultiScaleVQVAE":
        """Build the tokenizer with ``config`` (default: the released one, or the architecture a
        file written by :meth:`save` records) and load a .pth or .safetensors state dict into it,
        strictly."""
        path = Path(path)
        saved = read_saved_config(path, cls.CONFIG_METADATA_KEY)
        if saved is not None:
            differing = sorted(k for k, v in config.items() if k in saved and list_or(v) != saved[k])
            if differing:
                raise ValueError(f"{path} holds a tokenizer whose {', '.join(differing)} differ from the requested ones")
            config = {**saved, **config}
        state_dict = load_state_dict_file(path, map_location, what="tokenizer checkpoint")
        with torch.device("meta"):  # skip initialising 109M parameters that are overwritten next
            model = cls(**config)
        given = {k: v for k, v in state_dict.items() if k not in IGNORED_CHECKPOINT_KEYS}
        check_state_dict_matches(
            model.state_dict(), given, str(path), f"the tokenizer {model.config}",
            "Check vocab_size / z_channels / ch / share_quant_resi against the checkpoint.",
        )
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        logger.info("loaded tokenizer %s", path)
        return model


def list_or(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
