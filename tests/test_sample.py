"""Sampling: top-k / top-p filtering, the CFG schedule, and the scale-by-scale generate loop."""

from __future__ import annotations

import pytest
import torch

from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.model.generate import filter_logits, guidance_weight, sample_codes
from mvar_dist.tokenizer import MultiScaleVQVAE

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
SMALL = dict(
    depth=2, embed_dim=64, num_heads=2, vocab_size=48, z_channels=8, num_classes=10,
    patch_nums=PATCH_NUMS, refine_step=4, kernel_size=3, drop_path_rate=0.0,
)


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


# ----- filtering on hand-made logits -----

def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.0, 1.0])
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=1)) == [1]
    assert kept(filter_logits(logits, top_k=0)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_k=1200)) == [0, 1, 2, 3, 4]  # larger than vocab: clamped
    assert kept(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=2)) == [1, 2]
    torch.testing.assert_close(filter_logits(logits, top_k=2)[[1, 3]], logits[[1, 3]])


@pytest.mark.parametrize("top_p, expected", [
    (0.1, [0]),          # the most likely token is always kept
    (0.45, [0]),
    (0.75, [0, 1]),      # 0.5 + 0.3 = 0.8 is the smallest mass reaching 0.75
    (0.85, [0, 1, 2]),   # 0.95
    (0.97, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),
    (0.0, [0, 1, 2, 3]),  # disabled
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    shuffled = torch.tensor([2, 0, 3, 1])  # order must not matter
    got = kept(filter_logits(logits[shuffled], top_p=top_p))
    assert sorted(shuffled[got].tolist()) == expected


def test_top_k_is_applied_before_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # after top-3 the probabilities are 4/9, 3/9, 2/9: reaching 0.7 needs the first two only
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [0, 1]
    # without top-k, 0.4 + 0.3 = 0.7 falls short of 0.75: three tokens are needed
    assert kept(filter_logits(logits, top_p=0.75)) == [0, 1, 2]


def test_filter_rejects_bad_top_p():
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(3), top_p=1.5)


def test_sample_codes_is_seeded_and_respects_the_filter():
    logits = torch.randn(2, 50, 16)
    draw = lambda seed: sample_codes(logits, 4, 0.0, torch.Generator().manual_seed(seed))
    torch.manual_seed(123)
    first = draw(7)
    torch.manual_seed(456)  # the global RNG must not matter
    torch.testing.assert_close(draw(7), first)
    assert not torch.equal(draw(8), first)
    allowed = logits.topk(4, dim=-1).indices
    assert torch.all((allowed == first[..., None]).any(-1))


def test_guidance_schedule():
    assert guidance_weight(2.7, 0, 10) == 0.0
    assert guidance_weight(2.7, 9, 10) == pytest.approx(2.7)
    assert guidance_weight(2.0, 3, 7) == pytest.approx(1.0)


# ----- the generate loop with a tiny tokenizer -----

@pytest.fixture(scope="module")
def tokenizer() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=48, z_channels=8, ch=32, patch_nums=PATCH_NUMS, ch_mult=(1, 1), num_res_blocks=1)


def tiny_model(mode: str = "mvar") -> MVAR:
    torch.manual_seed(1)
    model = MVAR(MVARConfig(**SMALL, mode=mode)).eval()
    with torch.no_grad():  # open the residual branches so that attention matters
        for block in model.blocks:
            block.ada_lin[1].weight.normal_(0, 0.1)
        model.head.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("mode", ["mvar", "var"])
def test_generate_is_seeded_and_shaped(tokenizer, mode):
    model = tiny_model(mode)
    labels = torch.tensor([1, 4, 10])  # 10 = the null class: unconditional
    torch.manual_seed(0)
    codes, images = model.generate(labels, tokenizer, seed=5)
    torch.manual_seed(99)
    again, images_again = model.generate(labels, tokenizer, seed=5)
    other, _ = model.generate(labels, tokenizer, seed=6)
    assert [c.shape for c in codes] == [(3, pn * pn) for pn in PATCH_NUMS]
    assert all(c.dtype == torch.long and c.min() >= 0 and c.max() < 48 for c in codes)
    assert all(torch.equal(a, b) for a, b in zip(codes, again))
    torch.testing.assert_close(images, images_again)
    assert not all(torch.equal(a, b) for a, b in zip(codes, other))
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("mode", ["mvar", "var"])
def test_greedy_generate_equals_guided_argmax_of_teacher_forced_logits(tokenizer, mode):
    """End to end: the loop's inputs, its CFG and its cache agree with the teacher-forced forward."""
    model, cfg = tiny_model(mode), 1.5
    labels = torch.tensor([2, 7])
    codes, _ = model.generate(labels, tokenizer, cfg=cfg, top_k=1, top_p=0.0, seed=0)
    teacher = tokenizer.codes_to_teacher_input(codes)
    scales = range(len(PATCH_NUMS))
    with torch.no_grad():
        conditional = model.layout.split(model(labels, teacher, scales))
        unconditional = model.layout.split(model(torch.full_like(labels, 10), teacher, scales))
    for s in scales:
        t = guidance_weight(cfg, s, len(PATCH_NUMS))
        guided = (1 + t) * conditional[s] - t * unconditional[s]
        assert torch.equal(guided.argmax(-1), codes[s]), f"scale {s}"


def record_block_inputs(model: MVAR) -> tuple[list[tuple], object]:
    calls = []

    def hook(module, args, kwargs):
        plan, cache = kwargs.get("plan"), kwargs.get("cache")
        calls.append((args[0].shape[1], None if plan is None else plan.scales,
                      None if plan is None else plan.num_tokens,
                      None if cache is None else cache.num_tokens))  # tokens cached before this call

    return calls, model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_mvar_generate_runs_each_scale_alone_without_cache(tokenizer):
    model = tiny_model("mvar").train()
    calls, handle = record_block_inputs(model)
    model.generate(torch.tensor([3, 3]), tokenizer, seed=0)
    handle.remove()
    assert model.training  # sampled in eval mode, then restored
    assert len(calls) == len(PATCH_NUMS)
    for s, (tokens, plan_scales, plan_tokens, cached) in enumerate(calls):
        assert tokens == plan_tokens == PATCH_NUMS[s] ** 2
        assert plan_scales == (s,)
        assert cached is None
    with pytest.raises(ValueError, match="only used in mode='var'"):
        model.new_kv_caches()


def test_var_generate_attends_through_a_growing_cache(tokenizer):
    model = tiny_model("var")
    calls, handle = record_block_inputs(model)
    model.generate(torch.tensor([3]), tokenizer, seed=0)
    handle.remove()
    seen = 0
    for s, (tokens, plan_scales, _, cached) in enumerate(calls):
        assert tokens == PATCH_NUMS[s] ** 2 and plan_scales is None
        assert cached == seen  # every earlier scale, nothing more
        seen += tokens


def test_kv_cache_steps_equal_block_causal_forward():
    model = tiny_model("var")
    layout = model.layout
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, layout.num_tokens - 1, 8, generator=gen)
    labels = torch.tensor([0, 5])
    with torch.no_grad():
        full = layout.split(model(labels, teacher, range(layout.num_scales)))
        cond, caches = model.class_emb(labels), model.new_kv_caches()
        for s, (begin, end) in enumerate(layout.begin_ends):
            x = model.scale_tokens(s, start=cond, teacher=teacher[:, begin - 1 : end - 1] if s else None)
            torch.testing.assert_close(model.logits(x, cond, caches=caches), full[s], atol=1e-5, rtol=1e-5)


def test_generate_rejects_mismatched_tokenizer():
    model = tiny_model()
    other = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=PATCH_NUMS, ch_mult=(1, 1), num_res_blocks=1)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(torch.tensor([1]), other)
