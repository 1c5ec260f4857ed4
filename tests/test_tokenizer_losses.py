"""Tokenizer-training losses: the formulas on hand-made tensors, VQGAN's adaptive weight against
its definition, the PatchGAN discriminator's shapes and initialisation, and the perceptual
distance on fake weight files (random tensors with the published keys; nothing is downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mvar_dist.tokenizer_training.discriminator import PatchDiscriminator, min_input_size
from mvar_dist.tokenizer_training.losses import adaptive_weight, gan_factor, hinge_d_loss, hinge_g_loss, reconstruction_loss
from mvar_dist.tokenizer_training.perceptual import PerceptualLoss, normalize_channels

# torchvision's vgg16 conv layers: features index -> (out, in) channels, written out by hand so
# that the test checks our layout against the published one, not against itself
VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


# ---------------------------------------------------------------- scalar losses


def test_reconstruction_loss_weights_each_term():
    recon = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    target = torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    # differences 1, -2, 0, 2: mean |d| = 5/4, mean d^2 = 9/4
    assert reconstruction_loss(recon, target, l1=1.0, l2=0.0).item() == pytest.approx(1.25)
    assert reconstruction_loss(recon, target, l1=0.0, l2=1.0).item() == pytest.approx(2.25)
    assert reconstruction_loss(recon, target, l1=2.0, l2=0.5).item() == pytest.approx(2 * 1.25 + 0.5 * 2.25)
    assert reconstruction_loss(recon, target, l1=0.0, l2=0.0).item() == 0.0


def test_reconstruction_loss_refuses_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(3, 2), 1.0, 0.0)
    with pytest.raises(ValueError, match="l1=-1"):
        reconstruction_loss(torch.zeros(2), torch.zeros(2), -1.0, 0.0)


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # confident and right on every patch: no discriminator loss
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0)).item() == 0.0


def test_gan_factor_switches_on_at_the_start_step():
    assert [gan_factor(step, 3) for step in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert gan_factor(0, 0) == 1.0


# ---------------------------------------------------------------- adaptive weight


def tiny_decoder_losses(g_scale: float = 1.0):
    """A linear "decoder" hidden -> W -> output, with an L1 nll and a linear "discriminator" v."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, generator=gen)
    last = nn.Parameter(torch.randn(3, 4, generator=gen))
    target = torch.randn(5, 3, generator=gen)
    v = torch.randn(3, generator=gen) * g_scale
    out = hidden @ last.T
    nll = (out - target).abs().mean()
    g_loss = hinge_g_loss(out @ v)
    return hidden, last, target, v, out, nll, g_loss


def test_adaptive_weight_matches_its_formula_on_a_linear_decoder():
    hidden, last, target, v, out, nll, g_loss = tiny_decoder_losses()
    # by hand: d nll / d out = sign(out - target) / (5 * 3); d g / d out = -v / 5 per row
    grad_nll = (torch.sign(out - target) / 15).T @ hidden
    grad_g = -torch.outer(v, hidden.mean(dim=0))
    assert torch.allclose(grad_nll, torch.autograd.grad(nll, last, retain_graph=True)[0], atol=1e-6)
    assert torch.allclose(grad_g, torch.autograd.grad(g_loss, last, retain_graph=True)[0], atol=1e-6)
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)

    weight = adaptive_weight(nll, g_loss, last)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad and weight.dim() == 0
    assert last.grad is None  # autograd.grad, not backward: no .grad written
    (nll + weight * g_loss).backward()  # the graph was retained for the caller's backward
    assert last.grad is not None


def test_adaptive_weight_is_clamped_and_checks_its_inputs():
    *_, last, _target, _v, _out, nll, g_loss = tiny_decoder_losses(g_scale=1e-9)
    # a vanishing adversarial gradient leaves ||grad nll|| / 1e-4, which a large nll pushes over the cap
    assert adaptive_weight(100 * nll, g_loss, last).item() == 1e4
    assert adaptive_weight(nll, g_loss, last, max_weight=5.0).item() == 5.0
    with pytest.raises(ValueError, match="g_loss does not depend"):
        adaptive_weight(nll, (torch.ones(3, requires_grad=True) * 2).sum(), last)
    with pytest.raises(ValueError, match="nll_loss does not require grad"):
        adaptive_weight(nll.detach(), g_loss, last)


# ---------------------------------------------------------------- discriminator


def test_discriminator_layers_and_widths():
    disc = PatchDiscriminator(in_channels=3, channels=64, num_layers=5)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2), (512, 512, 2), (512, 512, 1), (512, 1, 1),
    ]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.bias is not None for c in convs] == [True] + [False] * 5 + [True]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 5
    leaky = [m for m in disc.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 6 and all(m.negative_slope == 0.2 for m in leaky)


@pytest.mark.parametrize("size, num_layers, channels, logits", [
    (256, 3, 64, 30), (16, 2, 16, 2), (16, 1, 16, 6), (24, 3, 8, 1),
])
def test_discriminator_output_shapes(size, num_layers, channels, logits):
    disc = PatchDiscriminator(channels=channels, num_layers=num_layers)
    with torch.no_grad():
        out = disc(torch.rand(2 if size < 256 else 1, 3, size, size) * 2 - 1)
    assert out.shape == (2 if size < 256 else 1, 1, logits, logits)


def test_discriminator_refuses_images_too_small_for_its_depth():
    assert min_input_size(3) == 24 and min_input_size(2) == 12
    with pytest.raises(ValueError, match="too small for num_layers=3"):
        PatchDiscriminator(channels=8)(torch.zeros(1, 3, 16, 16))


def test_discriminator_init_statistics():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([n.weight for n in norms]).detach()
    assert scales.mean().item() == pytest.approx(1.0, abs=3e-3) and scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.count_nonzero(n.bias) == 0 for n in norms)


# ---------------------------------------------------------------- perceptual distance


def fake_vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out_c, in_c) in VGG16_CONVS.items():
        # He-scaled so that activations stay O(1) through the 13 layers
        state[f"features.{index}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=gen) * math.sqrt(2 / (9 * in_c))
        state[f"features.{index}.bias"] = torch.randn(out_c, generator=gen) * 0.01
    # the classifier is ignored; its real shapes (4096 x 25088, ...) would only cost disk here
    state["classifier.0.weight"] = torch.zeros(4, 8)
    state["classifier.6.bias"] = torch.zeros(4)
    return state


def fake_lpips_state(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(LPIPS_CHANNELS)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("perceptual")
    torch.save(fake_vgg_state(), folder / "vgg16-397923af.pth")
    torch.save(fake_lpips_state(), folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


@pytest.fixture(scope="module", params=["learned", "channel-mean"])
def perceptual(request, weight_files) -> PerceptualLoss:
    vgg, lpips = weight_files
    return PerceptualLoss(vgg, lpips if request.param == "learned" else None)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1


def test_published_vgg_keys_load_strictly(weight_files):
    vgg, lpips = weight_files
    loss = PerceptualLoss(vgg, lpips)
    features = {k.removeprefix("features."): v for k, v in fake_vgg_state().items() if k.startswith("features.")}
    loaded = loss.features.state_dict()
    assert list(loaded) == list(features)
    assert all(torch.equal(loaded[k], v) for k, v in features.items())
    assert all(torch.equal(w, fake_lpips_state()[f"lin{i}.model.1.weight"]) for i, w in enumerate(loss.lin))


def test_lpips_weights_also_load_from_safetensors(tmp_path, weight_files):
    from safetensors.torch import save_file

    save_file(fake_lpips_state(), str(tmp_path / "vgg.safetensors"))
    loss = PerceptualLoss(weight_files[0], tmp_path / "vgg.safetensors")
    assert torch.equal(loss.lin[4], fake_lpips_state()["lin4.model.1.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("features.28.bias"), "missing key.*'features.28.bias'"),
    (lambda s: s.update({"features.30.weight": torch.zeros(1)}), "unexpected key.*'features.30.weight'"),
    (lambda s: s.update({"features.0.weight": torch.zeros(64, 1, 3, 3)}), "shape mismatch.*'features.0.weight'"),
])
def test_a_wrong_vgg_file_is_named_with_its_first_bad_key(tmp_path, weight_files, change, message):
    state = fake_vgg_state()
    change(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message) as error:
        PerceptualLoss(tmp_path / "bad.pth")
    assert str(tmp_path / "bad.pth") in str(error.value)


def test_a_wrong_lpips_file_or_a_missing_file_is_named(tmp_path, weight_files):
    vgg, lpips = weight_files
    # the VGG file given as the LPIPS file: the error names the file and a missing lin key
    with pytest.raises(ValueError, match="LPIPS weights .*vgg16-397923af.pth.*missing key.*'lin0.model.1.weight'"):
        PerceptualLoss(vgg, vgg)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        PerceptualLoss(tmp_path / "nowhere.pth")


def test_a_file_with_code_is_refused(tmp_path):
    torch.save({"features.0.weight": Path("x")}, tmp_path / "pickled.pth")  # not a plain tensor state dict
    with pytest.raises(ValueError, match="pickled.pth"):
        PerceptualLoss(tmp_path / "pickled.pth")


def test_distance_is_zero_for_identical_images_positive_otherwise_and_symmetric(perceptual, images):
    x, y = images
    with torch.no_grad():
        same, forward, backward = perceptual(x, x), perceptual(x, y), perceptual(y, x)
    assert same.shape == (2,) and torch.count_nonzero(same) == 0
    assert bool((forward > 0).all())
    assert torch.allclose(forward, backward, rtol=1e-5, atol=1e-7)
    assert bool((perceptual(x, x * 0.9 + y * 0.1) < forward).all())  # closer images, smaller distance


def test_distance_follows_the_lpips_formula(weight_files, images):
    vgg, lpips = weight_files
    x, y = images
    for loss, weights in ((PerceptualLoss(vgg, lpips), fake_lpips_state()), (PerceptualLoss(vgg), None)):
        with torch.no_grad():
            expected = torch.zeros(2)
            for i, (fx, fy) in enumerate(zip(loss.tap_features(x), loss.tap_features(y), strict=True)):
                squared = (normalize_channels(fx) - normalize_channels(fy)) ** 2
                if weights is None:
                    per_pixel = squared.mean(dim=1)
                else:
                    per_pixel = nn.functional.conv2d(squared, weights[f"lin{i}.model.1.weight"])[:, 0]
                expected += per_pixel.mean(dim=(1, 2))
            assert torch.allclose(loss(x, y), expected, rtol=1e-4)


def test_gradients_reach_the_input_but_never_the_weights(perceptual, images):
    x, y = images
    recon = x.clone().requires_grad_(True)
    perceptual(recon, y).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())


def test_the_module_stays_frozen_in_eval_mode(perceptual):
    parent = nn.Sequential(nn.Linear(2, 2), perceptual)
    parent.train()
    assert parent[0].training and not perceptual.training
    assert not any(p.requires_grad for p in perceptual.parameters())


def test_perceptual_refuses_mismatched_or_tiny_images(perceptual):
    with pytest.raises(ValueError, match="shape"):
        perceptual(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="smaller than 16"):
        perceptual(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
