"""``mvar-dist import-released``: a released-layout .pth -> an export directory that ``sample`` and
``MVAR.from_pretrained`` read; key/shape/mode checks; --out handling; name inference.

The released files are 310M+ parameters, so the files here are written inside the test in the
released layout (:func:`official_state_dict`, derived buffers included) at a tiny size, with the
hidden ``--model-field`` flag giving the tiny widths; the d16 key set is checked on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mvar_dist.cli import main as cli_main
from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.model.released import derived_buffers, official_state_dict
from mvar_dist.tokenizer import PatchResidualTokenizer, QuickstartTokenizerConfig
from mvar_dist.training.import_released import (
    PUBLISHED_CONFIG_DIR,
    check_released_state,
    infer_from_name,
    published_sample_settings,
    released_model_config,
)

PATCH = QuickstartTokenizerConfig(image_size=8, patch_size=2, channels=3, patch_nums=(1, 2, 4), vocab_size=16)
REFERENCE_KEYS = Path(__file__).parent / "data" / "mvar_d16_keys.json"  # the released mvar-d16.pth listing


def tiny_fields(tokenizer: PatchResidualTokenizer, embed_dim: int = 32) -> dict:
    return {
        "embed_dim": embed_dim, "num_heads": 2, "num_classes": 5, "vocab_size": tokenizer.vocab_size,
        "z_channels": tokenizer.z_channels, "patch_nums": list(tokenizer.patch_nums), "refine_step": 3,
        "kernel_size": 1, "attention_backend": "torch",
    }


def field_flags(fields: dict) -> list[str]:
    return [arg for name, value in fields.items() for arg in ("--model-field", f"{name}={json.dumps(value)}")]


def write_released(path: Path, mode: str, depth: int, fields: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of our model saved in the released layout; returns the file's state dict."""
    torch.manual_seed(seed)
    config = MVARConfig(depth=depth, mode=mode, **fields)
    state = official_state_dict(MVAR(config).state_dict(), config)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("import_released")
    torch.manual_seed(1)
    tokenizer = PatchResidualTokenizer(PATCH)
    tokenizer_path = tokenizer.save(base / "tokenizer.safetensors")
    fields = tiny_fields(tokenizer)
    var_file, mvar_file = base / "var_d2.pth", base / "mvar-d2.pth"
    return {
        "base": base, "tokenizer": tokenizer_path, "fields": fields,
        "var_file": var_file, "var_state": write_released(var_file, "var", 2, fields, seed=0),
        "mvar_file": mvar_file, "mvar_state": write_released(mvar_file, "mvar", 2, fields, seed=1),
    }


def run_import(setup: dict, checkpoint: Path, out: Path, *extra: str, fields: dict | None = None) -> int:
    return cli_main(["import-released", str(checkpoint), "--tokenizer", str(setup["tokenizer"]), "--tokenizer-kind", "patch",
                     "--out", str(out), *field_flags(fields or setup["fields"]), *extra])


def test_import_samples_and_loads_the_files_weights(setup, tmp_path, capsys):
    out = tmp_path / "var_d2"
    assert run_import(setup, setup["var_file"], out) == 0  # mode and depth from the name var_d2.pth
    assert f"imported {setup['var_file']} (var, depth 2" in capsys.readouterr().out
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["format"] == "mvar-dist-export/1" and metadata["weights"] == "model.safetensors"
    assert metadata["model"]["mode"] == "var" and metadata["model"]["depth"] == 2
    assert metadata["tokenizer"]["identity"]["class"].endswith("PatchResidualTokenizer")
    assert metadata["released"]["file"] == str(setup["var_file"].resolve())
    assert metadata["sample"] == {"cfg": 1.5, "top_p": 0.96, "top_k": 900}  # no published d2: the section defaults

    model = MVAR.from_pretrained(out)
    loaded = model.state_dict()
    file_state = setup["var_state"]
    assert set(loaded) == set(file_state) - set(derived_buffers(model.config)) - {k for k in file_state if k.endswith("zero_k_bias")}
    for key, value in loaded.items():
        assert torch.equal(value, file_state[key]), key

    grid = tmp_path / "grid.png"
    assert cli_main(["sample", "--model", str(out), "--classes", "0,4", "--per-class", "2", "--batch-size", "4",
                     "--device", "cpu", "--no-progress", "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0


def test_mvar_official_format_and_setting_overrides(setup, tmp_path):
    out = tmp_path / "mvar_d2"
    assert run_import(setup, setup["mvar_file"], out, "--format", "official", "--cfg", "2.5", "--top-k", "7") == 0
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["weights"] == "mvar_d2.pth" and metadata["model"]["mode"] == "mvar"
    assert metadata["sample"] == {"cfg": 2.5, "top_p": 0.96, "top_k": 7}
    written = torch.load(out / "mvar_d2.pth", weights_only=True)
    assert list(written) == list(setup["mvar_state"])
    assert all(torch.equal(written[k], v) for k, v in setup["mvar_state"].items())
    model = MVAR.from_pretrained(out)
    assert all(torch.equal(v, setup["mvar_state"][k]) for k, v in model.state_dict().items())


def test_wrong_depth_width_or_mode_is_refused_naming_the_mismatches(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_import(setup, setup["var_file"], out, "--depth", "3") == 2
    err = capsys.readouterr().err
    assert err.startswith("mvar-dist import-released: ") and "missing blocks.2." in err and "Check --depth and --mode" in err

    wider = {**setup["fields"], "embed_dim": 48}
    assert run_import(setup, setup["var_file"], out, fields=wider) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.mat_qkv.weight: file (96, 32), depth 2 (width 48) expects (144, 48)" in err

    assert run_import(setup, setup["var_file"], out, "--mode", "mvar") == 2
    err = capsys.readouterr().err
    assert "attn_bias_for_masking: the file holds VAR's block-causal mask (mode var), --mode mvar expects" in err
    assert not out.exists()  # nothing written


def test_name_inference():
    assert infer_from_name("checkpoints/var_d16.pth") == ("var", 16)
    assert infer_from_name("var_d20.pth") == ("var", 20)
    assert infer_from_name("/x/mvar-d16.pth") == ("mvar", 16)
    assert infer_from_name("mvar_d24.pth") == ("mvar", 24)  # what export --format official names its file
    assert infer_from_name("model.pth") == (None, None)
    assert infer_from_name("var_d16_ema.pth") == (None, None)


def test_a_name_without_mode_and_depth_needs_the_flags(setup, tmp_path, capsys):
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes(setup["mvar_file"].read_bytes())
    assert run_import(setup, renamed, tmp_path / "a") == 2
    assert "pass --mode and --depth" in capsys.readouterr().err
    assert run_import(setup, renamed, tmp_path / "a", "--depth", "2") == 2  # the mode is still unknown
    assert run_import(setup, renamed, tmp_path / "a", "--mode", "mvar", "--depth", "2") == 0


def test_out_refused_unless_same_file_or_force(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_import(setup, setup["var_file"], out) == 2
    assert "holds 1 other file (notes.txt)" in capsys.readouterr().err
    assert run_import(setup, setup["var_file"], out, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine"  # other files stay, as with export --force
    (out / "notes.txt").unlink()
    assert run_import(setup, setup["var_file"], out) == 0  # a re-import of the same file needs no --force
    capsys.readouterr()

    assert run_import(setup, setup["mvar_file"], out) == 2  # another file's import
    assert f"holds an export of {setup['var_file'].resolve()}" in capsys.readouterr().err
    assert run_import(setup, setup["mvar_file"], out, "--force", "--format", "official") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mvar_d2.pth"]  # no stale model.safetensors


def test_released_d16_key_set_matches_and_other_depths_are_named():
    """The listing of the released mvar-d16.pth (shapes only: meta tensors; the real derived masks)."""
    reference = json.loads(REFERENCE_KEYS.read_text())
    config = released_model_config("mvar", 16)
    real = derived_buffers(config)
    state = {k: real[k] if k in real else torch.empty(shape, device="meta") for k, shape in reference["state_dict"].items()}
    ours = check_released_state(state, config, "mvar-d16.pth")
    with torch.device("meta"):
        assert list(ours) == list(MVAR(config).state_dict())
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.mat_qkv\.weight: file \(3072, 1024\), depth 20 expects \(3840, 1280\)"):
        check_released_state(state, released_model_config("var", 20), "mvar-d16.pth")
    with pytest.raises(ValueError, match="the file holds MVAR's block-diagonal mask"):
        check_released_state(state, released_model_config("var", 16), "mvar-d16.pth")


def test_published_sample_settings_come_from_the_configs():
    import yaml

    def section(name: str) -> dict:
        return yaml.safe_load((PUBLISHED_CONFIG_DIR / name).read_text())["sample"]

    assert published_sample_settings("var", 16) == ({"cfg": 1.5, "top_p": 0.96, "top_k": 900}, "configs/var_d16.yaml")
    assert published_sample_settings("mvar", 16)[0] == section("mvar_d16.yaml") == {"cfg": 2.7, "top_p": 0.99, "top_k": 1200}
    assert published_sample_settings("var", 20)[0] == section("mvar_d20.yaml")
    assert published_sample_settings("var", 24)[0] == section("mvar_d24.yaml")


def test_an_imported_checkpoint_is_evaluated_like_any_export(setup, tmp_path, monkeypatch):
    """evaluate --model reads the import: samples drawn, kept, scored (random Inception weights)."""
    import numpy as np

    from mvar_dist.evaluation.inception import random_inception_state

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "mvar_d2"
    assert run_import(setup, setup["mvar_file"], out) == 0
    torch.save(random_inception_state(0), tmp_path / "inception.pth")
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    report = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--model", str(out), "--num", "10", "--batch-size", "5", "--ref", str(tmp_path / "ref.npz"),
                     "--inception", str(tmp_path / "inception.pth"), "--cache-dir", str(tmp_path / "cache"),
                     "--device", "cpu", "--no-progress", "--out", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["num_samples"] == 10 and metrics["model"] == str(out.resolve())
    assert metrics["sampling"] == {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # what the import recorded (no published d2)
