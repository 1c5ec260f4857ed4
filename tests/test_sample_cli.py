"""``mvar-dist sample``: grid PNG and ADM .npz from a tiny exported model, tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist import __version__
from mvar_dist.atomic import write_via_temp
from mvar_dist.cli import main as cli_main
from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.model.pretrained import CONFIG_FILE, EXPORT_FORMAT, SAFETENSORS_FILE
from mvar_dist.sampling.batches import batch_seed
from mvar_dist.sampling.images import compose_grid
from mvar_dist.tokenizer import MultiScaleVQVAE, PatchResidualTokenizer, QuickstartTokenizerConfig

PATCH = QuickstartTokenizerConfig(image_size=8, patch_size=2, channels=3, patch_nums=(1, 2, 4), vocab_size=16)
VQVAE = dict(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3), ch_mult=(1,), num_res_blocks=1)
NUM_CLASSES = 5


def export_tiny(directory: Path, tokenizer, tokenizer_path: Path, kind: str, sample: dict | None) -> Path:
    """A randomly initialised MVAR written as 'mvar-dist export' writes it (config.json + safetensors)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = MVARConfig(
        depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES, vocab_size=tokenizer.vocab_size,
        z_channels=tokenizer.z_channels, patch_nums=tokenizer.patch_nums, refine_step=len(tokenizer.patch_nums),
        kernel_size=1, attention_backend="torch",
    )
    model = MVAR(config)
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_via_temp(directory / SAFETENSORS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    metadata = {
        "format": EXPORT_FORMAT, "mvar_dist_version": __version__, "dtype": "float32",
        "model": config.to_dict(), "patch_nums": list(config.patch_nums),
        "tokenizer": {"kind": kind, "checkpoint": str(tokenizer_path), "options": {}, "identity": tokenizer.identity()},
        "training": {"steps": 0},
        "weights": SAFETENSORS_FILE,
    }
    if sample is not None:
        metadata["sample"] = sample
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2))
    return directory


@pytest.fixture(scope="module")
def patch_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sample_patch")
    torch.manual_seed(1)
    tokenizer = PatchResidualTokenizer(PATCH)
    tokenizer_path = tokenizer.save(base / "tokenizer.safetensors")
    return export_tiny(base / "export", tokenizer, tokenizer_path, "patch", {"cfg": 1.5, "top_k": 8, "top_p": 0.9}), tokenizer_path


def sample(*args: str) -> int:
    return cli_main(["sample", "--no-progress", "--device", "cpu", *args])


def test_grid_png_has_one_row_per_class(patch_export, tmp_path):
    model_dir, tokenizer = patch_export
    out = tmp_path / "grid.png"
    assert sample("--model", str(model_dir), "--tokenizer", str(tokenizer), "--classes", "0,3,4",
                  "--per-class", "2", "--batch-size", "4", "--out", str(out)) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # (width, height): 2 columns, 3 rows
        pixels = np.asarray(image)
    assert (pixels[:2] == 255).all() and (pixels[:, :2] == 255).all()  # padding
    assert not (pixels[2:10, 2:10] == 255).all()  # a generated image, not blank


def test_npz_matches_the_adm_format_class_order_and_seed(patch_export, tmp_path):
    model_dir, tokenizer = patch_export
    common = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--npz", "--classes", "1,2,4", "--num", "6", "--batch-size", "4"]
    assert sample(*common, "--seed", "3", "--out", str(tmp_path / "a.npz")) == 0
    assert sample(*common, "--seed", "3", "--out", str(tmp_path / "b.npz")) == 0
    assert sample(*common, "--seed", "4", "--out", str(tmp_path / "c.npz")) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b, np.load(tmp_path / "c.npz") as c:
        assert a.files == ["arr_0"]
        arr = a["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(arr, b["arr_0"])
        assert not np.array_equal(arr, c["arr_0"])

    # class order: the npz holds the images a grid of classes 1, 2, 4 (2 each) shows, row by row
    assert sample("--model", str(model_dir), "--tokenizer", str(tokenizer), "--classes", "1,2,4", "--per-class", "2",
                  "--batch-size", "4", "--seed", "3", "--padding", "0", "--out", str(tmp_path / "grid.png")) == 0
    with Image.open(tmp_path / "grid.png") as image:
        np.testing.assert_array_equal(np.asarray(image), compose_grid(arr, rows=3, padding=0))


def test_npz_images_follow_the_labels(patch_export, tmp_path):
    """Each class's images come from sampling that class: same seed, one class at a time."""
    model_dir, tokenizer = patch_export
    base = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--npz", "--batch-size", "2", "--seed", "0"]
    assert sample(*base, "--classes", "0,1", "--num", "4", "--out", str(tmp_path / "both.npz")) == 0
    assert sample(*base, "--classes", "0", "--num", "2", "--out", str(tmp_path / "zero.npz")) == 0
    with np.load(tmp_path / "both.npz") as both, np.load(tmp_path / "zero.npz") as zero:
        np.testing.assert_array_equal(both["arr_0"][:2], zero["arr_0"])  # batch 0 = class 0, same derived seed


def test_flags_override_recorded_settings(patch_export):
    from mvar_dist.sampling.batches import resolve_settings

    recorded = {"cfg": 1.5, "top_k": 8, "top_p": 0.9}
    assert resolve_settings(recorded, None, None, None).kwargs() == recorded
    assert resolve_settings(recorded, 3.0, None, 0.5).kwargs() == {"cfg": 3.0, "top_k": 8, "top_p": 0.5}
    assert resolve_settings(None, None, 5, None).kwargs() == {"top_k": 5}  # the rest: generate's defaults


def test_batch_seeds_are_distinct_and_stable():
    seeds = {batch_seed(s, b) for s in range(4) for b in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)
    assert batch_seed(7, 3) == batch_seed(7, 3)


def test_vqvae_tokenizer_export(tmp_path):
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(**VQVAE)
    torch.save(tokenizer.state_dict(), tmp_path / "vae.pth")
    model_dir = export_tiny(tmp_path / "export", tokenizer, tmp_path / "vae.pth", "vqvae", None)
    out = tmp_path / "grid.png"
    # --tokenizer omitted: the checkpoint recorded in config.json is used
    assert sample("--model", str(model_dir), "--classes", "0-1", "--per-class", "3", "--out", str(out)) == 0
    with Image.open(out) as image:
        assert image.size == (3 * (3 + 2) + 2, 2 * (3 + 2) + 2)


def test_tokenizer_mismatch_is_a_clear_error(patch_export, tmp_path, capsys):
    model_dir, _ = patch_export
    other = PatchResidualTokenizer(PATCH.__class__(**{**PATCH.to_dict(), "vocab_size": 24})).save(tmp_path / "other.safetensors")
    assert sample("--model", str(model_dir), "--tokenizer", str(other), "--out", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "vocab_size is 24, the model's is 16" in err
    assert not (tmp_path / "x.png").exists()

    torch.manual_seed(123)  # same class and config, other codebook
    retrained = PatchResidualTokenizer(PATCH).save(tmp_path / "retrained.safetensors")
    assert sample("--model", str(model_dir), "--tokenizer", str(retrained), "--out", str(tmp_path / "x.png")) == 2
    assert "weights differ" in capsys.readouterr().err

    torch.save(MultiScaleVQVAE(**VQVAE).state_dict(), tmp_path / "vae.pth")  # a VQVAE for a patch-tokenizer model
    assert sample("--model", str(model_dir), "--tokenizer", str(tmp_path / "vae.pth"), "--out", str(tmp_path / "x.png")) == 2
    assert "cannot be loaded as the tokenizer the model was trained with" in capsys.readouterr().err


def test_bad_counts_are_rejected(patch_export, tmp_path, capsys):
    model_dir, tokenizer = patch_export
    args = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "x.npz")]
    assert sample(*args, "--npz", "--num", "7") == 2  # 5 classes
    assert "not divisible" in capsys.readouterr().err
    assert sample(*args, "--classes", "9") == 2
    assert "0..4" in capsys.readouterr().err
