"""The FID Inception-v3 (mvar_dist/evaluation/inception.py): the weights file's key layout
against hand-written spot checks, strict loading and its errors, TF's legacy bilinear resize
against an independent numpy version, and the forward's feature shapes and determinism. The
weights are random (the real file is the user's), written in the standard layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvar_dist.evaluation.inception import (
    INCEPTION_ENV,
    WEIGHTS_FILE_NAME,
    FIDInceptionV3,
    InceptionFeatures,
    inception_state_shapes,
    load_inception,
    resolve_inception_path,
    tf_legacy_resize,
)

# written by hand from torchvision's Inception3 and the FID graph, not read from our module
SPOT_CHECKS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch1x1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3b.bn.bias": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
CONV_LAYERS = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9  # stem, Mixed_5*, 6a, 6b-6e, 7a, 7b/7c
TENSORS = CONV_LAYERS * 5 + 2  # conv.weight and bn weight/bias/running_mean/running_var; fc


def random_state(seed: int = 0, counters: bool = True) -> dict[str, torch.Tensor]:
    """A weights file's contents with random values scaled so that activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in inception_state_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith("running_var"):
            value = torch.rand(shape, generator=generator) + 0.5
        elif name.endswith("bn.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "fc.weight":
            value = torch.randn(shape, generator=generator) / 2048**0.5
        else:  # bn bias, running_mean, fc.bias (large, so that leaving it out shows)
            value = (5.0 if name == "fc.bias" else 0.1) * torch.randn(shape, generator=generator)
        state[name] = value
        if counters and name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE_NAME
    torch.save(random_state(counters=True), path)
    return path


@pytest.fixture(scope="module")
def model(weights_file) -> FIDInceptionV3:
    return load_inception(weights_file)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


# ----- the key layout -----

def test_state_shapes_match_the_hand_written_spot_checks():
    shapes = inception_state_shapes()
    assert {k: shapes.get(k) for k in SPOT_CHECKS} == SPOT_CHECKS
    assert len(shapes) == TENSORS == 472
    assert not any("AuxLogits" in k or "num_batches_tracked" in k for k in shapes)


def test_model_state_dict_is_the_file_layout_plus_counters():
    state = FIDInceptionV3().state_dict()
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert len(counters) == CONV_LAYERS
    assert {k: tuple(v.shape) for k, v in state.items() if k not in counters} == inception_state_shapes()


# ----- loading -----

def test_loads_strictly_with_and_without_counters(tmp_path, weights_file):
    with_counters = load_inception(weights_file)
    assert not with_counters.training
    path = tmp_path / "no_counters.pth"
    torch.save(random_state(counters=False), path)
    without = load_inception(path)
    for name, tensor in random_state(counters=False).items():
        assert torch.equal(without.state_dict()[name], tensor), name
        assert torch.equal(with_counters.state_dict()[name], tensor), name


def test_missing_file_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / WEIGHTS_FILE_NAME
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        load_inception(missing)
    assert "--inception" in str(error.value) and "download" in str(error.value)
    monkeypatch.setenv(INCEPTION_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV) as error:
        resolve_inception_path(None)
    assert "nowhere" in str(error.value)


def test_unset_environment_variable_says_how_to_give_the_file(monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as error:
        load_inception(None)
    message = str(error.value)
    assert INCEPTION_ENV in message and "--inception" in message and WEIGHTS_FILE_NAME in message
    assert "nothing is downloaded" in message


def test_environment_variable_names_the_file(monkeypatch, weights_file):
    monkeypatch.setenv(INCEPTION_ENV, str(weights_file))
    assert resolve_inception_path(None) == weights_file
    assert resolve_inception_path(weights_file) == weights_file


def test_renamed_key_is_named(tmp_path):
    state = random_state(counters=False)
    state["Mixed_6d.branch1x1.conv.kernel"] = state.pop("Mixed_6d.branch1x1.conv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="renamed.pth") as error:
        load_inception(path)
    assert "Mixed_6d.branch1x1.conv.weight" in str(error.value)
    assert "Mixed_6d.branch1x1.conv.kernel" in str(error.value)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    state = random_state(counters=False)
    state["fc.weight"] = state["fc.weight"][:1000]
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"fc\.weight") as error:
        load_inception(path)
    assert "(1008, 2048)" in str(error.value) and "(1000, 2048)" in str(error.value)


# ----- TF's legacy bilinear resize -----

def numpy_legacy_resize(images: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent reference: one interpolation matrix per axis, source = dst * in / out in float32."""
    def matrix(in_size: int, out_size: int) -> np.ndarray:
        result = np.zeros((out_size, in_size))
        scale = np.float32(in_size) / np.float32(out_size)
        for i in range(out_size):
            source = np.float32(i) * scale
            low = int(np.floor(source))
            high = min(low + 1, in_size - 1)
            weight = float(source) - low
            result[i, low] += 1 - weight
            result[i, high] += weight
        return result

    rows, columns = matrix(images.shape[1], out_h), matrix(images.shape[2], out_w)
    vertical = np.einsum("oh,nhwc->nowc", rows, images.astype(np.float64))
    return np.einsum("nowc,pw->nopc", vertical, columns)


def test_legacy_resize_by_hand():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).reshape(1, 2, 2, 1).expand(1, 2, 2, 3)
    out = tf_legacy_resize(x.contiguous(), 4)[0, :, :, 0]
    # source rows/columns 0, 0.5, 1, 1.5 -> the last is clamped to the edge
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("height, width, size", [(256, 256, 299), (64, 64, 299), (5, 7, 11), (40, 30, 17)])
def test_legacy_resize_matches_numpy(height, width, size):
    x = np.random.default_rng(1).integers(0, 256, (2, height, width, 3)).astype(np.float32)
    ours = tf_legacy_resize(torch.from_numpy(x), size).numpy()
    assert ours.shape == (2, size, size, 3)
    np.testing.assert_allclose(ours, numpy_legacy_resize(x, size, size), atol=2e-3)


def test_legacy_resize_is_not_torch_half_pixel():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3)).astype(np.float32))
    ours = tf_legacy_resize(x, 299)
    half_pixel = F.interpolate(x.permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - half_pixel.permute(0, 2, 3, 1)).abs().max() > 10


def test_preprocessing_modes():
    x = images(1, 64)
    tf_input = FIDInceptionV3(resize="tf").preprocess(x)
    expected = (tf_legacy_resize(x.float(), 299) - 128) / 128
    assert torch.allclose(tf_input, expected.permute(0, 3, 1, 2))
    torch_input = FIDInceptionV3(resize="torch").preprocess(x)
    expected = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear") / 127.5 - 1
    assert torch.allclose(torch_input, expected)
    with pytest.raises(ValueError, match="resize"):
        FIDInceptionV3(resize="nearest")
    with pytest.raises(ValueError, match="3"):
        FIDInceptionV3().preprocess(x.permute(0, 3, 1, 2))


# ----- the forward -----

@pytest.mark.parametrize("size", [256, 64])
def test_feature_shapes(model, size):
    with torch.no_grad():
        features = model(images(2, size))
    assert isinstance(features, InceptionFeatures)
    assert features.pool.shape == (2, 2048) and features.spatial.shape == (2, 17 * 17 * 7)
    assert features.probabilities.shape == (2, 1008)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in features)
    assert torch.allclose(features.probabilities.sum(1), torch.ones(2), atol=1e-5)
    assert (features.spatial >= 0).all() and features.spatial.std() > 0  # after the ReLU, not constant


def test_spatial_is_mixed_6d_1x1_in_nhwc_order_and_probabilities_skip_the_bias(model):
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.update(out=out))
    try:
        with torch.no_grad():
            features = model(images(1, 64, seed=3))
    finally:
        hook.remove()
    grid = captured["out"][0, :7]  # (c, h, w)
    assert grid.shape == (7, 17, 17)
    assert torch.equal(features.spatial[0].reshape(17, 17, 7), grid.permute(1, 2, 0))
    logits = features.pool @ model.fc.weight.T
    assert torch.allclose(features.probabilities, torch.softmax(logits, 1), atol=1e-6)
    with_bias = torch.softmax(logits + model.fc.bias, 1)
    assert not torch.allclose(features.probabilities, with_bias, atol=1e-3)


def test_eval_forward_is_deterministic_and_batch_independent(model):
    batch = images(2, 64, seed=4)
    with torch.no_grad():
        first, second = model(batch), model(batch)
        alone = [model(batch[i : i + 1]) for i in range(2)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name, together in first._asdict().items():
        single = torch.cat([getattr(features, name) for features in alone])
        assert torch.allclose(together, single, rtol=1e-4, atol=1e-5), name
    assert not torch.allclose(first.pool[0], first.pool[1])  # different images, different features


def test_float_input_equals_uint8_input(model):
    batch = images(1, 64, seed=5)
    with torch.no_grad():
        from_uint8, from_float = model(batch), model(batch.float())
    assert torch.equal(from_uint8.pool, from_float.pool)


def test_pool_branches_are_the_fid_graph_ones(model):
    """The mixed blocks' average pools divide by the real pixels only (TF's SAME average pool);
    Mixed_7c's pool branch is a max pool (the FID graph's oddity)."""
    seen = {}

    def keep(name):
        return lambda module, args: seen.__setitem__(name, args[0])

    hooks = [getattr(model, block).register_forward_pre_hook(keep(block)) for block in ("Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c")]
    hooks += [getattr(model, block).branch_pool.register_forward_pre_hook(keep(block + ".pool"))
              for block in ("Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c")]
    try:
        with torch.no_grad():
            model(images(1, 64, seed=6))
    finally:
        for hook in hooks:
            hook.remove()
    for block in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
        x, pooled = seen[block], seen[block + ".pool"]
        assert torch.allclose(pooled[..., 0, 0], x[..., :2, :2].mean((-2, -1)), atol=1e-5), block  # corner: 4 pixels
        assert torch.allclose(pooled[..., 0, 1], x[..., :2, :3].mean((-2, -1)), atol=1e-5), block  # edge: 6
        assert torch.allclose(pooled[..., 2, 3], x[..., 1:4, 2:5].mean((-2, -1)), atol=1e-5), block
    x, pooled = seen["Mixed_7c"], seen["Mixed_7c.pool"]
    assert torch.equal(pooled[..., 0, 0], x[..., :2, :2].amax((-2, -1)))
    assert torch.equal(pooled[..., 2, 3], x[..., 1:4, 2:5].amax((-2, -1)))
    assert not torch.allclose(pooled[..., 2, 3], x[..., 1:4, 2:5].mean((-2, -1)))
