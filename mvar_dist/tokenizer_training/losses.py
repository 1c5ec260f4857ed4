"""The scalar losses of the VQGAN recipe for tokenizer training: pixel reconstruction, hinge
losses of the discriminator and the generator, VQGAN's adaptive weight of the adversarial term,
and the step at which that term starts.

All functions take and return tensors of the caller's device and dtype; they hold no state, so
they behave the same on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_same_shape(recon: torch.Tensor, target: torch.Tensor) -> None:
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction_loss: recon has shape {tuple(recon.shape)}, target {tuple(target.shape)}")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """``l1 * mean|recon - target| + l2 * mean (recon - target)^2``, a scalar.

    Either weight may be 0; a term with weight 0 is not computed. With both 0 the loss is a
    zero scalar (the pixel loss is then switched off, e.g. for a perceptual-only ablation).
    """
    _check_same_shape(recon, target)
    if l1 < 0 or l2 < 0:
        raise ValueError(f"reconstruction_loss: weights must be >= 0, got l1={l1}, l2={l2}")
    loss = recon.new_zeros(())
    difference = recon - target
    if l1:
        loss = loss + l1 * difference.abs().mean()
    if l2:
        loss = loss + l2 * difference.square().mean()
    return loss


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``.

    Means run over every logit of the patch maps: each patch is one real/fake decision. The
    fake logits must come from detached reconstructions, or this loss trains the generator too.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (tokenizer) adversarial loss ``-mean(logits_fake)``: the usual non-saturating
    partner of the hinge discriminator loss in VQGAN."""
    return -logits_fake.mean()


def _grad_norm(loss: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    if not loss.requires_grad:
        raise ValueError(f"adaptive_weight: {name} does not require grad (computed under no_grad or detached?)")
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(f"adaptive_weight: {name} does not depend on last_layer_weight")
    return torch.linalg.vector_norm(grad)


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight of the adversarial loss (taming-transformers, Esser et al. 2021):

        lambda = clamp(||grad_w nll_loss|| / (||grad_w g_loss|| + 1e-4), 0, max_weight)

    where ``w`` is the weight of the decoder's last layer and ``||.||`` the Frobenius (L2) norm.
    It scales the adversarial gradient at the output layer to the size of the reconstruction
    gradient, so that neither dominates whatever the loss scales are. ``nll_loss`` is the
    reconstruction part of the objective (in VQGAN: pixel + perceptual), ``g_loss`` the
    unweighted :func:`hinge_g_loss`. The result is a detached scalar: it is a weight, not a path
    for gradients. The caller multiplies it by the configured discriminator weight.

    Both gradients are taken with ``torch.autograd.grad(..., retain_graph=True)``: the graph
    survives for the caller's backward, and no ``.grad`` field is touched.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("adaptive_weight: last_layer_weight does not require grad")
    nll_norm = _grad_norm(nll_loss, last_layer_weight, "nll_loss")
    g_norm = _grad_norm(g_loss, last_layer_weight, "g_loss")
    return (nll_norm / (g_norm + 1e-4)).clamp(0.0, max_weight).detach()


def gan_factor(step: int, start_step: int) -> float:
    """0.0 before ``start_step`` and 1.0 from it on: VQGAN trains the autoencoder alone first,
    since a discriminator facing blurry early reconstructions wins at once and gives no useful
    gradient."""
    return 0.0 if step < start_step else 1.0
