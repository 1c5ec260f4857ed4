"""Stops and schedules under faults: the lr follows the step count when steps are skipped, the
non-finite streak survives a resume, and a stop checkpoints before a due evaluation (which then
runs on resume, once). Real 2-rank training through the CLI."""

from __future__ import annotations

import pytest
from test_train import TINY, latest_step, metric_history, ok, run_train

from mvar_dist.config import load_config
from mvar_dist.training.schedule import lr_factor


@pytest.mark.slow
def test_lr_follows_the_step_count_through_skipped_steps(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["train.total_steps=8", "optim.warmup_steps=2", "debug.nonfinite_loss_steps=[2,3]"]
    ok(run_train(tiny_codes, run_dir, *overrides))
    config = load_config(TINY, tiny_codes.overrides(run_dir) + overrides)
    logged = dict(metric_history(run_dir, "lr"))
    expected = {step: config.peak_lr * lr_factor(step - 1, config) for step in range(1, 9)}
    assert logged.keys() == expected.keys()
    assert all(abs(logged[s] - expected[s]) <= 1e-12 for s in expected), (logged, expected)
    # the optimizer really used it: the final lr is the schedule's last value, not 2 steps behind
    assert logged[8] == pytest.approx(config.peak_lr * config.optim.final_lr_ratio)


@pytest.mark.slow
def test_the_non_finite_streak_survives_a_resume(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    common = ["debug.nonfinite_loss_steps=[2,3,4]", "train.max_consecutive_nonfinite=3", "checkpoint.every_steps=1"]
    ok(run_train(tiny_codes, run_dir, "train.total_steps=3", *common))  # steps 2, 3 non-finite, then ends
    result = run_train(tiny_codes, run_dir, "train.total_steps=6", *common)
    assert result.returncode != 0  # step 4 is the third non-finite step in a row
    assert "3 consecutive steps had a non-finite loss" in result.stderr
    assert latest_step(run_dir) == 4


@pytest.mark.slow
def test_a_stop_checkpoints_before_the_due_evaluation_which_runs_once_on_resume(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    evaluation = ["train.val_every_steps=2", f"data.val_manifest={tiny_codes.manifest}", "sample.every_steps=2",
                  "checkpoint.every_steps=100"]
    stopped = run_train(tiny_codes, run_dir, "train.total_steps=6", *evaluation, "debug.stop_at_step=4")
    ok(stopped)
    assert "stopping on debug.stop_at_step at step 4" in stopped.stderr
    assert latest_step(run_dir) == 4
    saved = stopped.stderr.index("saved checkpoint")
    assert "step 4: val/loss" not in stopped.stderr[:saved]  # nothing ran between the stop and the checkpoint
    assert [s for s, _ in metric_history(run_dir, "val/loss")] == [2]

    resumed = run_train(tiny_codes, run_dir, "train.total_steps=6", *evaluation)
    ok(resumed)
    assert [s for s, _ in metric_history(run_dir, "val/loss")] == [2, 4, 6]  # step 4's ran on resume, once

    from mlflow import MlflowClient

    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    grids = {a.path for a in MlflowClient(record.tracking_uri).list_artifacts(record.run_id, "samples")}
    assert grids == {f"samples/step_{s:07d}.png" for s in (2, 4, 6)}


def test_validation_shards_with_another_class_list_are_refused(tiny_codes, tmp_path):
    import json

    manifest = json.loads(tiny_codes.manifest.read_text())
    manifest["classes"][1] = "not_class1"  # same count, another class at index 1: labels would shift
    shifted = tiny_codes.manifest.with_name("shifted_val.json")
    shifted.write_text(json.dumps(manifest))
    try:
        result = run_train(tiny_codes, tmp_path / "run", "train.val_every_steps=2", f"data.val_manifest={shifted}",
                           nproc=0)
    finally:
        shifted.unlink()
    assert result.returncode == 2
    assert "index 1" in result.stderr and "not_class1" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_on_shards_with_another_sample_count_is_refused_in_one_line(tiny_codes, tmp_path):
    """data.train_manifest may move on resume, but the loader's position only means something for
    the same samples: other shards are refused with the reason, not a traceback."""
    import torch
    from conftest import TINY_TOKENIZER, write_tiny_images

    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    tokenizer = MultiScaleVQVAE(**TINY_TOKENIZER)
    tokenizer.load_state_dict(torch.load(tiny_codes.tokenizer, weights_only=True))
    write_tiny_images(tmp_path / "images", 4, 5, seed=2)  # same classes, 20 samples instead of 48
    source = sources.list_class_folder(tmp_path / "images")
    shard_dataset(source, tmp_path / "other", tokenizer, name="tiny", split="train", shard_size=8, batch_size=64,
                  progress=False)
    other = merge_manifest(tmp_path / "other", "train")
    run_dir = tmp_path / "run"
    ok(run_train(tiny_codes, run_dir, "train.total_steps=2", "checkpoint.every_steps=2", nproc=0))
    result = run_train(tiny_codes, run_dir, "train.total_steps=4", f"data.train_manifest={other}", nproc=0)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "cannot resume" in result.stderr and "20 samples" in result.stderr
    assert latest_step(run_dir) == 2
