"""The few collectives the run skeleton needs besides the training step's own: failing together
(so that one rank's error never leaves the others waiting in a collective), agreeing on a flag,
and sharing a value of rank 0. Each is a no-op without a process group."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def _device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_every_rank(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and make every rank fail if any rank failed (avoids hangs in collectives)."""
    error: BaseException | None = None
    try:
        result = fn()
    except BaseException as err:  # noqa: BLE001 - re-raised below
        error, result = err, None
    if any_rank(error is not None) and error is None:
        raise RuntimeError("another rank failed; see its log")
    if error is not None:
        raise error
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself without a group."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
