"""A tiny multi-scale residual tokenizer for the CPU quickstart: no encoder, no decoder.

The latent of an image is its grid of pixel patches (space-to-depth: a P x P grid of
channels*patch*patch vectors), quantised coarse to fine with VAR's residual algorithm
(docs/semantics.md, section 2) with phi = identity and one shared codebook fitted by k-means.
It is a :class:`~mvar_dist.tokenizer.base.ResidualTokenizer` like the VQVAE, so the data
pipeline, the trainer and the sampler use it unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mvar_dist.scales import ScaleLayout
from mvar_dist.state_files import load_state_dict_file
from mvar_dist.tokenizer.base import ResidualTokenizer
from mvar_dist.tokenizer.quantizer import IdentityPhi, MultiScaleQuantizer
from mvar_dist.tokenizer.saving import read_saved_config, save_with_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartTokenizerConfig:
    """Image geometry and codebook of the quickstart tokenizer.

    Defaults: 16x16 images cut into an 8x8 grid of 2x2 pixel patches, 7 scales (155 tokens),
    256 codes of 3*2*2 = 12 values. Grey images are kept as 3 identical channels so that every
    stage downstream sees the (B, 3, H, W) images in [-1, 1] of the ImageNet path.
    """

    image_size: int = 16
    patch_size: int = 2
    channels: int = 3
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    vocab_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        for name in ("image_size", "patch_size", "channels", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QuickstartTokenizerConfig: {name} must be >= 1, got {getattr(self, name)}")
        ScaleLayout(self.patch_nums)  # validates patch_nums
        if self.image_size != self.patch_size * self.patch_nums[-1]:
            raise ValueError(
                f"QuickstartTokenizerConfig: image_size ({self.image_size}) must equal patch_size "
                f"({self.patch_size}) x patch_nums[-1] ({self.patch_nums[-1]}) = "
                f"{self.patch_size * self.patch_nums[-1]}"
            )

    @property
    def z_channels(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuickstartTokenizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuickstartTokenizerConfig: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


class PatchResidualTokenizer(ResidualTokenizer):
    """Images <-> multi-scale codes over pixel patches; fitted with :meth:`fit`, not trained."""

    IDENTITY_CLASS = "mvar_dist.patch_tokenizer.PatchResidualTokenizer"
    CONFIG_METADATA_KEY = "patch_tokenizer_config"

    def __init__(self, config: QuickstartTokenizerConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or QuickstartTokenizerConfig()
        if overrides:
            config = QuickstartTokenizerConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.channels = config.channels
        # VAR's quantiser (same residual loop, lookup, bicubic/area resampling) with phi removed
        self.quantize = MultiScaleQuantizer(config.vocab_size, config.z_channels, config.patch_nums, IdentityPhi())
        self._set_geometry(config.image_size)
        self.requires_grad_(False)
        self.eval()

    # ---- pixels <-> patch latents ----

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, z_channels, P, P): every patch's pixels as one vector."""
        return F.pixel_unshuffle(img.float(), self.config.patch_size)

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(f_hat, self.config.patch_size)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def image_shape_hint(self) -> str:
        return f"resize to image_size={self.image_size} first"

    # ---- fitting ----

    @torch.no_grad()
    def fit(
        self, images: torch.Tensor, lloyd_steps: int = 15, seed: int = 0, max_vectors: int = 65536, batch_size: int = 512
    ) -> list[float]:
        """Fit the shared codebook to ``images`` (N, 3, H, W) in [-1, 1]; deterministic for a seed.

        A first codebook is drawn from the patch vectors of the images at every scale; the
        images are tokenized with it once, and the vectors each scale had to match (its
        area-downsampled residual) are pooled and clustered by ``lloyd_steps`` steps of k-means
        (on a seeded random ``max_vectors`` of them, which keeps fitting to seconds on a CPU).
        The targets are not re-collected with the new codebook: alternating that way does not
        descend and was measured to degrade reconstructions. Returns the mean squared distance
        of the pooled targets to their nearest entry before every step (non-increasing).
        """
        self._check_image(images)
        if images.shape[0] < self.vocab_size:
            raise ValueError(f"fit needs at least vocab_size={self.vocab_size} images, got {images.shape[0]}")
        if lloyd_steps < 1:
            raise ValueError(f"lloyd_steps must be >= 1, got {lloyd_steps}")
        generator = torch.Generator().manual_seed(seed)  # CPU draws: the same codebook on any device
        latents = self.encode_latent(images.to(self.quantize.embedding.weight.device))
        downsampled = torch.cat([self._scale_view(latents, s) for s in range(self.layout.num_scales)])
        start = torch.randperm(downsampled.shape[0], generator=generator)[: self.vocab_size].to(downsampled.device)
        self.quantize.embedding.weight.copy_(downsampled[start])
        targets = self._residual_targets(latents, batch_size)
        if targets.shape[0] > max_vectors:
            targets = targets[torch.randperm(targets.shape[0], generator=generator)[:max_vectors].to(targets.device)]
        errors = [self._lloyd_step(targets) for _ in range(lloyd_steps)]
        logger.info(
            "tokenizer fitted on %d images (k-means on %d vectors): k-means error %.5f -> %.5f, reconstruction MSE %.5f",
            images.shape[0], targets.shape[0], errors[0], errors[-1], self._reconstruction_mse(latents, batch_size),
        )
        return errors

    def _scale_view(self, latents: torch.Tensor, scale: int) -> torch.Tensor:
        """latents (N, Cv, P, P) area-downsampled to scale ``scale`` as (N * pn^2, Cv) vectors."""
        return self.quantize.teacher_input_for_scale(latents, scale).reshape(-1, self.z_channels)

    def _residual_targets(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The vectors every scale quantises: downsample(f) - downsample(f_hat before the scale).

        Area downsampling is linear, so this equals the residual loop's downsampled residual, and
        downsample(f_hat before scale s) is exactly the teacher input of scale s.
        """
        pieces = []
        for chunk in latents.split(batch_size):
            codes = self.quantize.quantize(chunk)
            teacher = self.quantize.teacher_input(codes)
            before = torch.cat([teacher.new_zeros(chunk.shape[0], 1, self.z_channels), teacher], dim=1)
            whole = torch.cat([self.quantize.teacher_input_for_scale(chunk, s) for s in range(self.layout.num_scales)], dim=1)
            pieces.append((whole - before).reshape(-1, self.z_channels))
        return torch.cat(pieces)

    def _lloyd_step(self, vectors: torch.Tensor) -> float:
        """One k-means step; returns the mean squared distance to the nearest entry before it."""
        codebook = self.quantize.embedding.weight
        # the quantiser's own nearest-code rule, on (1, Cv, n, 1) "images" of vectors; chunked
        # so the distance matrix stays small
        assignment = torch.cat([
            self.quantize.nearest_codes(chunk.T[None, :, :, None]).view(-1) for chunk in vectors.split(32768)
        ])
        distances = (vectors - codebook[assignment]).square().sum(dim=1)
        counts = torch.bincount(assignment, minlength=self.vocab_size)
        sums = codebook.new_zeros(codebook.shape).index_add_(0, assignment, vectors)
        used = counts > 0
        codebook[used] = sums[used] / counts[used, None].to(sums.dtype)
        empty = (~used).nonzero().view(-1)
        if empty.numel():
            # an unused entry moves onto one of the worst-served vectors, chosen without randomness
            codebook[empty] = vectors[distances.topk(empty.numel()).indices]
        return float(distances.mean())

    def _reconstruction_mse(self, latents: torch.Tensor, batch_size: int) -> float:
        total = 0.0
        for chunk in latents.split(batch_size):
            f_hat = self.quantize.f_hat_from_codes(self.quantize.quantize(chunk))
            total += float((f_hat - chunk).square().sum())
        return total / latents.numel()

    # ---- saving and loading ----

    def save(self, path: str | Path) -> Path:
        """Write the codebook and config as one .safetensors file (atomically)."""
        return save_with_config(self, path, self.CONFIG_METADATA_KEY, self.config.to_dict())

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", **config: Any) -> "PatchResidualTokenizer":
        """Load a file written by :meth:`save`; ``config`` fields, if given, must match the saved ones."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quickstart tokenizer {path} does not exist (write it with PatchResidualTokenizer.save)")
        recorded = read_saved_config(path, cls.CONFIG_METADATA_KEY)
        if recorded is None:
            raise ValueError(f"{path} has no {cls.CONFIG_METADATA_KEY!r} metadata: it was not written by PatchResidualTokenizer.save")
        saved = QuickstartTokenizerConfig.from_dict(recorded)
        wanted = QuickstartTokenizerConfig.from_dict({**saved.to_dict(), **config})
        if wanted != saved:
            raise ValueError(f"{path} holds a tokenizer with config {saved}, which differs from the requested {config}")
        model = cls(saved)
        model.load_state_dict(load_state_dict_file(path, map_location, what="quickstart tokenizer"), strict=True)
        logger.info("loaded quickstart tokenizer %s (weights_sha256 %s)", path, model.identity()["weights_sha256"][:12])
        return model.to(map_location)


def fit_tokenizer(images: torch.Tensor, config: QuickstartTokenizerConfig | None = None, seed: int = 0, **fit_options: Any) -> PatchResidualTokenizer:
    """Build a tokenizer for ``config`` and fit its codebook to ``images`` (N, 3, H, W) in [-1, 1]."""
    tokenizer = PatchResidualTokenizer(config)
    tokenizer.fit(images, seed=seed, **fit_options)
    return tokenizer


__all__: Sequence[str] = ("QuickstartTokenizerConfig", "PatchResidualTokenizer", "fit_tokenizer")
