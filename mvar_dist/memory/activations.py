"""Exact activation memory of one training pass: the bytes autograd saves for backward.

Counted, not estimated. One training forward of the model, with the trainer's loss
(:func:`mvar_dist.training.losses.token_loss` on the logits of the pass's scales, as
``mvar_dist.training.task.train_step`` computes it), runs under
``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is seen there, and the
bytes of the storages those tensors keep alive are summed:

- a storage shared by several saved tensors (a view saved by one op and the whole tensor by
  another, ``log_softmax``'s output that ``nll_loss`` saves again) is counted once, and a saved
  view counts its whole storage, since that is what it keeps alive;
- parameters and buffers, and views of them, are model state, not activations: not counted;
- inputs autograd saves (the teacher input, labels, targets) are counted: the graph holds them.

On the ``meta`` device nothing is computed, so the paper's shapes (depth 24, batch 32, 680
tokens) are counted in seconds without a GPU. Two things make a meta pass save what a real one
saves: ``F.scaled_dot_product_attention`` on meta would take the math path (a saved (n, n)
probability matrix), so it is routed to the flash kernel a CPU run takes (saving q, k, v, the
output, the fp32 log-sum-exp and the mask converted to the query's dtype; CUDA's kernels save the
same tensors, their log-sum-exp and mask padded by a few tokens); and the fused Triton kernel
runs its own autograd.Function on meta with the launches skipped (``kernels/neighborhood.py``),
so what it saves is what its ``save_for_backward`` saves on a GPU. Where torch's CPU and CUDA
kernels differ, meta follows CUDA: layer norm keeps its per-token mean and rstd in fp32 for
bf16/fp16 inputs (CUDA, meta) but in the input dtype on CPU, so a bf16 CPU pass saves 4 bytes
less per token per layer norm. tests/test_memory_activations.py requires the meta count to equal
a real CPU pass's: exactly in fp32, and in bf16 up to exactly that layer-norm difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.scales import scale_groups
from mvar_dist.training.losses import token_loss

logger = logging.getLogger(__name__)

# dtypes CPU's flash attention kernel takes (otherwise SDPA falls back to the math path)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ActivationCount:
    """What one training pass saves for backward.

    ``kept_bytes``: held from the end of the forward until backward reaches them (the loss
    included). ``recompute_bytes``: with activation checkpointing, the largest activations one
    checkpointed block rebuilds during its backward (a transient: held only while that block's
    backward runs); 0 without checkpointing. ``peak_bytes`` = kept + recompute is an upper bound
    on saved-tensor memory during backward (by the time a block is recomputed, the head's and
    later blocks' saved tensors are already freed)."""

    kept_bytes: int
    recompute_bytes: int
    saved_tensors: int  # tensors autograd saved, parameters and repeats included
    storages: int  # distinct activation storages behind them

    @property
    def peak_bytes(self) -> int:
        return self.kept_bytes + self.recompute_bytes


def paper_model_config(depth: int, mode: str = "mvar", attention_backend: str = "auto") -> MVARConfig:
    """The model section of the published recipes (configs/mvar_d16.yaml, var_d16.yaml, ...):
    ImageNet 256 px, 10 scales (680 tokens), 1000 classes, vocabulary 4096, ``refine_step`` 8,
    ``kernel_size`` 7; width 64 x depth and depth heads, derived from ``depth`` by MVARConfig."""
    return MVARConfig(depth=depth, mode=mode, attention_backend=attention_backend)  # type: ignore[arg-type]


def pass_groups(model_config: MVARConfig) -> list[tuple[int, ...]]:
    """The scale groups a training step runs as separate forward/backward passes: VAR's one
    pass over all scales; for MVAR the groups of ``mvar_dist.scales.scale_groups`` (0..7 | 8 | 9
    for the published layout), which both schedules use (``all`` runs every group each step,
    ``paper`` one group per step). A step's activation peak is its largest group's."""
    num_scales = len(model_config.patch_nums)
    if model_config.mode == "var":
        return [tuple(range(num_scales))]
    return scale_groups(num_scales, model_config.refine_step)


def activation_bytes(
    model_config: MVARConfig, batch_size: int, *, dtype: torch.dtype = torch.bfloat16,
    checkpointing: int = 0, scales: Sequence[int] | None = None,
    attention_backend: str | None = None, device: str | torch.device = "meta",
) -> int:
    """Bytes autograd saves for backward in one training forward (loss included) of
    ``batch_size`` samples over ``scales`` (None: all scales in one pass); parameters excluded,
    shared storage counted once. With ``checkpointing`` = n (the model's
    ``set_activation_checkpointing`` interval: 0 none, 1 every block, n every n-th block) this is
    what the forward keeps: a checkpointed block keeps only its inputs. Not counted: the
    recomputed block's activations during its backward (a transient, see
    :func:`activation_peak_bytes`), gradients, the optimizer, the logits the trainer keeps for
    its statistics, allocator caching and fragmentation, and the label-smoothing variant of the
    loss (every published recipe uses 0). ``attention_backend``: ``torch`` (the neighbourhood
    path of kernels/reference.py), ``triton`` (the fused kernel; needs triton installed, and on
    CPU the interpreter) or ``auto`` (what a run on ``device`` takes; on meta that of a CUDA run,
    the fused kernel); None: the config's. The meta device (default) computes nothing and gives
    a real pass's count (see the module's docstring for the one CPU/CUDA difference). For batch
    sizes >= 2 the count is affine in the batch size."""
    return count_activations(model_config, batch_size, dtype=dtype, checkpointing=checkpointing,
                             scales=scales, attention_backend=attention_backend, device=device).kept_bytes


def activation_peak_bytes(
    model_config: MVARConfig, batch_size: int, *, dtype: torch.dtype = torch.bfloat16,
    checkpointing: int = 0, scales: Sequence[int] | None = None,
    attention_backend: str | None = None, device: str | torch.device = "meta",
) -> int:
    """:func:`activation_bytes` plus, with checkpointing, the largest one checkpointed block's
    activations while it is recomputed in backward: an upper bound on the saved-tensor memory
    of the pass at any moment. Equal to :func:`activation_bytes` without checkpointing."""
    return count_activations(model_config, batch_size, dtype=dtype, checkpointing=checkpointing,
                             scales=scales, attention_backend=attention_backend, device=device).peak_bytes


def count_activations(
    model_config: MVARConfig, batch_size: int, *, dtype: torch.dtype = torch.bfloat16,
    checkpointing: int = 0, scales: Sequence[int] | None = None,
    attention_backend: str | None = None, device: str | torch.device = "meta",
) -> ActivationCount:
    """Both figures of :func:`activation_bytes` and :func:`activation_peak_bytes` from one call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpointing < 0:
        raise ValueError(f"checkpointing must be >= 0 (0 none, 1 every block, n every n-th), got {checkpointing}")
    device = torch.device(device)
    backend = resolve_attention_backend(attention_backend or model_config.attention_backend, device)
    config = dataclasses.replace(model_config, attention_backend=backend)
    chosen = tuple(range(len(config.patch_nums))) if scales is None else config.layout.check_scales(scales)
    model = _build_model(config, dtype, device)
    kept = _count_pass(model, batch_size, chosen, checkpointing, track_blocks=False)
    recompute = 0
    if checkpointing:
        # a checkpointed block rebuilds, in its backward, what it saves when not checkpointed
        plain = _count_pass(model, batch_size, chosen, 0, track_blocks=True)
        recompute = max(plain.block_bytes[i] for i in range(0, config.depth, checkpointing))
    result = ActivationCount(kept.total_bytes, recompute, kept.saved_tensors, len(kept.storages))
    logger.debug("activations of %s depth %d, batch %d, %s, scales %s, checkpointing %d, %s on %s: %s",
                 config.mode, config.depth, batch_size, dtype, list(chosen), checkpointing, backend, device, result)
    return result


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """``torch`` or ``triton``: the neighbourhood path a pass on ``device`` takes. ``auto`` is
    what the model picks (the fused kernel on CUDA, torch elsewhere), with meta standing for a
    CUDA run; without triton installed it falls back to the torch path, with a warning."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"attention_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "torch"
    if importlib.util.find_spec("triton") is None:
        logger.warning("triton is not installed: counting the torch neighbourhood path, not the fused kernel")
        return "torch"
    return "triton"


def _build_model(config: MVARConfig, dtype: torch.dtype, device: torch.device) -> MVAR:
    # parameters in the training dtype, as DeepSpeed's bf16/fp16 engines hold the module
    with torch.device(device):
        model = MVAR(config)
    model.to(dtype).train()
    return model


@dataclass
class _PassTally:
    storages: dict[Any, torch.UntypedStorage]
    total_bytes: int
    saved_tensors: int
    block_bytes: list[int]


def count_saved(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (grad
    enabled), each once; storages of ``exclude`` (parameters, say) are not counted, nor views of
    them. The graph ``fn`` returns is dropped. On meta, attention is counted as on CPU (above)."""
    tally = _SavedStorages(exclude, 0)
    with _counting(tally):
        result = fn()
    del result
    return sum(storage.nbytes() for storage in tally.storages.values())


def _counting(tally: _SavedStorages) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tally.pack, _unpack))
    stack.enter_context(_FlashAttentionOnMeta())  # passes everything but meta SDPA through
    return stack


class _SavedStorages:
    """The pack hook: records each saved tensor's storage once, skipping excluded storages."""

    def __init__(self, exclude: Iterable[torch.Tensor], num_blocks: int) -> None:
        self.excluded = {_storage_key(t)[0] for t in exclude}
        # held until the count ends, so that no storage (and no id on meta) is freed and reused
        self.storages: dict[Any, torch.UntypedStorage] = {}
        self.saved_tensors = 0
        self.block: int | None = None
        self.block_inputs: set[Any] = set()
        self.per_block: list[dict[Any, int]] = [{} for _ in range(num_blocks)]

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved_tensors += 1
        key, storage = _storage_key(tensor)
        if key in self.excluded:
            return tensor
        self.storages.setdefault(key, storage)
        if self.block is not None and key not in self.block_inputs:
            self.per_block[self.block][key] = storage.nbytes()
        return tensor

    def enter_block(self, index: int, args: tuple, kwargs: dict) -> None:
        self.block = index
        # what the block is given is kept by the checkpoint anyway: not part of its recompute
        self.block_inputs = {_storage_key(t)[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}

    def leave_block(self) -> None:
        self.block, self.block_inputs = None, set()


def _storage_key(tensor: torch.Tensor) -> tuple[Any, torch.UntypedStorage]:
    storage = tensor.untyped_storage()
    if tensor.is_meta:
        # meta storages have no address (data_ptr 0); torch keeps one Python object per storage
        # (views share it), and the storages are held for the whole count, so identity is a key
        return ("meta", id(storage)), storage
    return (str(tensor.device), storage.data_ptr()), storage


def _count_pass(model: MVAR, batch: int, scales: tuple[int, ...], checkpointing: int, track_blocks: bool) -> _PassTally:
    # parameters and buffers are model state, not activations
    tally = _SavedStorages((*model.parameters(), *model.buffers()), len(model.blocks) if track_blocks else 0)
    handles = []
    if track_blocks:
        for index, block in enumerate(model.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: tally.enter_block(index, args, kwargs), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda module, args, output: tally.leave_block()))
    model.set_activation_checkpointing(checkpointing)
    try:
        with _counting(tally):
            loss = _training_loss(model, batch, scales)
        del loss  # frees the graph; the tally still holds the storages it counted
    finally:
        for handle in handles:
            handle.remove()
        model.set_activation_checkpointing(0)
    total = sum(storage.nbytes() for storage in tally.storages.values())
    return _PassTally(tally.storages, total, tally.saved_tensors, [sum(b.values()) for b in tally.per_block])


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _training_loss(model: MVAR, batch: int, scales: tuple[int, ...]) -> torch.Tensor:
    """One pass as ``train_step`` runs it: teacher input in the parameters' dtype, per-sample
    noise (label drop, drop-path), logits of ``scales``, the 1/L-weighted cross-entropy."""
    config, layout = model.config, model.layout
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    codes = torch.zeros(batch, layout.num_tokens, dtype=torch.long, device=device)
    teacher = torch.zeros(batch, layout.num_tokens - layout.scale_len(0), config.z_channels, dtype=dtype, device=device)
    # float32 uniforms as sample_uniforms draws them; their values change no saved shape
    noise = torch.full((batch, 1 + 2 * config.depth), 0.5, device=device)
    logits = model(labels, teacher, scales, noise)
    return token_loss(logits, model.targets_for(codes, scales), layout.num_tokens, label_smoothing=0.0)


class _FlashAttentionOnMeta(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors as CPU dispatches it: the mask converted
    to the query's dtype, then the flash kernel (whose autograd node saves what a real run's does).
    Meta has no kernel choice of its own and would take the math path."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_as_on_cpu(func, *args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_as_on_cpu(
    func: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> torch.Tensor:
    flash = (
        query.is_meta and not enable_gqa and query.dim() == key.dim() == value.dim() == 4
        and query.dtype in _FLASH_DTYPES and query.dtype == key.dtype == value.dtype
        and all(t.stride(-1) == 1 for t in (query, key, value)) and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and min(query.shape[2], key.shape[2]) > 0
    )
    # real tensors keep their device's own kernel choice; on meta, the math path is what CPU
    # takes too when its flash kernel does not apply
    if not flash:
        return func(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # aten's convert_boolean_attn_mask: -inf where masked, 0 elsewhere, in the query's dtype
        zero = torch.scalar_tensor(0.0, dtype=query.dtype, device=attn_mask.device)
        attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), zero)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
