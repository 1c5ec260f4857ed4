"""Scale-by-scale sampling with classifier-free guidance and top-k / top-p filtering (docs/semantics.md, section 5).

``mvar`` runs every scale on its own tokens only: no KV cache, memory independent of the earlier
scales. ``var`` keeps a per-block KV cache so that each scale attends to all earlier ones.

The loop asks of a model only what :class:`SamplingModel` names, so this module never imports the
transformer, not even for types: ``MVAR.generate`` calls :func:`generate`, and ``MVAR.forward``
checks its labels with :func:`check_labels`, the check the sampler runs too.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn

from mvar_dist.model.attention import AttentionPlan
from mvar_dist.model.blocks import KVCache
from mvar_dist.model.config import MVARConfig
from mvar_dist.scales import ScaleLayout


class SamplingModel(Protocol):
    """What the sampling loop uses of a model; :class:`mvar_dist.model.MVAR` has all of it."""

    config: MVARConfig
    layout: ScaleLayout
    num_classes: int
    training: bool
    class_emb: nn.Embedding

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def new_kv_caches(self) -> list[KVCache]: ...

    def attention_plan(self, scales: tuple[int, ...]) -> AttentionPlan: ...

    def scale_tokens(
        self, scale: int, start: torch.Tensor | None = None, teacher: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def logits(
        self, x: torch.Tensor, cond: torch.Tensor, plan: AttentionPlan | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor: ...


def check_labels(label: torch.Tensor, num_classes: int) -> None:
    """A 1-D integer tensor of class ids in 0..num_classes (``num_classes`` = the null class)."""
    if label.dim() != 1 or label.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"label must be a 1-D integer tensor (batch,), got {label.dtype} {tuple(label.shape)}")
    if label.is_meta:  # shapes only (mvar_dist.memory counts activations on meta): no values to check
        return
    # one host sync per call buys a clear message instead of a device-side assert
    if bool(((label < 0) | (label > num_classes)).any()):
        raise ValueError(
            f"labels must be in 0..{num_classes} ({num_classes} = null class), "
            f"got range {int(label.min())}..{int(label.max())}"
        )


def guidance_weight(cfg: float, scale: int, num_scales: int) -> float:
    """The published linear schedule: t = cfg * s / (S - 1), from no guidance to full cfg."""
    return cfg * scale / max(num_scales - 1, 1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf what top-k and then top-p sampling exclude (a new tensor; last dim = vocab).

    top_k <= 0 or >= vocab keeps everything (ties with the k-th logit are kept). top_p in (0, 1)
    keeps the smallest set of most likely tokens whose probability reaches top_p, measured as in
    the published sampler: drop the least likely tokens while their cumulative mass stays
    <= 1 - top_p; the most likely token is always kept.
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    vocab = logits.shape[-1]
    logits = logits.clone()
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0.0:
        ascending, order = logits.sort(dim=-1, descending=False)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def sample_codes(
    logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, n, V) logits -> (B, n) codes drawn from the filtered softmax."""
    batch, n, vocab = logits.shape
    probs = filter_logits(logits.float(), top_k, top_p).softmax(dim=-1)
    codes = torch.multinomial(probs.view(-1, vocab), num_samples=1, replacement=True, generator=generator)
    return codes.view(batch, n)


def _check_tokenizer(model: SamplingModel, tokenizer: Any) -> None:
    for name, ours in (
        ("layout", model.layout),
        ("vocab_size", model.config.vocab_size),
        ("z_channels", model.config.z_channels),
    ):
        theirs = getattr(tokenizer, name)
        if theirs != ours:
            raise ValueError(f"tokenizer {name} {theirs} does not match the model's {ours}")


def generate(
    model: SamplingModel,
    labels: torch.Tensor,
    tokenizer: Any,
    cfg: float = 2.7,
    top_k: int = 1200,
    top_p: float = 0.99,
    seed: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample one image per label. Returns (codes per scale [(B, pn^2) long], images (B, 3, H, W) in [0, 1]).

    Defaults are the published d16 settings. The same ``seed`` gives the same output regardless
    of the global RNG; ``seed=None`` draws a fresh one. Label ``num_classes`` is unconditional.
    The model runs in eval mode (no drop-path) and is put back in its previous mode afterwards.
    ``model.generate(labels, tokenizer, ...)`` of an ``MVAR`` is this function on that model.
    """
    _check_tokenizer(model, tokenizer)
    check_labels(labels, model.num_classes)
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    generator = torch.Generator(device=labels.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        return _sample(model, labels, tokenizer, cfg, top_k, top_p, generator)
    finally:
        model.train(was_training)


@torch.no_grad()
def _sample(
    model: SamplingModel, labels: torch.Tensor, tokenizer: Any, cfg: float, top_k: int, top_p: float,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    layout = model.layout
    batch, num_scales = labels.shape[0], layout.num_scales
    guided = cfg > 0
    if guided:  # conditional half, then null-class half
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    cond = model.class_emb(labels)
    caches = model.new_kv_caches() if model.config.mode == "var" else None
    final = layout.final_size
    f_hat = torch.zeros(batch, model.config.z_channels, final, final, device=labels.device)
    codes_per_scale: list[torch.Tensor] = []
    for s in range(num_scales):
        if s == 0:
            x = model.scale_tokens(0, start=cond)
        else:
            teacher = tokenizer.teacher_input_for_scale(f_hat, s)
            x = model.scale_tokens(s, teacher=torch.cat([teacher, teacher]) if guided else teacher)
        # mvar: this scale's tokens alone; var: the caches hold every earlier scale
        plan = None if caches is not None else model.attention_plan((s,))
        logits = model.logits(x, cond, plan=plan, caches=caches).float()
        if guided:
            t = guidance_weight(cfg, s, num_scales)
            logits = (1 + t) * logits[:batch] - t * logits[batch:]
        codes = sample_codes(logits, top_k, top_p, generator)
        codes_per_scale.append(codes)
        f_hat = f_hat + tokenizer.scale_contribution(codes, s).float()
    images = (tokenizer.f_hat_to_img(f_hat) + 1) / 2
    return codes_per_scale, images
