"""An LPIPS-style perceptual distance (Zhang et al. 2018) over VGG16 features, as VQGAN uses for
its perceptual loss, built from weight files the user gives: nothing is ever downloaded.

The VGG16 convolution stack is rebuilt here with torchvision's module indices (``features.0`` to
``features.29``), so torchvision's published ``vgg16-397923af.pth`` loads strictly into it
(its ``classifier.*`` keys are ignored). The optional LPIPS file is the ``vgg.pth`` of the
``lpips`` package (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``).

    d(x, y) = sum over taps l of  mean over (h, w) of  sum_c w_lc (x^_lc - y^_lc)^2

with x^_l the channel-unit-normalised features at tap l (relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3) of the rescaled image, and w_l the learned LPIPS weights; without an LPIPS file the
weighted channel sum becomes a plain channel mean (see :class:`PerceptualLoss`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mvar_dist.state_files import check_state_dict_matches, load_state_dict_file

# channels per VGG16 conv layer, "M" = 2x2 max-pool; the index of each module in the resulting
# nn.Sequential is torchvision's index, hence its state-dict key
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
# indices of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: maps [-1, 1] images to the ImageNet normalisation VGG was trained with
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # as LPIPS's normalize_tensor
MIN_SIZE = 16  # four max-pools before relu5_3: smaller images leave it no pixel


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (its last max-pool, index 30, has no
    weights and no tap after it, so it is left out): conv3x3 (padding 1) + ReLU, 2x2 max-pools."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=1), nn.ReLU()]
            in_channels = int(entry)
    return nn.Sequential(*layers)


def lpips_key(tap: int) -> str:
    """The key of tap ``tap``'s 1x1 linear weights in the LPIPS ``vgg.pth`` file."""
    return f"lin{tap}.model.1.weight"


def _load_checked(
    path: str | Path, expected: dict[str, torch.Tensor], what: str, target: str, ignore_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Read ``path`` and check its keys and shapes against ``expected`` (errors name the file
    and the first missing or unexpected key); keys starting with ``ignore_prefix`` are dropped first."""
    given = load_state_dict_file(path, what=what)
    if ignore_prefix:
        given = {k: v for k, v in given.items() if not k.startswith(ignore_prefix)}
    check_state_dict_matches(expected, given, source=f"{what} {path}", target=target)
    return given


def normalize_channels(features: torch.Tensor) -> torch.Tensor:
    """Unit-normalise each pixel's feature vector over channels, as LPIPS does: the distance
    then compares feature directions, not activation magnitudes, which differ per layer."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class PerceptualLoss(nn.Module):
    """Per-sample LPIPS-style distance between two batches of images in [-1, 1].

    ``vgg_weights``: torchvision's VGG16 state dict (``vgg16-397923af.pth``, or a
    ``.safetensors`` with the same keys). ``lpips_weights``: the LPIPS "vgg" linear layers
    (``vgg.pth``). With ``lpips_weights=None`` every channel gets the weight 1 / C, a plain
    channel mean: the un-learned variant. It is not LPIPS (whose weights were fitted to human
    judgements, and whose own un-learned mode sums over channels instead), so its values are
    not comparable to published LPIPS figures; use it only as a loss.

    The module is frozen: parameters never require grad and it stays in eval mode even when
    ``train()`` is called on a parent, so it is never trained. Gradients flow to the inputs.
    Files are read with ``weights_only`` loading (:func:`mvar_dist.state_files.load_state_dict_file`),
    so a weight file cannot run code.
    """

    def __init__(self, vgg_weights: str | Path, lpips_weights: str | Path | None = None) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        # one (1, C, 1, 1) weight per tap, in the LPIPS file's layout
        self.lin = nn.ParameterList(nn.Parameter(torch.full((1, c, 1, 1), 1.0 / c)) for c in TAP_CHANNELS)
        self.learned = lpips_weights is not None
        self._load_vgg(vgg_weights)
        if lpips_weights is not None:
            self._load_lpips(lpips_weights)
        self.requires_grad_(False)
        super().train(False)

    def _load_vgg(self, path: str | Path) -> None:
        expected = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        given = _load_checked(
            path, expected, what="VGG16 weights", target="torchvision's vgg16 (vgg16-397923af.pth) features.0-28",
            ignore_prefix="classifier.",
        )
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in given.items()}, strict=True)

    def _load_lpips(self, path: str | Path) -> None:
        expected = {lpips_key(i): weight for i, weight in enumerate(self.lin)}
        given = _load_checked(path, expected, what="LPIPS weights", target="the lpips package's vgg.pth (lin0-lin4)")
        with torch.no_grad():
            for i, weight in enumerate(self.lin):
                weight.copy_(given[lpips_key(i)])

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Ignored: the module always stays in eval mode (it is a fixed measuring instrument)."""
        return super().train(False)

    def tap_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped ReLU outputs of the rescaled ``images`` (B, 3, H, W) in [-1, 1]."""
        h = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in TAPS:
                taps.append(h)
        return taps

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) distances between ``recon`` and ``target`` (both (B, 3, H, W), values in [-1, 1],
        H and W >= 16); 0 for identical images, symmetric in its arguments."""
        if recon.shape != target.shape:
            raise ValueError(f"PerceptualLoss: recon has shape {tuple(recon.shape)}, target {tuple(target.shape)}")
        if recon.dim() != 4 or recon.shape[1] != 3:
            raise ValueError(f"PerceptualLoss: expected RGB images (B, 3, H, W), got shape {tuple(recon.shape)}")
        if min(recon.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"PerceptualLoss: images of {tuple(recon.shape[-2:])} px are smaller than {MIN_SIZE} px")
        batch = recon.shape[0]
        # one VGG pass over both batches: half the kernel launches of two passes
        taps = self.tap_features(torch.cat([recon, target]))
        distance = recon.new_zeros(batch)
        for features, weight in zip(taps, self.lin, strict=True):
            a, b = normalize_channels(features).split(batch)
            # sum_c w_c d_c as a 1x1 convolution with one output channel, as LPIPS's lin layer
            weighted = (a - b).square().mul(weight).sum(dim=1)
            distance = distance + weighted.mean(dim=(1, 2))
        return distance
