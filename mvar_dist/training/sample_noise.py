"""Per-sample random draws (label drop, drop-path) that do not depend on the world size.

With torch's RNG, a sample's label drop and drop-path masks depend on which rank and micro batch
it lands in, so a run resumed on another number of ranks would train on other draws. Here each
draw is a hash of (run seed, step, sample id, scale-group pass, column), so the same sample in
the same step gets the same draws on any cluster. The hash is SplitMix64's finaliser, whose
outputs are uniform enough for Bernoulli masks; the top 24 bits become a float32 in [0, 1).
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, step: int, ids: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    """(len(ids), columns) float32 uniforms in [0, 1) for the samples ``ids`` in ``step``'s pass
    over scale group number ``group``."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & (2**64 - 1)) * _GOLDEN + np.uint64(step))
        key = _mix(key ^ (np.uint64(group) * _GOLDEN))
        base = _mix(key ^ ids.numpy().astype(np.uint64) * _GOLDEN)
        draws = _mix(base[:, None] + np.arange(1, columns + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return torch.from_numpy((draws >> np.uint64(40)).astype(np.float32) / np.float32(2**24))
