"""MVAR / VAR class-conditional transformer over multi-scale VQ tokens.

Both modes share every parameter (and the released checkpoints' names); they differ only in
who attends to whom (docs/semantics.md, section 4). ``mvar``: each scale attends only to itself (block-diagonal),
with k x k neighbourhood attention on scales >= refine_step. ``var``: block-causal over scales.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mvar_dist.model.attention import AttentionPlan
from mvar_dist.model.blocks import AdaLNBeforeHead, AdaLNSelfAttentionBlock, KVCache, drop_ignored_keys
from mvar_dist.model.config import MVARConfig
from mvar_dist.model.generate import check_labels, generate as sample_images
from mvar_dist.model.pretrained import read_export_weights

# Buffers of the released checkpoints that are derived from the config; accepted on load, not kept.
_IGNORED_MODEL_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


class MVAR(nn.Module):
    """The transformer; ``forward(label, teacher_input, scales)`` gives the logits of ``scales``."""

    def __init__(self, config: MVARConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = config.layout
        dim, first_len = config.embed_dim, self.layout.scale_len(0)
        self.num_classes = config.num_classes
        # registration order reproduces the released state-dict key order
        self.pos_start = nn.Parameter(torch.empty(1, first_len, dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.layout.num_tokens, dim))
        self.word_embed = nn.Linear(config.z_channels, dim)
        self.class_emb = nn.Embedding(config.num_classes + 1, dim)  # last row: the null class
        self.lvl_embed = nn.Embedding(self.layout.num_scales, dim)
        drop_rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttentionBlock(
                dim, config.num_heads, config.mlp_ratio, drop_rate, config.norm_eps, config.attn_l2_norm
            )
            for drop_rate in drop_rates
        )
        self.head_nm = AdaLNBeforeHead(dim, config.norm_eps)
        self.head = nn.Linear(dim, config.vocab_size)
        self._plans: dict[tuple[int, ...], AttentionPlan] = {}
        self.checkpoint_every = 0  # activation checkpointing: see set_activation_checkpointing
        self.register_load_state_dict_pre_hook(self._drop_derived_buffers)
        self.init_weights()

    def _drop_derived_buffers(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        drop_ignored_keys(state_dict, prefix, _IGNORED_MODEL_BUFFERS)

    @torch.no_grad()
    def init_weights(
        self, adaln: float = 0.5, adaln_gamma: float = 1e-5, head: float = 0.02, std: float | None = None
    ) -> None:
        """The released initialisation (docs/semantics.md, section 3)."""
        dim = self.config.embed_dim
        std = math.sqrt(1 / (3 * dim)) if std is None else std
        for param in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(param, std=std)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        self.head.weight.mul_(head)
        self.head_nm.ada_lin[-1].weight.mul_(adaln)
        residual_scale = math.sqrt(2 * self.config.depth)
        for block in self.blocks:
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            block.attn.proj.weight.div_(residual_scale)
            block.ffn.fc2.weight.div_(residual_scale)
            # rows [0, 2C) produce gamma1, gamma2: start every residual branch almost closed
            block.ada_lin[-1].weight[: 2 * dim].mul_(adaln_gamma)
            block.ada_lin[-1].weight[2 * dim :].mul_(adaln)

    # ----- attention plans and token selections (cached: no per-forward mask building) -----

    def attention_plan(self, scales: tuple[int, ...]) -> AttentionPlan:
        if scales not in self._plans:
            cfg = self.config
            self._plans[scales] = AttentionPlan(
                self.layout, scales, mode="markov" if cfg.mode == "mvar" else "causal",
                kernel_size=cfg.kernel_size, refine_step=cfg.refine_step, backend=cfg.attention_backend,
            )
        return self._plans[scales]

    def check_scales(self, scales: Iterable[int]) -> tuple[int, ...]:
        """Validate a scale selection for this model's mode; returns it sorted."""
        chosen = self.layout.check_scales(scales)
        if self.config.mode == "var" and chosen != tuple(range(len(chosen))):
            raise ValueError(
                f"mode='var' attends block-causally, so a pass must cover a prefix of scales "
                f"range(0, s); got {list(chosen)}. Use mode='mvar' to run arbitrary scale subsets"
            )
        return chosen

    def targets_for(self, codes: torch.Tensor, scales: Iterable[int]) -> torch.Tensor:
        """The (B, n) target codes of ``scales`` from all (B, L) codes, in forward's token order."""
        if codes.dim() != 2 or codes.shape[1] != self.layout.num_tokens:
            raise ValueError(f"codes must be (batch, {self.layout.num_tokens}), got {tuple(codes.shape)}")
        index = self.layout.token_index(self.check_scales(scales)).to(codes.device)
        return codes[:, index]

    # ----- inputs -----

    def scale_tokens(self, scale: int, start: torch.Tensor | None = None, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens of one scale: ``start`` = class embeddings (B, C) for scale 0, else
        ``teacher`` = (B, pn^2, z_channels) teacher input of the scale. Adds level + position."""
        begin, end = self.layout.begin_ends[scale]
        if scale == 0:
            x = start[:, None, :] + self.pos_start
        else:
            if teacher is None or teacher.shape[1:] != (end - begin, self.config.z_channels):
                got = None if teacher is None else tuple(teacher.shape)
                raise ValueError(
                    f"scale {scale} needs a teacher input of shape (batch, {end - begin}, "
                    f"{self.config.z_channels}), got {got}"
                )
            x = self.word_embed(teacher.to(self.word_embed.weight.dtype))
        levels = torch.full((end - begin,), scale, device=x.device, dtype=torch.long)
        return x + self.lvl_embed(levels) + self.pos_1LC[:, begin:end]

    def _check_teacher_input(self, teacher_input: torch.Tensor | None, batch: int, scales: tuple[int, ...]) -> None:
        if teacher_input is None:
            if scales != (0,):
                raise ValueError(f"teacher_input is required for scales {list(scales)} (only scale 0 runs without)")
            return
        expected = (batch, self.layout.num_tokens - self.layout.scale_len(0), self.config.z_channels)
        if tuple(teacher_input.shape) != expected:
            raise ValueError(
                f"teacher_input must be the full (batch, L - {self.layout.scale_len(0)}, z_channels) = "
                f"{expected} tensor for patch_nums={self.layout.patch_nums}, got {tuple(teacher_input.shape)}"
            )

    def drop_labels(self, label: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance training: replace labels by the null class at cond_drop_rate
        (``uniform``: each sample's own draw in [0, 1); None: torch's RNG)."""
        if not self.training or self.config.cond_drop_rate == 0:
            return label
        if uniform is None:
            uniform = torch.rand(label.shape, device=label.device)
        drop = uniform < self.config.cond_drop_rate
        return torch.where(drop, torch.full_like(label, self.num_classes), label)

    # ----- forward -----

    def forward(
        self, label: torch.Tensor, teacher_input: torch.Tensor | None, scales: Iterable[int],
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """label (B,), teacher_input (B, L - first_len, z_channels) -> logits (B, n, V) for the
        tokens of ``scales`` in sequence order. In training mode labels are dropped to the null class
        and residual branches by drop-path: with ``noise`` (B, 1 + 2 x depth) uniforms in [0, 1),
        column 0 decides the label drop and columns 1 + 2i, 2 + 2i block i's two branches, so that
        a sample's draws do not depend on which rank or batch it is in; None draws from torch's RNG."""
        scales = self.check_scales(scales)
        check_labels(label, self.num_classes)
        self._check_teacher_input(teacher_input, label.shape[0], scales)
        cond = self.class_emb(self.drop_labels(label, None if noise is None else noise[:, 0]))
        offset = self.layout.scale_len(0)
        tokens = []
        for s in scales:
            begin, end = self.layout.begin_ends[s]
            teacher = None if s == 0 else teacher_input[:, begin - offset : end - offset]
            tokens.append(self.scale_tokens(s, start=cond, teacher=teacher))
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        return self.logits(x, cond, plan=self.attention_plan(scales), noise=noise)

    def logits(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        plan: AttentionPlan | None = None,
        caches: list[KVCache] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks and head on embedded tokens x (B, n, C) with class embeddings cond (B, C)."""
        recompute = self.checkpoint_every and self.training and torch.is_grad_enabled() and caches is None
        for i, block in enumerate(self.blocks):
            block_noise = None if noise is None else noise[:, 1 + 2 * i : 3 + 2 * i]
            if recompute and i % self.checkpoint_every == 0:
                # keep only the block's input; its activations are recomputed in backward (with the
                # same RNG draws, so drop-path masks and the gradients are unchanged)
                x = checkpoint(block, x, cond, plan, None, block_noise, use_reentrant=False)
            else:
                x = block(x, cond, plan=plan, cache=None if caches is None else caches[i], noise=block_noise)
        return self.head(self.head_nm(x, cond))

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute one block in every ``every`` during backward instead of storing its
        activations (1: every block; 0: none). Training only; the math is unchanged."""
        if every < 0:
            raise ValueError(f"activation checkpointing interval must be >= 0, got {every}")
        self.checkpoint_every = every

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` each block in place (parameter names unchanged, so checkpoints and
        exports are the same); the scale groups' token counts are the only shapes it sees."""
        for block in self.blocks:
            block.compile(**options)

    # ----- sampling -----

    def new_kv_caches(self) -> list[KVCache]:
        """Empty per-block KV caches (var-mode sampling only)."""
        if self.config.mode != "var":
            raise ValueError("KV caches are only used in mode='var'; mvar sampling needs no cache")
        return [KVCache() for _ in self.blocks]

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        verify: bool = True,
    ) -> "MVAR":
        """A model in eval mode from an ``mvar-dist export`` directory (config.json + weights);
        ``verify`` checks the weights' sha256 against config.json (False skips it, for speed)."""
        config, state, weights = read_export_weights(directory, device, verify)
        with torch.device("meta"):  # no initialisation of weights that are overwritten next
            model = cls(MVARConfig.from_dict(config))
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)  # derived buffers of .pth files are dropped
        left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left_on_meta:
            raise RuntimeError(f"{weights} left tensors uninitialised: {left_on_meta[:5]}")
        return model.eval()

    def generate(self, labels: torch.Tensor, tokenizer: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sample one image per label: the public entry to sampling. Keywords ``cfg`` (2.7),
        ``top_k`` (1200), ``top_p`` (0.99), ``seed`` (None: a fresh one); returns (codes per scale,
        images in [0, 1]). The loop is :func:`mvar_dist.model.generate.generate`."""
        return sample_images(self, labels, tokenizer, **kwargs)

    def extra_repr(self) -> str:
        cfg = self.config
        return f"mode={cfg.mode}, depth={cfg.depth}, dim={cfg.embed_dim}, patch_nums={cfg.patch_nums}"
