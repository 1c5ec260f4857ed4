"""The transformer's building blocks: AdaLN self-attention block, attention, FFN, AdaLN head.

Parameter names follow the released VAR / MVAR checkpoints (``mat_qkv``, ``q_bias``,
``scale_mul_1H11``, ``ada_lin.1``, ...) so that their state dicts load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvar_dist.model.attention import AttentionPlan

# Buffers of the released checkpoints that are derived from the config; accepted on load, not kept.
_IGNORED_ATTENTION_BUFFERS = ("zero_k_bias",)


def drop_ignored_keys(state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Remove ``prefix + name`` entries (derived buffers of released checkpoints) in place."""
    for name in names:
        state_dict.pop(prefix + name, None)


@dataclass
class KVCache:
    """Keys and values of the scales already generated, for one attention layer (VAR sampling)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    num_tokens: int = field(default=0)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's (batch, heads, n, head_dim) keys/values; return the whole cache."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        self.num_tokens = self.keys.shape[2]
        return self.keys, self.values


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample, rescaled by 1/keep."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """``uniform`` (batch,) in [0, 1): the sample's own draw (kept where < keep); None draws
        from torch's RNG."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if uniform is None:
            mask = x.new_empty(shape).bernoulli_(keep)
        else:
            mask = (uniform < keep).to(x.dtype).view(shape)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class SelfAttention(nn.Module):
    """Multi-head attention with fused qkv, q/v biases (k has none) and optional L2-normalised q, k."""

    def __init__(self, dim: int, num_heads: int, l2_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            # per-head learnable temperature, applied to the normalised queries
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
            self.softmax_scale = 1.0
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.register_load_state_dict_pre_hook(self._drop_derived_buffers)

    def _drop_derived_buffers(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        drop_ignored_keys(state_dict, prefix, _IGNORED_ATTENTION_BUFFERS)

    def forward(
        self, x: torch.Tensor, plan: AttentionPlan | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x: (batch, n, dim). Attend with ``plan`` (training / MVAR) or against ``cache`` + x (VAR)."""
        batch, n, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, n, head_dim)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1) * scale_mul
            k = F.normalize(k, dim=-1)
        if cache is not None:
            # the new scale sees every cached token and all of itself: block-causal over scales
            k, v = cache.extend(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        elif plan is not None:
            out = plan.attend(q, k, v, scale=self.softmax_scale)
        else:
            raise ValueError("attention needs an AttentionPlan or a KVCache")
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttentionBlock(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gains come from the class embedding."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        norm_eps: float,
        attn_l2_norm: bool,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FeedForward(dim, round(dim * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        plan: AttentionPlan | None = None,
        cache: KVCache | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, n, dim); cond: (batch, dim); noise: (batch, 2) per-sample drop-path draws of
        the two branches, or None (torch's RNG)."""
        # the released order of the six modulation vectors
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (
            self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        )
        h = self.attn(self.norm(x) * (1 + scale1) + shift1, plan=plan, cache=cache)
        x = x + self.drop_path(h * gamma1, None if noise is None else noise[:, 0])
        h = self.ffn(self.norm(x) * (1 + scale2) + shift2)
        return x + self.drop_path(h * gamma2, None if noise is None else noise[:, 1])


class AdaLNBeforeHead(nn.Module):
    """LayerNorm modulated by the class embedding, applied before the vocabulary head."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.norm(x) * (1 + scale) + shift
