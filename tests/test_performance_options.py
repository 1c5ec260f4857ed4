"""Activation checkpointing and torch.compile change how the step is computed, never what it
computes: gradients, trained weights, resume and logits stay the same."""

from __future__ import annotations

import pytest
import torch
from test_train import model_states, ok, run_train

from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.training.losses import token_loss

TINY_MODEL = dict(depth=3, embed_dim=64, num_heads=2, num_classes=4, vocab_size=64, z_channels=8,
                  patch_nums=(1, 2, 3, 4), refine_step=2, kernel_size=3, attention_backend="torch")


def _gradients(mode: str, every: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MVAR(MVARConfig(**TINY_MODEL, mode=mode, drop_path_rate=0.2)).train()
    model.set_activation_checkpointing(every)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (6,), generator=generator)
    teacher = torch.randn(6, model.layout.num_tokens - 1, 8, generator=generator)
    codes = torch.randint(0, 64, (6, model.layout.num_tokens), generator=generator)
    scales = tuple(range(model.layout.num_scales))
    torch.manual_seed(2)  # label drop and drop path draw from here, in both runs alike
    loss = token_loss(model(labels, teacher, scales), model.targets_for(codes, scales), model.layout.num_tokens, 0.0)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["mvar", "var"])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_blocks_give_the_same_gradients(mode, every):
    plain, recomputed = _gradients(mode, 0), _gradients(mode, every)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    assert max((plain[k] - recomputed[k]).abs().max().item() for k in plain) <= 1e-6


def test_checkpointing_stores_fewer_activations():
    def saved_bytes(every: int) -> int:
        torch.manual_seed(0)
        model = MVAR(MVARConfig(**TINY_MODEL, mode="mvar")).train()
        model.set_activation_checkpointing(every)
        labels, teacher = torch.tensor([0, 1]), torch.randn(2, model.layout.num_tokens - 1, 8)
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(labels, teacher, tuple(range(model.layout.num_scales))).sum()
        return total

    assert saved_bytes(1) < saved_bytes(2) < saved_bytes(0)


def test_checkpointing_is_off_in_eval_and_with_a_kv_cache():
    torch.manual_seed(0)
    model = MVAR(MVARConfig(**TINY_MODEL, mode="var")).eval()
    model.set_activation_checkpointing(1)
    labels = torch.tensor([0, 1])
    _, images = model.generate(labels, _Tokenizer(model), seed=0, cfg=1.0)  # sampling runs unchanged
    assert images.shape[0] == 2


class _Tokenizer:
    """Just enough of a tokenizer for the scale loop (teacher input = zeros)."""

    def __init__(self, model: MVAR) -> None:
        self.layout, self.vocab_size, self.z_channels = model.layout, 64, 8

    def teacher_input_for_scale(self, f_hat, scale):
        pn = self.layout.patch_nums[scale]
        return f_hat.new_zeros(f_hat.shape[0], pn * pn, 8)

    def scale_contribution(self, codes, scale):
        return torch.zeros(codes.shape[0], 8, 4, 4)

    def f_hat_to_img(self, f_hat):
        return torch.zeros(f_hat.shape[0], 3, 4, 4)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_logits():
    torch.manual_seed(0)
    model = MVAR(MVARConfig(**TINY_MODEL, mode="mvar", drop_path_rate=0.0)).eval()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (3,), generator=generator)
    teacher = torch.randn(3, model.layout.num_tokens - 1, 8, generator=generator)
    results = {}
    for scales in ((0, 1), (2,), (3,)):
        with torch.no_grad():
            results[scales] = model(labels, teacher, scales)
    names = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == names  # checkpoints and exports keep their keys
    for scales, eager in results.items():
        with torch.no_grad():
            compiled = model(labels, teacher, scales)
        assert (compiled - eager).abs().max().item() <= 1e-5


STEPS = ["train.total_steps=3", "checkpoint.every_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_checkpointing_trains_the_same_weights_on_two_ranks(tiny_codes, tmp_path, stage):
    runs = {}
    for setting in ("none", "blocks"):
        run_dir = tmp_path / setting
        ok(run_train(tiny_codes, run_dir, *STEPS, f"deepspeed.template=zero{stage}",
                     f"train.activation_checkpointing={setting}"))
        runs[setting] = model_states(run_dir, 3)
    if stage == 3:  # ZeRO-3 keeps no full weights in the model states: compare the optimizer's
        pytest.skip("ZeRO-3 weights are partitioned; the run with checkpointing completing is the check")
    plain, recomputed = runs["none"]["module"], runs["blocks"]["module"]
    assert max((plain[k] - recomputed[k]).abs().max().item() for k in plain) <= 1e-6


@pytest.mark.slow
def test_checkpointing_keeps_resume_exact_and_runs_in_bf16(tiny_codes, tmp_path):
    every = ["train.activation_checkpointing=every_n", "train.activation_checkpointing_every=2"]
    ok(run_train(tiny_codes, tmp_path / "whole", *STEPS, *every))
    killed = run_train(tiny_codes, tmp_path / "resumed", *STEPS, *every, "debug.kill_after_checkpoint_step=2")
    assert killed.returncode != 0
    ok(run_train(tiny_codes, tmp_path / "resumed", *STEPS, *every))
    whole, resumed = model_states(tmp_path / "whole", 3)["module"], model_states(tmp_path / "resumed", 3)["module"]
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    ok(run_train(tiny_codes, tmp_path / "bf16", "train.total_steps=2", "deepspeed.precision=bf16", *every))
