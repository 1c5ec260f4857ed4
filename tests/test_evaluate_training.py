"""FID during training (``eval.fid_every_steps``): logged at its steps exactly once, also across
a kill and a stop signal, without changing what training computes (bitwise), under ZeRO-2 and
ZeRO-3; its files are checked before any rank starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import write_random_inception
from test_train import TINY, metric_history, model_states, ok, run_train

from mvar_dist.config import ConfigError, load_config, validate

FID_METRIC = "eval/fid_6"


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fid_files")
    reference = base / "reference.npz"
    rng = np.random.default_rng(0)
    # statistics of the right size; the images are not read for an FID during training
    np.savez(reference, arr_0=np.zeros((1, 8, 8, 3), np.uint8), mu=rng.normal(size=2048) * 0.1, sigma=np.eye(2048) * 0.05)
    return reference, write_random_inception(base / "inception.pth")


def fid_overrides(fid_files) -> list[str]:
    reference, inception = fid_files
    # 6 images in batches of 4: rank 0 draws batch 0 (4 images), rank 1 batch 1 (2)
    return ["eval.fid_every_steps=2", "eval.fid_samples=6", "eval.fid_batch_size=4",
            f"eval.fid_reference={reference}", f"eval.inception={inception}"]


def test_fid_files_are_checked_before_any_rank_starts(tiny_codes, fid_files, tmp_path, monkeypatch):
    reference, inception = fid_files
    monkeypatch.delenv("MVAR_DIST_INCEPTION", raising=False)
    base = tiny_codes.overrides(tmp_path / "run") + ["eval.fid_every_steps=2"]
    cases = [
        ([], "eval.fid_every_steps needs eval.fid_reference"),
        ([f"eval.fid_reference={tmp_path / 'none.npz'}"], "none.npz does not exist"),
        ([f"eval.fid_reference={reference}"], "MVAR_DIST_INCEPTION"),
        ([f"eval.fid_reference={reference}", f"eval.inception={tmp_path / 'none.pth'}"], "none.pth does not exist"),
        ([f"eval.fid_reference={reference}", f"eval.inception={inception}", "eval.fid_samples=1"], "eval.fid_samples must be >= 2"),
    ]
    no_stats = tmp_path / "images_only.npz"
    np.savez(no_stats, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    cases.append(([f"eval.fid_reference={no_stats}", f"eval.inception={inception}"], "has no mu/sigma"))
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(load_config(TINY, base + extra), 2)
    validate(load_config(TINY, base + [f"eval.fid_reference={reference}", f"eval.inception={inception}"]), 2)


@pytest.mark.slow
def test_fid_is_logged_once_per_step_across_kill_and_stop_and_changes_no_weight(tiny_codes, fid_files, tmp_path):
    steps = ["train.total_steps=5", "checkpoint.every_steps=2"]
    fid = fid_overrides(fid_files)
    ok(run_train(tiny_codes, tmp_path / "plain", *steps))
    ok(run_train(tiny_codes, tmp_path / "whole", *steps, *fid))
    killed = run_train(tiny_codes, tmp_path / "killed", *steps, *fid, "debug.kill_after_checkpoint_step=2")
    assert killed.returncode != 0
    ok(run_train(tiny_codes, tmp_path / "killed", *steps, *fid))
    # a stop signal during step 4, where an FID is due: the checkpoint comes first, the resumed run scores it
    stopped = run_train(tiny_codes, tmp_path / "stopped", *steps, *fid, "debug.stop_at_step=4")
    assert metric_history(tmp_path / "stopped", FID_METRIC) == metric_history(tmp_path / "whole", FID_METRIC)[:1], stopped.stderr[-2000:]
    ok(run_train(tiny_codes, tmp_path / "stopped", *steps, *fid))

    plain = model_states(tmp_path / "plain", 5)["module"]
    for run in ("whole", "killed", "stopped"):
        weights = model_states(tmp_path / run, 5)["module"]
        assert all(torch.equal(plain[k], weights[k]) for k in plain), run  # scoring takes nothing from training
    expected = metric_history(tmp_path / "whole", FID_METRIC)
    assert [s for s, _ in expected] == [2, 4, 5] and all(np.isfinite(v) and v > 0 for _, v in expected)
    for run in ("killed", "stopped"):
        assert metric_history(tmp_path / run, FID_METRIC) == expected, run  # once per step, the same values
    assert metric_history(tmp_path / "whole", "train/loss") == metric_history(tmp_path / "plain", "train/loss")


@pytest.mark.slow
def test_zero3_gathers_the_weights_and_scores_like_zero2(tiny_codes, fid_files, tmp_path):
    steps = ["train.total_steps=2", *fid_overrides(fid_files)]
    ok(run_train(tiny_codes, tmp_path / "zero2", *steps))
    result = run_train(tiny_codes, tmp_path / "zero3", "deepspeed.template=zero3", *steps)
    ok(result)
    zero2, zero3 = metric_history(tmp_path / "zero2", FID_METRIC), metric_history(tmp_path / "zero3", FID_METRIC)
    assert [s for s, _ in zero3] == [2] and np.isfinite(zero3[0][1])
    # the same model scored from gathered shards: close to ZeRO-2's (the optimizers' rounding may differ)
    assert zero3[0][1] == pytest.approx(zero2[0][1], rel=0.05)
