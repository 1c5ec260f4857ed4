"""Exact activation accounting (mvar_dist.memory): the meta-device count is a real pass's count.

A tiny model's training pass is counted on the meta device and on CPU for VAR, MVAR over all
scales, an MVAR scale group and a neighbourhood-attention scale, with and without activation
checkpointing, fp32 and bf16. fp32 must agree exactly; bf16 differs by exactly the layer-norm
statistics CPU keeps in bf16 where CUDA (and meta) keep fp32. The storage rule itself (a
storage counted once however many saved tensors share it, whole storages for views,
parameters excluded) is checked on a function whose saved bytes are known by hand, on both
devices, so a meta key that failed to see sharing would fail here and not only differ from CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvar_dist.config import load_config
from mvar_dist.memory import (
    activation_bytes,
    activation_peak_bytes,
    count_activations,
    count_saved,
    paper_model_config,
    pass_groups,
)
from mvar_dist.model import MVARConfig
from mvar_dist.training.schedule import step_groups

ROOT = Path(__file__).resolve().parents[1]
BATCH = 3
# patch_nums (1, 2, 3, 4, 6, 8): scales 4 (6x6) and 5 (8x8) use 3x3 neighbourhood attention
TINY = dict(depth=3, embed_dim=32, num_heads=2, vocab_size=64, z_channels=8, num_classes=10,
            patch_nums=(1, 2, 3, 4, 6, 8), refine_step=4, kernel_size=3)
CASES = [("var", None), ("mvar", None), ("mvar", (0, 1, 2, 3)), ("mvar", (5,))]


def tiny(mode: str, backend: str = "torch") -> MVARConfig:
    return MVARConfig(mode=mode, attention_backend=backend, **TINY)  # type: ignore[arg-type]


def pass_tokens(config: MVARConfig, scales: tuple[int, ...] | None) -> int:
    chosen = range(len(config.patch_nums)) if scales is None else scales
    return sum(config.layout.scale_len(s) for s in chosen)


def layer_norm_difference(config: MVARConfig, scales: tuple[int, ...] | None, checkpointing: int) -> tuple[int, int]:
    """(kept, recompute) bytes a bf16 meta count has over a bf16 CPU count: each layer norm whose
    statistics are kept holds mean and rstd, one value per token, in fp32 (CUDA, meta) instead of
    bf16 (CPU). Two layer norms per block, one before the head; checkpointed blocks keep none."""
    per_norm = 2 * BATCH * pass_tokens(config, scales) * (4 - 2)
    checkpointed = len(range(0, config.depth, checkpointing)) if checkpointing else 0
    kept_norms = 2 * (config.depth - checkpointed) + 1
    return kept_norms * per_norm, (2 * per_norm if checkpointing else 0)


@pytest.mark.parametrize("checkpointing", [0, 1, 2])
@pytest.mark.parametrize("mode, scales", CASES)
def test_meta_count_equals_a_real_cpu_pass_fp32(mode, scales, checkpointing):
    config = tiny(mode)
    on_cpu = count_activations(config, BATCH, dtype=torch.float32, checkpointing=checkpointing, scales=scales, device="cpu")
    on_meta = count_activations(config, BATCH, dtype=torch.float32, checkpointing=checkpointing, scales=scales)
    assert on_meta == on_cpu
    assert on_cpu.kept_bytes > 0 and (on_cpu.recompute_bytes > 0) == (checkpointing > 0)


@pytest.mark.parametrize("checkpointing", [0, 1])
@pytest.mark.parametrize("mode, scales", CASES)
def test_meta_count_equals_a_real_cpu_pass_bf16(mode, scales, checkpointing):
    config = tiny(mode)
    on_cpu = count_activations(config, BATCH, dtype=torch.bfloat16, checkpointing=checkpointing, scales=scales, device="cpu")
    on_meta = count_activations(config, BATCH, dtype=torch.bfloat16, checkpointing=checkpointing, scales=scales)
    kept, recompute = layer_norm_difference(config, scales, checkpointing)
    assert on_meta.kept_bytes == on_cpu.kept_bytes + kept
    assert on_meta.recompute_bytes == on_cpu.recompute_bytes + recompute
    assert (on_meta.saved_tensors, on_meta.storages) == (on_cpu.saved_tensors, on_cpu.storages)
    # bf16 activations are about half the fp32 ones: the dtype really reaches the saved tensors
    fp32 = count_activations(config, BATCH, dtype=torch.float32, checkpointing=checkpointing, scales=scales)
    assert 0.4 < on_meta.kept_bytes / fp32.kept_bytes < 0.75


def test_windowed_neighbourhood_path_counts_the_same_on_meta(monkeypatch):
    """Above a score budget the torch path switches to the windowed autograd.Function."""
    from mvar_dist.kernels import reference

    monkeypatch.setattr(reference, "DENSE_SCORE_BUDGET", 0)
    for checkpointing in (0, 1):
        on_cpu = count_activations(tiny("mvar"), BATCH, dtype=torch.float32, checkpointing=checkpointing,
                                   scales=(4, 5), device="cpu")
        assert count_activations(tiny("mvar"), BATCH, dtype=torch.float32, checkpointing=checkpointing,
                                 scales=(4, 5)) == on_cpu
    monkeypatch.undo()
    # the budget really switched paths: the masked path also keeps each scale's (n, n) mask
    masked = count_activations(tiny("mvar"), BATCH, dtype=torch.float32, checkpointing=1, scales=(4, 5))
    assert masked.kept_bytes == on_cpu.kept_bytes and masked.recompute_bytes > on_cpu.recompute_bytes


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_shared_storage_counted_once_views_whole_parameters_excluded(device):
    x = torch.randn(4, 8, device=device, requires_grad=True)  # 128 bytes

    def forward() -> torch.Tensor:
        y = x.sin()  # saves x
        z = y * y  # saves y twice: one storage, 128 bytes
        w = y[1:].exp()  # saves its own output: 3 x 8 x 4 = 96 bytes
        v = y[:2].cos()  # saves a view of y: y's storage again, nothing new
        return z.sum() + w.sum() + v.sum()

    assert count_saved(forward) == 128 + 128 + 96  # counted per saved tensor it would be 608
    assert count_saved(forward, exclude=[x]) == 128 + 96  # x as a parameter
    assert count_saved(forward, exclude=[x[1:]]) == 128 + 96  # a view excludes its whole storage


def test_checkpointing_strictly_reduces_what_is_kept():
    for mode, scales in CASES:
        config = tiny(mode)
        plain, every_2nd, every = (count_activations(config, BATCH, dtype=torch.float32, checkpointing=n, scales=scales)
                                   for n in (0, 2, 1))
        assert every.kept_bytes < every_2nd.kept_bytes < plain.kept_bytes
        assert every.peak_bytes < plain.peak_bytes == plain.kept_bytes
    # and at the paper's d16 shape, on meta, the public functions
    d16 = paper_model_config(16)
    plain = activation_bytes(d16, 32, scales=(9,))
    assert activation_bytes(d16, 32, scales=(9,), checkpointing=1) < activation_peak_bytes(d16, 32, scales=(9,),
                                                                                           checkpointing=1) < plain
    assert activation_peak_bytes(d16, 32, scales=(9,)) == plain


def test_counting_is_deterministic():
    counts = {count_activations(tiny("mvar"), BATCH, dtype=torch.bfloat16, checkpointing=1, scales=(4, 5))
              for _ in range(3)}
    assert len(counts) == 1
    code = ("import torch; from mvar_dist.memory import paper_model_config, activation_bytes; "
            "print(activation_bytes(paper_model_config(16, 'var'), 2), activation_bytes(paper_model_config(16), 2, scales=(9,)))")
    fresh = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert fresh[0] == fresh[1]
    assert fresh[0].split() == [str(activation_bytes(paper_model_config(16, "var"), 2)),
                                str(activation_bytes(paper_model_config(16), 2, scales=(9,)))]


def test_paper_shapes_count_in_seconds_and_var_keeps_more_than_an_mvar_pass():
    start = time.perf_counter()
    var = activation_bytes(paper_model_config(24, "var"), 32)
    largest_group = max(activation_bytes(paper_model_config(24), 32, scales=group) for group in pass_groups(paper_model_config(24)))
    assert time.perf_counter() - start < 30
    # a step's passes hold at most 256 of the 680 tokens: about 680/256 less, the head included
    assert 2.3 < var / largest_group < 2.8


@pytest.mark.parametrize("name, depth, mode", [("mvar_d16", 16, "mvar"), ("mvar_d20", 20, "mvar"),
                                               ("mvar_d24", 24, "mvar"), ("var_d16", 16, "var")])
def test_paper_model_config_is_the_published_model_section(name, depth, mode):
    assert load_config(ROOT / "configs" / f"{name}.yaml").model == paper_model_config(depth, mode)


@pytest.mark.parametrize("schedule", ["all", "paper"])
def test_pass_groups_are_the_groups_the_trainer_runs(schedule):
    config = load_config(ROOT / "configs" / "mvar_d16.yaml", [f"train.schedule={schedule}"])
    period = config.train.ratio_k + len(config.model.patch_nums) - config.model.refine_step
    run = {group for step in range(1, period + 1) for group in step_groups(config, step)}
    assert run == set(pass_groups(config.model)) == {tuple(range(8)), (8,), (9,)}
    var = load_config(ROOT / "configs" / "var_d16.yaml")
    assert pass_groups(var.model) == step_groups(var, 1) == [tuple(range(10))]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        activation_bytes(tiny("mvar"), 0)
    with pytest.raises(ValueError, match="checkpointing"):
        activation_bytes(tiny("mvar"), 1, checkpointing=-1)
    with pytest.raises(ValueError, match="attention_backend"):
        activation_bytes(tiny("mvar"), 1, attention_backend="natten")
    with pytest.raises(ValueError, match="prefix"):
        activation_bytes(tiny("var"), 1, scales=(2,))


_FUSED_ON_CPU = """
import dataclasses, json, sys, torch
from mvar_dist.memory import count_activations
from mvar_dist.model import MVARConfig
config = MVARConfig(mode="mvar", attention_backend="triton", **json.loads(sys.argv[1]))
print(json.dumps([dataclasses.asdict(count_activations(config, 3, dtype=torch.float32, checkpointing=n, device="cpu"))
                  for n in (0, 1)]))
"""


@pytest.mark.interpreter
def test_fused_kernel_counted_on_meta_equals_the_interpreted_kernel_on_cpu():
    """The fused kernel's autograd.Function on meta (launches skipped) saves what it saves when
    the kernel really runs (here in Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", _FUSED_ON_CPU, json.dumps(TINY)], capture_output=True, text=True,
                            check=False, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    on_cpu = json.loads(result.stdout)
    on_meta = [dataclasses.asdict(count_activations(tiny("mvar", "triton"), 3, dtype=torch.float32, checkpointing=n))
               for n in (0, 1)]
    assert on_meta == on_cpu
    torch_path = count_activations(tiny("mvar", "torch"), 3, dtype=torch.float32)
    assert torch_path.kept_bytes != on_meta[0]["kept_bytes"]  # the two paths really differ
