"""Peak memory of this process for the step metrics: CUDA's allocator peak on a GPU, the
resident-set peak on CPU (which includes the allocator's caching: a figure, not an accounting)."""

from __future__ import annotations

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
