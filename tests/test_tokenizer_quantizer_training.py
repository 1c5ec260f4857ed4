"""The quantiser's training path (VAR's recipe): the codes of inference, the VQ loss terms, and
where gradients go through the straight-through estimator and where they must not."""

from __future__ import annotations

import torch

from mvar_dist.tokenizer import MultiScaleVQVAE
from mvar_dist.tokenizer.quantizer import IdentityPhi, MultiScaleQuantizer

TINY = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1,), num_res_blocks=1)


def _trainable() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(**TINY).requires_grad_(True).train()


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _grads(model: torch.nn.Module) -> dict[str, float]:
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in model.named_parameters()}


def test_training_codes_are_the_inference_codes():
    model = _trainable()
    _, quantized = model(_images())
    assert all(torch.equal(a, b) for a, b in zip(model.img_to_codes(_images()), quantized.codes))


def test_gradients_reach_encoder_decoder_codebook_and_phi():
    model = _trainable()
    recon, quantized = model(_images())
    ((recon - _images()).abs().mean() + quantized.vq_loss).backward()
    grads = _grads(model)
    for prefix in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.", "quantize.quant_resi."):
        assert any(v > 0 for n, v in grads.items() if n.startswith(prefix)), prefix


def test_reconstruction_reaches_the_encoder_straight_through_but_not_the_codebook():
    model = _trainable()
    recon, _ = model(_images())
    (recon - _images()).abs().mean().backward()
    grads = _grads(model)
    assert any(v > 0 for n, v in grads.items() if n.startswith("encoder."))  # straight through the quantiser
    assert grads["quantize.embedding.weight"] == 0.0  # the codes are a choice: no gradient through argmin
    assert all(v == 0.0 for n, v in grads.items() if n.startswith("quantize.quant_resi."))


def test_the_vq_loss_reaches_the_encoder_only_through_the_commitment_term():
    for beta, encoder_moves in ((0.0, False), (0.25, True)):
        model = _trainable()
        _, quantized = model(_images(), beta=beta)
        quantized.vq_loss.backward()
        grads = _grads(model)
        assert any(v > 0 for n, v in grads.items() if n.startswith("encoder.")) == encoder_moves
        assert grads["quantize.embedding.weight"] > 0  # the codebook term moves the codebook either way
        assert all(v == 0.0 for n, v in grads.items() if n.startswith("decoder."))


def test_commitment_loss_is_zero_when_the_latent_equals_its_quantisation():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(vocab_size=16, z_channels=4, patch_nums=(3,), phis=IdentityPhi())
    codes = torch.randint(0, 16, (2, 9))
    latent = quantizer.f_hat_from_codes([codes]).clone().requires_grad_(True)  # exactly codebook entries
    quantized = quantizer.quantize_for_training(latent, beta=0.25)
    assert torch.equal(quantized.codes[0], codes)
    assert quantized.vq_loss.item() == 0.0
    torch.testing.assert_close(quantized.f_hat, latent, rtol=0, atol=0)
    # and it is not zero once the latent moves off the codebook
    assert quantizer.quantize_for_training(latent + 0.1, beta=0.25).vq_loss.item() > 0
