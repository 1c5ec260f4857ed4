"""The VAR-compatible multi-scale tokenizer: released key layout, quantisation semantics, loading."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvar_dist.tokenizer import MultiScaleVQVAE
from mvar_dist.tokenizer.nets import AttentionBlock, Downsample

KEYS_JSON = Path(__file__).parent / "data" / "var_vqvae_keys.json"  # copy of shared/reference
EMA_KEY = "quantize.ema_vocab_hit_SV"

# 5 levels downsample 16x, so the last grid of 4 means 64 px images
SMALL = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4))


def small_model(seed: int = 0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(**SMALL)
    with torch.no_grad():
        # spread the codebook like the encoder output, so that random images use many codes
        latent = model.quant_conv(model.encoder(torch.rand(2, 3, 64, 64) * 2 - 1))
        model.quantize.embedding.weight.normal_(0.0, float(latent.std()))
    return model


@pytest.fixture(scope="module")
def model() -> MultiScaleVQVAE:
    return small_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------- released key layout


def test_released_config_has_exactly_the_released_keys_and_shapes():
    reference = json.loads(KEYS_JSON.read_text())
    released = reference["state_dict"]
    with torch.device("meta"):
        full = MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4)
    ours = {k: list(v.shape) for k, v in full.state_dict().items()}
    assert list(ours) == [k for k in released if k != EMA_KEY]
    assert ours == {k: v for k, v in released.items() if k != EMA_KEY}
    assert sum(p.numel() for p in full.parameters()) == reference["num_params"]
    assert full.image_size == 256 and full.layout.num_tokens == 680

    synthetic = {k: torch.empty(shape, device="meta") for k, shape in released.items()}
    full.load_state_dict(synthetic, strict=True, assign=True)
    assert EMA_KEY in synthetic  # the caller's dict is left alone
    assert EMA_KEY not in full.state_dict()


def test_released_config_spot_checks_without_the_key_list():
    # facts of vae_ch160v4096z32.pth, so that the layout is checked even where the JSON is absent
    with torch.device("meta"):
        full = MultiScaleVQVAE()
    state = full.state_dict()
    assert len(state) == 323  # 324 released entries minus the dropped usage buffer
    assert sum(p.numel() for p in full.parameters()) == 108_948_355
    expected = {
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.4.attn.2.proj_out.bias": (640,),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.embedding.weight": (4096, 32),
        "post_quant_conv.weight": (32, 32, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "encoder.down.4.downsample.conv.weight" not in state and "decoder.up.0.upsample.conv.weight" not in state


def test_usage_statistics_buffer_is_accepted_and_dropped(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[EMA_KEY] = torch.rand(len(SMALL["patch_nums"]), SMALL["vocab_size"])
    fresh = MultiScaleVQVAE(**SMALL)
    fresh.load_state_dict(state, strict=True)
    assert EMA_KEY not in fresh.state_dict()
    assert torch.equal(fresh.quantize.embedding.weight, model.quantize.embedding.weight)


def test_tokenizer_is_frozen(model):
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- semantics vs a naive reference


def naive_area(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling written out: output cell i averages rows floor(i*n/m)..ceil((i+1)*n/m)."""
    n = x.shape[-1]
    out = x.new_zeros(*x.shape[:-2], size, size)
    for i in range(size):
        for j in range(size):
            r0, r1 = (i * n) // size, -(-((i + 1) * n) // size)
            c0, c1 = (j * n) // size, -(-((j + 1) * n) // size)
            out[..., i, j] = x[..., r0:r1, c0:c1].mean(dim=(-2, -1))
    return out


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) 1-D cubic-convolution weights (a=-0.75, half-pixel centres, edge clamp)."""
    a = -0.75

    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        source = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            weights[o, min(max(tap, 0), n_in - 1)] += kernel(source - tap)
    return weights


def naive_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    w = bicubic_matrix(x.shape[-1], size)
    return w @ x @ w.T


def naive_quantise(f: torch.Tensor, codebook: torch.Tensor, phis: list, patch_nums: tuple):
    """SEMANTICS.md section 2 in float64, one vector at a time; returns codes and teacher input."""
    f, codebook = f.double(), codebook.double()
    batch, channels, final, _ = f.shape
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    rest, f_hat = f.clone(), torch.zeros_like(f)
    codes, teacher = [], []
    for s, pn in enumerate(patch_nums):
        last = s == len(patch_nums) - 1
        z = rest if last else naive_area(rest, pn)
        idx = torch.empty(batch, pn * pn, dtype=torch.long)
        for b in range(batch):
            for p in range(pn * pn):
                vector = z[b, :, p // pn, p % pn]
                distances = [float(((vector - e) ** 2).sum()) for e in codebook]
                idx[b, p] = int(np.argmin(distances))
        codes.append(idx)
        h = codebook[idx].transpose(1, 2).reshape(batch, channels, pn, pn)
        if not last:
            h = naive_bicubic(h, final)
        conv = phis[int(np.argmin(np.abs(ticks - s / (len(patch_nums) - 1))))]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
        f_hat, rest = f_hat + h, rest - h
        if not last:
            nxt = patch_nums[s + 1]
            teacher.append(naive_area(f_hat, nxt).reshape(batch, channels, nxt * nxt).transpose(1, 2))
    return codes, torch.cat(teacher, dim=1)


def test_codes_and_teacher_input_match_naive_reference(model, images):
    with torch.no_grad():
        latent = model.quant_conv(model.encoder(images))
    ref_codes, ref_teacher = naive_quantise(
        latent, model.quantize.embedding.weight, list(model.quantize.quant_resi.qresi_ls), SMALL["patch_nums"]
    )
    codes = model.img_to_codes(images)
    assert [c.dtype for c in codes] == [torch.long] * 4
    for s, (ours, ref) in enumerate(zip(codes, ref_codes)):
        assert torch.equal(ours, ref), f"scale {s} codes differ"
    assert torch.unique(torch.cat(codes, 1)).numel() > 10  # the comparison exercised many codes
    teacher = model.codes_to_teacher_input(codes)
    assert teacher.dtype == torch.float32
    torch.testing.assert_close(teacher.double(), ref_teacher, atol=1e-5, rtol=0)


def test_naive_bicubic_agrees_with_torch():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(naive_bicubic(x, 16), F.interpolate(x, size=(16, 16), mode="bicubic"))


# ---------------------------------------------------------------- shapes, ranges, building blocks


def test_round_trip_shapes_and_ranges(model, images):
    codes = model.img_to_codes(images)
    assert [tuple(c.shape) for c in codes] == [(3, pn * pn) for pn in SMALL["patch_nums"]]
    flat = torch.cat(codes, dim=1)
    assert 0 <= int(flat.min()) and int(flat.max()) < SMALL["vocab_size"]
    teacher = model.codes_to_teacher_input(flat)
    assert teacher.shape == (3, model.layout.num_tokens - 1, SMALL["z_channels"])
    torch.testing.assert_close(teacher, model.codes_to_teacher_input(codes), rtol=0, atol=0)
    recon = model.codes_to_img(flat)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert float(recon.min()) >= -1 and float(recon.max()) <= 1
    torch.testing.assert_close(recon, model.codes_to_img(codes), rtol=0, atol=0)


def test_building_blocks_compose_to_the_whole_image_methods(model, images):
    codes = model.img_to_codes(images)
    final = model.patch_nums[-1]
    f_hat = torch.zeros(3, model.z_channels, final, final)
    pieces = []
    with torch.no_grad():
        for s in range(model.layout.num_scales):
            contribution = model.scale_contribution(codes[s], s)
            assert contribution.shape == (3, model.z_channels, final, final)
            f_hat = f_hat + contribution
            if s + 1 < model.layout.num_scales:
                piece = model.teacher_input_for_scale(f_hat, s + 1)
                assert piece.shape == (3, model.patch_nums[s + 1] ** 2, model.z_channels)
                pieces.append(piece)
        image = model.f_hat_to_img(f_hat)
    torch.testing.assert_close(torch.cat(pieces, 1), model.codes_to_teacher_input(codes))
    torch.testing.assert_close(image, model.codes_to_img(codes))
    # at the last grid the downsample is the identity
    assert torch.equal(model.teacher_input_for_scale(f_hat, model.layout.num_scales - 1), f_hat.flatten(2).mT)


def test_autocast_does_not_lower_precision(model, images):
    codes = model.img_to_codes(images)
    plain = model.codes_to_teacher_input(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [torch.equal(a, b) for a, b in zip(model.img_to_codes(images), codes)] == [True] * 4
        under_autocast = model.codes_to_teacher_input(codes)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    block = AttentionBlock(32)
    x = torch.randn(2, 32, 3, 3)
    normed = block.norm(x).flatten(2).double()
    w_qkv = block.qkv.weight.double().flatten(1)
    q, k, v = (w_qkv @ normed + block.qkv.bias.double()[:, None]).chunk(3, dim=1)
    attention = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # (B, query, key)
    mixed = v @ attention.transpose(1, 2)
    expected = x.double() + (block.proj_out.weight.double().flatten(1) @ mixed + block.proj_out.bias.double()[:, None]).view_as(x)
    torch.testing.assert_close(block(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_downsample_pads_only_right_and_bottom():
    torch.manual_seed(0)
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    out = down(x)
    assert out.shape == (1, 32, 4, 4)
    top_left = (down.conv.weight * x[0, None, :, 0:3, 0:3]).sum(dim=(1, 2, 3)) + down.conv.bias
    torch.testing.assert_close(out[0, :, 0, 0], top_left, atol=1e-5, rtol=1e-5)
    bottom_right = (down.conv.weight[:, :, :2, :2] * x[0, None, :, 6:8, 6:8]).sum(dim=(1, 2, 3)) + down.conv.bias
    torch.testing.assert_close(out[0, :, 3, 3], bottom_right, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 64, 64), (3, 64, 64), (2, 3, 64, 48)])
def test_wrong_image_shape_is_named(model, shape):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model.img_to_codes(torch.zeros(shape))


def test_integer_images_are_refused(model):
    with pytest.raises(ValueError, match="float"):
        model.img_to_codes(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_bad_codes_are_refused(model):
    good = [torch.zeros(2, pn * pn, dtype=torch.long) for pn in SMALL["patch_nums"]]
    with pytest.raises(ValueError, match="4 scales"):
        model.codes_to_img(good[:3])
    with pytest.raises(ValueError, match=r"scale 2 must have shape \(2, 9\)"):
        model.codes_to_teacher_input(good[:2] + [torch.zeros(2, 8, dtype=torch.long)] + good[3:])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.codes_to_teacher_input(good[:3] + [torch.full((2, 16), 64)])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.codes_to_img(good[:1] + [torch.full((2, 4), -1)] + good[2:])
    with pytest.raises(ValueError, match="integer"):
        model.codes_to_teacher_input([c.float() for c in good])
    with pytest.raises(ValueError, match="30 tokens"):
        model.codes_to_teacher_input(torch.zeros(2, 29, dtype=torch.long))
    with pytest.raises(ValueError, match="scale 1"):
        model.scale_contribution(torch.zeros(2, 9, dtype=torch.long), 1)


# ---------------------------------------------------------------- checkpoints and identity


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(model, images, tmp_path, suffix):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"tokenizer{suffix}"
    if suffix == ".pth":
        state[EMA_KEY] = torch.zeros(4, 64)  # as in the released file
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = MultiScaleVQVAE.from_checkpoint(path, **SMALL)
    assert loaded.identity() == model.identity()
    for ours, theirs in zip(loaded.img_to_codes(images), model.img_to_codes(images)):
        assert torch.equal(ours, theirs)


def test_checkpoint_errors_name_the_key_and_shapes(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["quant_conv.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*1 missing key\(s\), first 'quant_conv\.bias'"):
        MultiScaleVQVAE.from_checkpoint(tmp_path / "missing.pth", **SMALL)

    torch.save({**state, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected key\(s\), first 'decoder\.extra\.weight'"):
        MultiScaleVQVAE.from_checkpoint(tmp_path / "extra.pth", **SMALL)

    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"'quantize\.embedding\.weight': \(64, 8\) in the checkpoint, \(32, 8\) in the model"):
        MultiScaleVQVAE.from_checkpoint(tmp_path / "ok.pth", **{**SMALL, "vocab_size": 32})

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        MultiScaleVQVAE.from_checkpoint(tmp_path / "nowhere.pth", **SMALL)


def test_identity_follows_the_documented_hash(model):
    identity = model.identity()
    assert identity["class"] == "mvar_dist.tokenizer.MultiScaleVQVAE"
    assert identity["config"]["patch_nums"] == [1, 2, 3, 4] and identity["config"]["vocab_size"] == 64
    json.dumps(identity)
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        digest.update(f"{key}\t{state[key].dtype}\t{list(state[key].shape)}\n".encode())
        digest.update(state[key].numpy().tobytes())
    assert identity["weights_sha256"] == digest.hexdigest()

    other = small_model(seed=0)
    assert other.identity() == identity
    with torch.no_grad():
        other.post_quant_conv.bias[0] += 1e-3
    assert other.identity()["weights_sha256"] != identity["weights_sha256"]
