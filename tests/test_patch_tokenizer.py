"""The quickstart's pixel-patch tokenizer: fitting, codes, teacher input, reconstructions, files."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from mvar_dist.quickstart.digits import (
    default_judge,
    grey_to_model_images,
    judge_accuracy,
    load_digits_split,
    upscale_digits,
)
from mvar_dist.tokenizer import MultiScaleVQVAE, PatchResidualTokenizer, QuickstartTokenizerConfig

TINY = QuickstartTokenizerConfig(image_size=8, patch_size=2, patch_nums=(1, 2, 4), vocab_size=16)


def digits_images(split: str, image_size: int = 16, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_split().split(split)
    images, labels = images[:limit], labels[:limit]
    return grey_to_model_images(upscale_digits(images, image_size)), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def fitted() -> PatchResidualTokenizer:
    """The quickstart configuration fitted on the digits' training split (a few seconds)."""
    tokenizer = PatchResidualTokenizer()
    tokenizer.fit(digits_images("train")[0], seed=0)
    return tokenizer


def random_images(config: QuickstartTokenizerConfig, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    return torch.rand(n, config.channels, size, size, generator=generator) * 2 - 1


def test_config_defaults_and_validation() -> None:
    config = QuickstartTokenizerConfig()
    assert (config.image_size, config.patch_size, config.patch_nums) == (16, 2, (1, 2, 3, 4, 5, 6, 8))
    assert config.z_channels == 12
    with pytest.raises(ValueError, match="image_size"):
        QuickstartTokenizerConfig(image_size=32)
    with pytest.raises(ValueError, match="unknown field"):
        QuickstartTokenizerConfig.from_dict({"image_size": 16, "colour": 1})


def test_fit_is_deterministic_and_seeded() -> None:
    images = random_images(TINY, 64)
    first, second, other = PatchResidualTokenizer(TINY), PatchResidualTokenizer(TINY), PatchResidualTokenizer(TINY)
    errors = first.fit(images, lloyd_steps=5, seed=3)
    second.fit(images, lloyd_steps=5, seed=3)
    other.fit(images, lloyd_steps=5, seed=4)
    weights = first.quantize.embedding.weight
    assert torch.equal(weights, second.quantize.embedding.weight)
    assert not torch.equal(weights, other.quantize.embedding.weight)
    assert first.identity() == second.identity()
    # Lloyd's algorithm never increases the k-means error
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_fit_rejects_too_few_images() -> None:
    with pytest.raises(ValueError, match="at least vocab_size"):
        PatchResidualTokenizer(TINY).fit(random_images(TINY, 8))


def test_codes_in_range_and_teacher_input_shape(fitted: PatchResidualTokenizer) -> None:
    images, _ = digits_images("val", limit=12)
    codes = fitted.img_to_codes(images)
    assert [tuple(c.shape) for c in codes] == [(12, pn * pn) for pn in fitted.patch_nums]
    flat = torch.cat(codes, dim=1)
    assert flat.dtype == torch.long and 0 <= int(flat.min()) and int(flat.max()) < fitted.vocab_size
    teacher = fitted.codes_to_teacher_input(codes)
    assert tuple(teacher.shape) == (12, fitted.layout.num_tokens - 1, fitted.z_channels)
    assert torch.equal(teacher, fitted.codes_to_teacher_input(flat))


def test_teacher_input_is_downsampled_partial_reconstruction(fitted: PatchResidualTokenizer) -> None:
    """Teacher input of scale s = f_hat after scales < s, area-downsampled (the sampler's path)."""
    codes = fitted.img_to_codes(digits_images("val", limit=4)[0])
    teacher = fitted.codes_to_teacher_input(codes)
    f_hat = torch.zeros(4, fitted.z_channels, 8, 8)
    for s in range(1, len(codes)):
        f_hat = f_hat + fitted.scale_contribution(codes[s - 1], s - 1)
        begin, end = fitted.layout.begin_ends[s]
        expected = F.interpolate(f_hat, size=(fitted.patch_nums[s],) * 2, mode="area").flatten(2).transpose(1, 2)
        torch.testing.assert_close(teacher[:, begin - 1 : end - 1], expected)
    final = f_hat + fitted.scale_contribution(codes[-1], len(codes) - 1)
    torch.testing.assert_close(fitted.f_hat_to_img(final), fitted.codes_to_img(codes))


def test_reconstructions_are_recognised(fitted: PatchResidualTokenizer) -> None:
    images, labels = digits_images("val")
    reconstructions = fitted.codes_to_img(fitted.img_to_codes(images))
    assert reconstructions.shape == images.shape and reconstructions.abs().max() <= 1
    real = judge_accuracy((images + 1) / 2, labels)
    recognised = judge_accuracy((reconstructions + 1) / 2, labels)
    assert real >= 0.95, real
    assert recognised >= 0.90, (recognised, real)
    assert float((reconstructions - images).square().mean()) < 0.02


def test_finer_scales_reduce_the_error(fitted: PatchResidualTokenizer) -> None:
    images = digits_images("val", limit=64)[0]
    codes = fitted.img_to_codes(images)
    latent, f_hat, errors = fitted.encode_latent(images), torch.zeros(64, fitted.z_channels, 8, 8), []
    for s, codes_s in enumerate(codes):
        f_hat = f_hat + fitted.scale_contribution(codes_s, s)
        errors.append(float((f_hat - latent).square().mean()))
    assert errors[-1] < errors[len(errors) // 2] < errors[0]


def test_bad_inputs_get_clear_errors(fitted: PatchResidualTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        fitted.img_to_codes(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        fitted.img_to_codes(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    good = torch.zeros(2, fitted.layout.num_tokens, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        fitted.codes_to_img(good + 256)
    with pytest.raises(ValueError, match="scales"):
        fitted.codes_to_img(list(fitted.layout.split(good))[:-1])


def test_interface_matches_multiscale_vqvae() -> None:
    """Everything the data pipeline, trainer and sampler call on MultiScaleVQVAE exists here with the same signature."""
    shared = [
        "img_to_codes", "codes_to_teacher_input", "codes_to_img", "scale_contribution",
        "teacher_input_for_scale", "f_hat_to_img", "identity", "from_checkpoint",
    ]
    for name in shared:
        ours = inspect.signature(getattr(PatchResidualTokenizer, name))
        theirs = inspect.signature(getattr(MultiScaleVQVAE, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        for param in ours.parameters:
            assert ours.parameters[param].default == theirs.parameters[param].default, (name, param)
    tokenizer = PatchResidualTokenizer(TINY)
    for attribute in ("layout", "patch_nums", "vocab_size", "z_channels", "image_size"):
        assert hasattr(tokenizer, attribute), attribute
    assert tokenizer.layout.patch_nums == tokenizer.patch_nums == TINY.patch_nums
    assert tokenizer.image_size == TINY.image_size


def test_save_load_round_trip(tmp_path, fitted: PatchResidualTokenizer) -> None:
    path = fitted.save(tmp_path / "tok.safetensors")
    loaded = PatchResidualTokenizer.from_checkpoint(path)
    assert loaded.identity() == fitted.identity()
    assert loaded.identity() == loaded.identity()
    images = digits_images("val", limit=8)[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.img_to_codes(images), fitted.img_to_codes(images)))
    assert PatchResidualTokenizer.from_checkpoint(path, vocab_size=256).identity() == fitted.identity()
    with pytest.raises(ValueError, match="differs"):
        PatchResidualTokenizer.from_checkpoint(path, vocab_size=512)
    with pytest.raises(FileNotFoundError):
        PatchResidualTokenizer.from_checkpoint(tmp_path / "missing.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.safetensors"]  # no temporary file left


def test_identity_changes_with_the_codebook() -> None:
    tokenizer = PatchResidualTokenizer(TINY)
    before = tokenizer.identity()
    assert before["class"] == "mvar_dist.patch_tokenizer.PatchResidualTokenizer"
    assert before["config"]["patch_nums"] == [1, 2, 4]
    tokenizer.fit(random_images(TINY, 32), lloyd_steps=2)
    assert tokenizer.identity()["weights_sha256"] != before["weights_sha256"]


def test_works_with_the_sampler(fitted: PatchResidualTokenizer) -> None:
    """An untrained tiny MVAR samples through this tokenizer (shapes, ranges, seeding)."""
    from mvar_dist.model import MVAR, MVARConfig

    config = MVARConfig(depth=1, embed_dim=32, num_heads=2, patch_nums=fitted.patch_nums, vocab_size=fitted.vocab_size,
                        z_channels=fitted.z_channels, num_classes=10, kernel_size=5, refine_step=6)
    model = MVAR(config).eval()
    labels = torch.arange(4)
    codes, images = model.generate(labels, fitted, cfg=1.0, top_k=0, top_p=0.9, seed=0)
    assert images.shape == (4, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(images, (fitted.codes_to_img(codes) + 1) / 2)
    assert torch.equal(model.generate(labels, fitted, cfg=1.0, top_k=0, top_p=0.9, seed=0)[1], images)
    assert default_judge().predict(images).shape == (4,)


def test_data_prep_shards_the_digits_folder(tmp_path) -> None:
    """The ordinary data_prep path (PNG decode, preprocessing, flips, manifest, verify) accepts this
    tokenizer, and the codes in the shards are the tokenizer's codes of the folder's images."""
    import tarfile

    import numpy as np

    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.data_prep.sources import list_class_folder
    from mvar_dist.data_prep.verify import verify_manifest
    from mvar_dist.quickstart.digits import read_image_folder, write_digits_image_folder

    write_digits_image_folder(tmp_path / "digits", image_size=8, val_size=20)
    tokenizer = PatchResidualTokenizer(TINY)
    tokenizer.fit(read_image_folder(tmp_path / "digits" / "train")[0], lloyd_steps=2)
    source = list_class_folder(tmp_path / "digits" / "val")
    summary = shard_dataset(source, tmp_path / "codes", tokenizer, name="digits", split="val", shard_size=8, progress=False)
    assert summary.images_written == 20 and summary.images_failed == 0
    manifest = merge_manifest(tmp_path / "codes", "val")
    assert verify_manifest(manifest).bad_shards == {}

    images, _ = read_image_folder(tmp_path / "digits" / "val")
    expected = torch.cat(tokenizer.img_to_codes(images), dim=1)
    files = sorted((tmp_path / "digits" / "val").rglob("*.png"))
    by_key = {f.relative_to(tmp_path / "digits" / "val").with_suffix("").as_posix(): row for f, row in zip(files, expected)}
    found = 0
    for shard in sorted((tmp_path / "codes" / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".codes.u16"):
                    codes = np.frombuffer(tar.extractfile(member).read(), dtype="<u2").reshape(2, -1)
                    key = member.name.removesuffix(".codes.u16")
                    assert torch.equal(torch.from_numpy(codes[0].astype(np.int64)), by_key[key]), key
                    found += 1
    assert found == 20
