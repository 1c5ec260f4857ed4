"""Checkpoints written before the shared training runtime (run-state version 1) still resume and
export. The fixtures in tests/data/legacy_runs/ were made with the code of commit 9af6f18 (the
last one before ``mvar_dist.runtime``): a 2-rank run of each kind killed right after its step-2
checkpoint (see tests/data/legacy_runs/README.md). Resumed with today's code they must end with
exactly the weights of an uninterrupted run of today's code, continue their MLflow run, and
export like any other run.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_images
from test_tokenizer_training import TINY as TOKENIZER_TINY
from test_tokenizer_training import cli, ok
from test_train import TINY, metric_history

from mvar_dist.run_state import RUN_STATE_VERSION

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_runs"
# what the fixtures were trained with, on top of the tiny configs (README.md beside them)
TRANSFORMER_OVERRIDES = ["model.depth=1", "model.embed_dim=32", "train.total_steps=4", "checkpoint.every_steps=2"]
TOKENIZER_OVERRIDES = ["tokenizer.ch_mult=[1]", "tokenizer.patch_nums=[1,2,4,8]", "tokenizer.vocab_size=16",
                       "tokenizer.z_channels=4", "loss.disc_channels=8", "loss.gan_start_step=3"]


def copy_legacy_run(kind: str, target: Path) -> str:
    """The fixture as a run directory with its MLflow store; returns that store's URI."""
    shutil.copytree(LEGACY / kind, target, ignore=shutil.ignore_patterns("mlflow.db.gz"))
    with gzip.open(LEGACY / kind / "mlflow.db.gz") as packed:
        (target / "mlflow.db").write_bytes(packed.read())
    return f"sqlite:///{target / 'mlflow.db'}"


def saved_weights(run_dir: Path, step: int, sub: str = "") -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / sub / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_fixtures_are_version_1():
    """What makes them legacy: no version key in the run state, the task's state at the top of the rank files."""
    for kind in ("transformer", "tokenizer"):
        tag = LEGACY / kind / "checkpoints" / "step_00000002"
        assert "version" not in json.loads((tag / "run_state.json").read_text())
        rank = torch.load(tag / "rank_00000.pt", map_location="cpu", weights_only=True)
        assert "version" not in rank and "task" not in rank
    assert "codebook" in torch.load(LEGACY / "tokenizer" / "checkpoints" / "step_00000002" / "rank_00001.pt",
                                    weights_only=True)


@pytest.mark.slow
def test_legacy_transformer_checkpoint_resumes_exactly_and_exports(tiny_codes, tmp_path):
    run_dir = tmp_path / "legacy"
    uri = copy_legacy_run("transformer", run_dir)
    overrides = [*tiny_codes.overrides(run_dir), *TRANSFORMER_OVERRIDES, f"tracking.uri={uri}"]
    resumed = cli("train", "--config", str(TINY), "--nproc", "2", *overrides)
    ok(resumed)
    assert "resumed from step_00000002 at step 2" in resumed.stderr
    whole_dir = tmp_path / "whole"
    # the reference keeps the per-rank sample order (and torch's RNG draws) a legacy run resumes with
    ok(cli("train", "--config", str(TINY), "--nproc", "2", *tiny_codes.overrides(whole_dir), *TRANSFORMER_OVERRIDES,
           f"tracking.uri=sqlite:///{tmp_path / 'whole.db'}", "data.canonical_ranks=null"))
    assert_same_weights(saved_weights(whole_dir, 4), saved_weights(run_dir, 4))
    state = json.loads((run_dir / "checkpoints" / "step_00000004" / "run_state.json").read_text())
    legacy = json.loads((LEGACY / "transformer" / "checkpoints" / "step_00000002" / "run_state.json").read_text())
    assert state["version"] == RUN_STATE_VERSION and state["mlflow_run_id"] == legacy["mlflow_run_id"]  # the same MLflow run
    losses = metric_history(run_dir, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([v for _, v in losses]),
                               torch.tensor([v for _, v in metric_history(whole_dir, "train/loss")]))
    # the legacy tag itself exports (its run state is read through the version-1 path)
    ok(cli("export", str(LEGACY / "transformer"), "--tag", "step_00000002", "--out", str(tmp_path / "export")))
    from mvar_dist.model import MVAR

    model = MVAR.from_pretrained(tmp_path / "export")
    assert model.config.depth == 1 and model.config.embed_dim == 32


@pytest.mark.slow
def test_legacy_tokenizer_checkpoint_resumes_exactly_and_exports(tmp_path):
    images = tmp_path / "images"
    write_tiny_images(images, classes=2, per_class=12)  # the fixture's images (seed 0)
    run_dir = tmp_path / "legacy"
    uri = copy_legacy_run("tokenizer", run_dir)
    base = ["train-tokenizer", "--config", str(TOKENIZER_TINY), "--nproc", "2", f"data.train={images}", *TOKENIZER_OVERRIDES]
    resumed = cli(*base, f"run.dir={run_dir}", f"tracking.uri={uri}")
    ok(resumed)
    assert "resumed from step_00000002 at step 2" in resumed.stderr
    whole_dir = tmp_path / "whole"
    ok(cli(*base, f"run.dir={whole_dir}", f"tracking.uri=sqlite:///{tmp_path / 'whole.db'}"))
    for sub in ("", "discriminator"):  # the VQVAE, then the discriminator (the GAN trains steps 3 and 4)
        assert_same_weights(saved_weights(whole_dir, 4, sub), saved_weights(run_dir, 4, sub))
    # the codebook statistics came through the version-1 rank files: equal to the uninterrupted run's
    new = torch.load(run_dir / "checkpoints" / "step_00000004" / "rank_00000.pt", weights_only=True)
    whole = torch.load(whole_dir / "checkpoints" / "step_00000004" / "rank_00000.pt", weights_only=True)
    assert new["version"] == RUN_STATE_VERSION and torch.equal(new["task"]["codebook"]["ema"], whole["task"]["codebook"]["ema"])
    out = tmp_path / "export"
    ok(cli("export", str(LEGACY / "tokenizer"), "--tag", "step_00000002", "--out", str(out)))
    from mvar_dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer.safetensors")
    assert tokenizer.vocab_size == 16
    usage = torch.load(out / "vae.pth", weights_only=True)["quantize.ema_vocab_hit_SV"]
    assert usage.shape == (4, 16) and float(usage.sum()) > 0
