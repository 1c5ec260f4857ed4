"""MVAR / VAR transformer: released names and shapes, loading, masks, numerics against a naive reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.scales import ScaleLayout

REFERENCE = Path(__file__).parent / "data" / "mvar_d16_keys.json"  # copy of shared/reference
IGNORED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
SMALL = dict(
    depth=2, embed_dim=64, num_heads=2, vocab_size=48, z_channels=8, num_classes=10,
    patch_nums=(1, 2, 3, 4, 6, 8), refine_step=4, kernel_size=3, drop_path_rate=0.0,
)


def released_reference() -> dict:
    return json.loads(REFERENCE.read_text())


@torch.no_grad()
def randomize(model: MVAR, seed: int = 0) -> MVAR:
    """Weights of order one everywhere: the released init nearly closes every residual branch
    (gamma ~ 1e-5), which would hide attention-mask errors below any tolerance."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("scale_mul_1H11"):
            param.copy_(math.log(4.0) + 0.3 * noise)
        elif param.dim() == 2 and "emb" not in name and "pos" not in name:
            param.copy_(noise / math.sqrt(param.shape[1]))
        else:
            param.copy_(0.5 * noise)
    return model


def small_model(seed: int = 0, **overrides) -> MVAR:
    torch.manual_seed(seed)
    return randomize(MVAR(MVARConfig(**{**SMALL, **overrides})), seed).eval()


def inputs(model: MVAR, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layout = model.layout
    teacher = torch.randn(batch, layout.num_tokens - 1, model.config.z_channels, generator=gen)
    label = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return label, teacher


# ----- naive full-sequence reference: its own math, the module's weights, an explicit L x L mask -----

def naive_mask(layout: ScaleLayout, mode: str, kernel_size: int, refine_step: int) -> torch.Tensor:
    n = layout.num_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    for s, (begin, end) in enumerate(layout.begin_ends):
        if mode == "var":
            mask[begin:end, :end] = True
            continue
        pn = layout.patch_nums[s]
        if s < refine_step:
            mask[begin:end, begin:end] = True
            continue
        for row in range(pn):
            for col in range(pn):
                top = min(max(row - kernel_size // 2, 0), pn - kernel_size)
                left = min(max(col - kernel_size // 2, 0), pn - kernel_size)
                for r in range(top, top + kernel_size):
                    for c in range(left, left + kernel_size):
                        mask[begin + row * pn + col, begin + r * pn + c] = True
    return mask


def naive_logits(model: MVAR, label: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cfg, layout = model.config, model.layout
    dim, heads, eps = cfg.embed_dim, cfg.num_heads, cfg.norm_eps
    head_dim = dim // heads

    def layer_norm(x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def split_heads(t):
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    cond = model.class_emb.weight[label]
    start = cond[:, None] + model.pos_start
    words = teacher @ model.word_embed.weight.T + model.word_embed.bias
    x = torch.cat([start, words], dim=1)
    x = x + model.lvl_embed.weight[layout.scale_ids] + model.pos_1LC
    silu_cond = cond * torch.sigmoid(cond)
    for block in model.blocks:
        ada = silu_cond @ block.ada_lin[1].weight.T + block.ada_lin[1].bias
        g1, g2, s1, s2, b1, b2 = [a[:, None] for a in ada.split(dim, dim=-1)]
        h = layer_norm(x) * (1 + s1) + b1
        attn = block.attn
        qkv = h @ attn.mat_qkv.weight.T
        q = split_heads(qkv[..., :dim] + attn.q_bias)
        k = split_heads(qkv[..., dim : 2 * dim])
        v = split_heads(qkv[..., 2 * dim :] + attn.v_bias)
        q = q / q.norm(dim=-1, keepdim=True) * torch.exp(torch.clamp(attn.scale_mul_1H11, max=math.log(100)))
        k = k / k.norm(dim=-1, keepdim=True)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + g1 * (out @ attn.proj.weight.T + attn.proj.bias)
        h = layer_norm(x) * (1 + s2) + b2
        ffn = gelu_tanh(h @ block.ffn.fc1.weight.T + block.ffn.fc1.bias) @ block.ffn.fc2.weight.T + block.ffn.fc2.bias
        x = x + g2 * ffn
    ada = silu_cond @ model.head_nm.ada_lin[1].weight.T + model.head_nm.ada_lin[1].bias
    scale, shift = [a[:, None] for a in ada.split(dim, dim=-1)]
    return (layer_norm(x) * (1 + scale) + shift) @ model.head.weight.T + model.head.bias


def assert_matches_naive(model: MVAR, scale_groups: list[tuple[int, ...]]) -> None:
    cfg = model.config
    label, teacher = inputs(model)
    mask = naive_mask(model.layout, cfg.mode, cfg.kernel_size, cfg.refine_step)
    with torch.no_grad():
        reference = naive_logits(model, label, teacher, mask)
        for scales in scale_groups:
            got = model(label, teacher, scales)
            want = reference[:, model.layout.token_index(scales)]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"scales {scales}")


def test_mvar_subsets_match_naive_full_sequence():
    model = small_model()
    assert_matches_naive(model, [tuple(range(4)), (4,), (5,), (0, 2, 5), tuple(range(6))])


def test_var_prefixes_match_naive_block_causal():
    model = small_model(mode="var")
    assert_matches_naive(model, [tuple(range(6)), tuple(range(3)), (0,)])


def test_default_layout_matches_naive_at_small_width():
    model = small_model(depth=1, embed_dim=32, num_heads=2, vocab_size=16, z_channels=4,
                        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), refine_step=8, kernel_size=7)
    assert_matches_naive(model, [tuple(range(8)), (8,), (9,)])


def test_masks_matter_at_test_scale():
    """The naive comparison is only meaningful if the two masks give clearly different logits."""
    mvar = small_model()
    var = small_model(mode="var")
    var.load_state_dict(mvar.state_dict())
    label, teacher = inputs(mvar)
    with torch.no_grad():
        gap = (mvar(label, teacher, range(6)) - var(label, teacher, range(6)))[:, 1:].abs().max()
    assert gap > 1e-2


# ----- Markov property and locality -----

def test_markov_scale_ignores_other_scales_but_var_does_not():
    mvar = small_model()
    var = small_model(mode="var")
    var.load_state_dict(mvar.state_dict())
    label, teacher = inputs(mvar)
    changed = teacher.clone()
    layout = mvar.layout
    begin, end = layout.begin_ends[3]
    keep = slice(begin - 1, end - 1)  # scale 3's teacher tokens
    changed[:, : keep.start] += 1.0
    changed[:, keep.stop :] -= 1.0
    with torch.no_grad():
        for scales in [(3,), (0, 1, 2, 3), tuple(range(6))]:
            pick = [i for i, p in enumerate(layout.token_index(scales).tolist()) if begin <= p < end]
            torch.testing.assert_close(mvar(label, teacher, scales)[:, pick], mvar(label, changed, scales)[:, pick])
        full = layout.token_index(range(4))
        pick = [i for i, p in enumerate(full.tolist()) if begin <= p < end]
        gap = (var(label, teacher, range(4))[:, pick] - var(label, changed, range(4))[:, pick]).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize("layout_kw", [
    dict(),
    dict(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), refine_step=8, kernel_size=7, embed_dim=32),
])
def test_neighbourhood_locality_of_gradients(layout_kw):
    model = small_model(depth=1, **layout_kw)  # one block: the receptive field is exactly one window
    layout, k = model.layout, model.config.kernel_size
    last = layout.num_scales - 1
    pn = layout.patch_nums[last]
    begin, end = layout.begin_ends[last]
    label, teacher = inputs(model, batch=1)
    teacher.requires_grad_(True)
    row, col = pn - 1, 2  # a border query: its window is shifted inward
    model(label, teacher, [last])[0, row * pn + col].sum().backward()
    grad = teacher.grad[0].abs().sum(-1)
    top, left = min(max(row - k // 2, 0), pn - k), min(max(col - k // 2, 0), pn - k)
    window = torch.zeros(pn, pn, dtype=torch.bool)
    window[top : top + k, left : left + k] = True
    inside = grad[begin - 1 : end - 1].view(pn, pn)
    assert torch.all(grad[: begin - 1] == 0)
    assert torch.all(inside[~window] == 0)
    assert torch.all(inside[window] > 0)


# ----- released names, shapes, loading, init -----

def test_d16_names_and_shapes_match_release():
    ref = released_reference()
    with torch.device("meta"):
        model = MVAR(MVARConfig(depth=16))
    expected = {k: v for k, v in ref["state_dict"].items()
                if k not in IGNORED_BUFFERS and not k.endswith("zero_k_bias")}
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert len(list(model.buffers())) == 0


def test_strict_load_of_released_key_set_on_meta_d16():
    ref = released_reference()
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {k: torch.empty(shape, dtype=dtypes[ref["dtypes"][k]], device="meta")
             for k, shape in ref["state_dict"].items()}
    with torch.device("meta"):
        model = MVAR(MVARConfig(depth=16))
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    missing = dict(state)
    missing.pop("head.bias")
    with pytest.raises(RuntimeError, match="head.bias"):
        model.load_state_dict(missing, strict=True, assign=True)


def released_style_state(model: MVAR, mode: str) -> dict[str, torch.Tensor]:
    """The model's state dict with the derived buffers the released files carry, in their order."""
    layout, dim = model.layout, model.config.embed_dim
    ids = layout.scale_ids
    if mode == "var":
        allowed = ids[:, None] >= ids[None, :]
    else:
        allowed = ids[:, None] == ids[None, :]
    bias = torch.where(allowed, 0.0, float("-inf"))[None, None]
    state = {}
    for key, value in model.state_dict().items():
        if key == "word_embed.weight":
            state["lvl_1L"] = ids[None].clone()
            state["attn_bias_for_masking"] = bias
        state[key] = value.clone()
        if key.endswith("attn.v_bias"):
            state[key.replace("v_bias", "zero_k_bias")] = torch.zeros(dim)
    return state


@pytest.mark.parametrize("checkpoint_mode", ["var", "mvar"])
def test_strict_load_of_released_style_checkpoint(checkpoint_mode):
    source = small_model(seed=3)
    state = released_style_state(source, checkpoint_mode)
    target = MVAR(MVARConfig(**SMALL)).eval()
    target.load_state_dict(state, strict=True)
    label, teacher = inputs(source)
    with torch.no_grad():
        torch.testing.assert_close(target(label, teacher, range(6)), source(label, teacher, range(6)), rtol=0, atol=0)
    assert not any(name.endswith(IGNORED_BUFFERS + ("zero_k_bias",)) for name, _ in target.named_buffers())
    with pytest.raises(RuntimeError, match="not_a_key"):
        target.load_state_dict({**state, "not_a_key": torch.zeros(1)}, strict=True)


def test_released_initialisation():
    torch.manual_seed(0)
    cfg = MVARConfig(depth=4, embed_dim=256, num_heads=4, vocab_size=512, z_channels=8)
    model = MVAR(cfg)
    dim, std = 256, math.sqrt(1 / (3 * 256))
    assert abs(model.word_embed.weight.std().item() / std - 1) < 0.1
    assert abs(model.pos_1LC.std().item() / std - 1) < 0.05
    assert abs(model.head.weight.std().item() / (0.02 * std) - 1) < 0.05
    assert abs(model.head_nm.ada_lin[1].weight.std().item() / (0.5 * std) - 1) < 0.05
    for block in model.blocks:
        ada = block.ada_lin[1].weight
        assert abs(ada[: 2 * dim].std().item() / (1e-5 * std) - 1) < 0.05
        assert abs(ada[2 * dim :].std().item() / (0.5 * std) - 1) < 0.05
        assert abs(block.attn.proj.weight.std().item() / (std / math.sqrt(8)) - 1) < 0.05
        assert abs(block.ffn.fc2.weight.std().item() / (std / math.sqrt(8)) - 1) < 0.05
        torch.testing.assert_close(block.attn.scale_mul_1H11, torch.full((1, 4, 1, 1), math.log(4)))
        assert block.ada_lin[1].bias.abs().sum() == 0 and block.attn.q_bias.abs().sum() == 0


# ----- config -----

def test_config_derives_and_round_trips():
    cfg = MVARConfig(depth=20)
    assert (cfg.embed_dim, cfg.num_heads) == (1280, 20)
    assert cfg.drop_path_rate == pytest.approx(0.1 * 20 / 24)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert MVARConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="bogus"):
        MVARConfig.from_dict({**data, "bogus": 1})


@pytest.mark.parametrize("bad, match", [
    (dict(embed_dim=100, num_heads=3), "divisible"),
    (dict(kernel_size=4), "odd"),
    (dict(kernel_size=15), "larger than the smallest"),
    (dict(refine_step=11), "refine_step"),
    (dict(mode="causal"), "mode"),
    (dict(patch_nums=(1, 3, 2)), "increasing"),
    (dict(attention_backend="cuda"), "attention_backend"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        MVARConfig(depth=2, **bad)


# ----- forward contract -----

def test_label_dropping_only_in_training():
    model = small_model(cond_drop_rate=0.5)
    label, teacher = inputs(model, batch=32)
    with torch.no_grad():
        conditional = model(label, teacher, [2])
        unconditional = model(torch.full_like(label, model.num_classes), teacher, [2])
        torch.manual_seed(0)
        torch.testing.assert_close(model(label, teacher, [2]), conditional)  # eval: never dropped
        model.train()
        trained = model(label, teacher, [2])
    was_dropped = (trained - unconditional).flatten(1).abs().amax(1) < 1e-5
    kept = (trained - conditional).flatten(1).abs().amax(1) < 1e-5
    assert torch.all(was_dropped ^ kept)
    assert 0 < was_dropped.sum() < 32


def test_drop_path_only_in_training():
    model = small_model(drop_path_rate=0.5, cond_drop_rate=0.0)
    label, teacher = inputs(model, batch=8)
    with torch.no_grad():
        first, second = model(label, teacher, [3]), model(label, teacher, [3])
        torch.testing.assert_close(first, second)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(label, teacher, [3]), model(label, teacher, [3]))


def test_var_rejects_non_prefix_scales():
    model = small_model(mode="var")
    label, teacher = inputs(model)
    with pytest.raises(ValueError, match="prefix"):
        model(label, teacher, [1, 2])
    with pytest.raises(ValueError, match="prefix"):
        model(label, teacher, [5])


def test_bad_inputs_get_clear_errors():
    model = small_model()
    label, teacher = inputs(model)
    with pytest.raises(ValueError, match="teacher_input"):
        model(label, teacher[:, :-1], [1])
    with pytest.raises(ValueError, match="labels must be in"):
        model(torch.tensor([0, 11]), teacher, [1])
    with pytest.raises(ValueError, match="labels must be in"):
        model(torch.tensor([-1, 0]), teacher, [1])
    with pytest.raises(ValueError, match="out of range"):
        model(label, teacher, [6])
    with pytest.raises(ValueError, match="integer"):
        model(label.float(), teacher, [1])


def test_targets_follow_forward_token_order():
    model = small_model()
    codes = torch.arange(model.layout.num_tokens).repeat(2, 1)
    targets = model.targets_for(codes, [4, 1])
    assert targets.shape == (2, 4 + 36)
    assert targets[0].tolist() == list(range(1, 5)) + list(range(30, 66))
