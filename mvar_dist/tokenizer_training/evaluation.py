"""Evaluating a tokenizer while it trains: reconstruction L1 and PSNR over the held-out images
(every rank, exactly once each), and a grid of originals beside what the first k scales
reconstruct, for every k (rank 0). Neither touches the training stream or its RNGs."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from mvar_dist.sampling.images import compose_grid, to_uint8_hwc
from mvar_dist.tokenizer import MultiScaleVQVAE


@torch.no_grad()
def validate(model: MultiScaleVQVAE, loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             max_batches: int, device: torch.device) -> dict[str, float]:
    """``val/l1`` (mean absolute error in [-1, 1] pixels), ``val/psnr`` (dB, images mapped to
    [0, 1], averaged over images) and ``val/samples``, reduced over ranks. A collective."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # l1 sum over images, psnr sum, images
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for index, (images, _, mask) in enumerate(loader):
                if max_batches and index >= max_batches:
                    break  # every rank has the same number of batches, so every rank stops here
                images, mask = images.to(device), mask.to(device).double()
                recon = model.codes_to_img(model.img_to_codes(images))
                error = (recon.float() - images.float()).flatten(1)
                l1 = error.abs().mean(dim=1).double()
                mse01 = (error / 2).square().mean(dim=1).double().clamp(min=1e-12)
                sums += torch.stack([(l1 * mask).sum(), (10 * torch.log10(1 / mse01) * mask).sum(), mask.sum()]).cpu()
    finally:
        model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(sums)
    count = max(float(sums[2]), 1.0)
    return {"val/l1": float(sums[0]) / count, "val/psnr": float(sums[1]) / count, "val/samples": float(sums[2])}


@torch.no_grad()
def scale_grid(model: MultiScaleVQVAE, images: torch.Tensor) -> np.ndarray:
    """uint8 grid: one row per image; the original, then the reconstruction from scales
    0..k-1 for k = 1..S (the last column is the full reconstruction)."""
    was_training = model.training
    model.eval()
    try:
        codes = model.img_to_codes(images)
        columns = [images.float()]
        f_hat = model.quantize.empty_f_hat(images.shape[0])
        for scale, codes_s in enumerate(codes):
            f_hat = f_hat + model.scale_contribution(codes_s, scale)
            columns.append(model.f_hat_to_img(f_hat))
    finally:
        model.train(was_training)
    cells = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: image by image
    return compose_grid(to_uint8_hwc((cells + 1) / 2), rows=images.shape[0])


def log_scale_grid(model: MultiScaleVQVAE, images: torch.Tensor, tracker: Any, step: int, rank: int) -> None:
    """Rank 0 logs ``reconstructions/step_NNNNNNN.png``; a grid never stops training."""
    if rank != 0:
        return
    try:
        tracker.log_image(scale_grid(model, images), f"reconstructions/step_{step:07d}.png")
    except Exception:  # a progress picture: it must never stop training
        import logging

        logging.getLogger(__name__).exception("step %d: the reconstruction grid failed; training continues", step)
