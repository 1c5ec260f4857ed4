"""A tokenizer export records the sha256 of each file it writes (config.json ``files_sha256``), and
``mvar-dist prep --tokenizer`` / ``mvar-dist sample`` check it: a zeroed file or another export's
weights are refused naming the file (exit 2, one line); ``--no-verify`` skips the check. The
export comes from the legacy tokenizer run's checkpoint (tests/data/legacy_runs, a tiny VQVAE):
seconds, no training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_images

from mvar_dist.cli import main as cli_main

LEGACY_TOKENIZER_RUN = Path(__file__).resolve().parent / "data" / "legacy_runs" / "tokenizer"
# the legacy run's architecture, for a vae.pth (which does not record it)
ARCHITECTURE_FLAGS = ["--vocab-size", "16", "--z-channels", "4", "--ch", "32", "--patch-nums", "1,2,4,8",
                      "--tokenizer-options", '{"ch_mult": [1], "num_res_blocks": 1}']
MISMATCH = r"sha256 [0-9a-f]{12}\.\.\. differs from [0-9a-f]{12}\.\.\. recorded in "


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mvar_dist.tokenizer_training.export import export_tokenizer_run

    out = tmp_path_factory.mktemp("tokenizer_export") / "export"
    export_tokenizer_run(LEGACY_TOKENIZER_RUN, out, "step_00000002")
    return out


@pytest.fixture(scope="module")
def other_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another export of the same architecture, with other weights."""
    from mvar_dist.tokenizer import MultiScaleVQVAE
    from mvar_dist.tokenizer_training.export import write_tokenizer_export

    architecture = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=[1], num_res_blocks=1, patch_nums=[1, 2, 4, 8])
    torch.manual_seed(5)
    model = MultiScaleVQVAE(**architecture)
    usage = torch.full((4, 16), 1.0)
    out = tmp_path_factory.mktemp("other_tokenizer_export") / "export"
    write_tokenizer_export(out, model, architecture, usage, training={"steps": 0})
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checksum_images") / "images"
    write_tiny_images(root, classes=2, per_class=3)
    return root


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    """A copy of the export each test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "export"))


def prep(images: Path, out: Path, tokenizer: Path | str, *flags: str) -> int:
    return cli_main(["prep", str(images), "--out", str(out), "--split", "train", "--tokenizer", str(tokenizer),
                     "--shard-size", "8", "--no-progress", *flags])


def zero_second_half(path: Path) -> None:
    """Zeroes the tensor data and keeps the header: the file still parses."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


def refusal(capsys: pytest.CaptureFixture, command: str, weights: Path) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"mvar-dist {command}:")]
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"mvar-dist {command}: {re.escape(str(weights))}: {MISMATCH}{re.escape(str(weights.parent / 'config.json'))}: "
        r"the file is damaged or belongs to another export; export again \(or pass verify=False / --no-verify to load "
        r"it anyway\)", lines[0]), lines[0]
    return lines[0]


def test_export_records_the_sha256_of_each_file_it_wrote(exported):
    metadata = json.loads((exported / "config.json").read_text())
    assert metadata["files_sha256"] == {
        name: hashlib.sha256((exported / name).read_bytes()).hexdigest() for name in ("tokenizer.safetensors", "vae.pth")}
    # the identity's hash is over the state dict's tensors, not the file: a distinct value
    assert metadata["identity"]["weights_sha256"] not in metadata["files_sha256"].values()


def test_an_untouched_export_preps_from_the_directory_or_its_files(exported, images, tmp_path):
    assert prep(images, tmp_path / "dir", exported) == 0  # the directory stands for its tokenizer.safetensors
    assert prep(images, tmp_path / "file", exported / "tokenizer.safetensors") == 0
    assert prep(images, tmp_path / "pth", exported / "vae.pth", *ARCHITECTURE_FLAGS) == 0
    manifests = [json.loads((tmp_path / d / "train" / "manifest.json").read_text()) for d in ("dir", "file", "pth")]
    assert all(m["tokenizer"] == manifests[0]["tokenizer"] for m in manifests)


def test_zeroed_weights_are_refused_naming_the_file(copy, images, tmp_path, capsys):
    weights = copy / "tokenizer.safetensors"
    zero_second_half(weights)
    assert prep(images, tmp_path / "codes", copy) == 2
    refusal(capsys, "prep", weights)
    assert not (tmp_path / "codes" / "train").exists()  # refused before any shard
    assert prep(images, tmp_path / "codes", weights, "--no-verify") == 0  # the user's choice: loads the zeros


def test_a_zeroed_released_layout_file_is_refused(copy, images, tmp_path, capsys):
    weights = copy / "vae.pth"
    zero_second_half(weights)
    assert prep(images, tmp_path / "codes", weights, *ARCHITECTURE_FLAGS) == 2
    refusal(capsys, "prep", weights)


def test_another_exports_weights_are_refused(copy, other_export, images, tmp_path, capsys):
    weights = copy / "tokenizer.safetensors"
    shutil.copyfile(other_export / "tokenizer.safetensors", weights)
    assert prep(images, tmp_path / "codes", weights) == 2
    refusal(capsys, "prep", weights)
    assert prep(images, tmp_path / "codes", copy, "--no-verify") == 0


def test_files_without_a_recorded_hash_load_as_before(copy, images, tmp_path):
    """Exports written before the hashes were recorded, and files beside no export's config.json."""
    metadata = json.loads((copy / "config.json").read_text())
    del metadata["files_sha256"]
    (copy / "config.json").write_text(json.dumps(metadata))
    zero_second_half(copy / "tokenizer.safetensors")  # nothing to tell it by
    assert prep(images, tmp_path / "old", copy) == 0
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(copy / "tokenizer.safetensors", loose / "tokenizer.safetensors")
    assert prep(images, tmp_path / "loose_codes", loose / "tokenizer.safetensors") == 0


def test_a_directory_that_is_no_tokenizer_export_is_refused(images, tmp_path, capsys):
    assert prep(images, tmp_path / "codes", tmp_path) == 2
    assert f"mvar-dist prep: {tmp_path} is a directory but not a tokenizer export" in capsys.readouterr().err


def test_submit_prep_checks_before_submitting_and_passes_no_verify(copy, images, tmp_path, capsys):
    """submit-prep parses the prep options with prep's parser: --no-verify reaches every task, and
    a damaged export file is refused before anything is submitted."""
    from mvar_dist.launch.prep_array import prep_target

    zero_second_half(copy / "tokenizer.safetensors")
    base = ["submit-prep", "--array-tasks", "2", "--cluster", "debug", "--dry-run", "--", str(images),
            "--split", "train", "--out", str(tmp_path / "codes"), "--tokenizer", str(copy)]
    assert cli_main(base) == 2
    refusal(capsys, "submit-prep", copy / "tokenizer.safetensors")
    assert cli_main([*base, "--no-verify"]) == 0
    assert prep_target(base[base.index("--") + 1:] + ["--no-verify"]).no_verify


def test_sample_checks_the_tokenizer_export_the_model_records(copy, tmp_path, capsys):
    from test_sample_cli import export_tiny

    from mvar_dist.tokenizer import load_tokenizer

    weights = copy / "tokenizer.safetensors"
    model_dir = export_tiny(tmp_path / "model", load_tokenizer(weights), weights, "vqvae", None)
    zero_second_half(weights)
    common = ["sample", "--no-progress", "--device", "cpu", "--model", str(model_dir), "--classes", "0",
              "--per-class", "1", "--out", str(tmp_path / "grid.png")]
    assert cli_main(common) == 2
    refusal(capsys, "sample", weights)
    # --no-verify skips the file check; the identity check still sees other weights
    assert cli_main([*common, "--no-verify"]) == 2
    assert "weights differ" in capsys.readouterr().err
    assert cli_main([*common, "--no-verify", "--allow-other-tokenizer-weights"]) == 0
