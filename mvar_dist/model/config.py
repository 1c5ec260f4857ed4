"""``MVARConfig``: the architecture of the transformer (the ``model`` section of an experiment)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from mvar_dist.scales import DEFAULT_PATCH_NUMS, ScaleLayout

Mode = Literal["mvar", "var"]


@dataclass
class MVARConfig:
    """Architecture of the transformer. ``embed_dim``/``num_heads``/``drop_path_rate`` left as
    None are derived from ``depth`` as in the released models (64*depth, depth, 0.1*depth/24)."""

    depth: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    kernel_size: int = 7
    refine_step: int = 8
    cond_drop_rate: float = 0.1
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    mode: Mode = "mvar"
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        self.validate()

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"MVARConfig: {message}")

        for name in ("depth", "num_classes", "vocab_size", "z_channels", "embed_dim", "num_heads"):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            fail(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        try:
            layout = ScaleLayout(self.patch_nums)
        except ValueError as err:
            fail(str(err))
        num_scales = layout.num_scales
        if not 1 <= self.refine_step <= num_scales:
            fail(
                f"refine_step must be in 1..{num_scales} (len(patch_nums)); got {self.refine_step}. "
                f"Scales >= refine_step use neighbourhood attention; {num_scales} means none do"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.refine_step < num_scales:
            smallest = self.patch_nums[self.refine_step]
            if self.kernel_size > smallest:
                fail(
                    f"kernel_size {self.kernel_size} is larger than the smallest neighbourhood-"
                    f"attention grid ({smallest}x{smallest}, scale {self.refine_step}); "
                    f"lower kernel_size or raise refine_step"
                )
        if self.mode not in ("mvar", "var"):
            fail(f"mode must be 'mvar' (Markovian) or 'var' (block-causal), got {self.mode!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            fail(f"attention_backend must be 'auto', 'triton' or 'torch', got {self.attention_backend!r}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            fail(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            fail(f"mlp_ratio and norm_eps must be positive, got {self.mlp_ratio}, {self.norm_eps}")

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_nums"] = list(self.patch_nums)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MVARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"MVARConfig: unknown field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**data)
