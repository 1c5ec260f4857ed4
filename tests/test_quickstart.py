"""``mvar-dist quickstart``: the embedded experiment, and the whole chain end to end (reduced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mvar_dist.config import config_from_dict, load_config
from mvar_dist.quickstart.experiment import IMAGE_SIZE, QuickstartPaths, experiment
from mvar_dist.quickstart.pipeline import GRID_ZOOM, NUM_CLASSES

REPO = Path(__file__).resolve().parent.parent


def test_configs_copy_is_the_embedded_experiment():
    written = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert written == experiment(QuickstartPaths(Path("runs/quickstart")), absolute=False)
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert config.tokenizer.kind == "patch" and config.data.hflip is False


@pytest.mark.parametrize("mode", ["mvar", "var"])
def test_embedded_experiment_builds_for_both_modes(tmp_path, mode):
    paths = QuickstartPaths(tmp_path / "qs")
    config = config_from_dict(experiment(paths, mode=mode, steps=20))
    assert config.model.mode == mode and config.train.total_steps == 20
    assert Path(config.run.dir) == paths.run_dir(mode).resolve()
    # both modes log into one store and experiment, so that `mvar-dist compare` sees them together
    assert config.tracking.uri == paths.tracking_uri and config.tracking.experiment == "quickstart"


@pytest.mark.parametrize("tokenizer_kind", ["patch", "vqvae"])
def test_a_rerun_with_more_steps_continues_the_same_experiment(tmp_path, tokenizer_kind):
    from mvar_dist.config import incompatible_keys

    paths = QuickstartPaths(tmp_path / "qs", tokenizer_kind)
    short, longer = experiment(paths, steps=4), experiment(paths, steps=300)  # warmups 0 and 50
    assert short["optim"]["warmup_steps"] != longer["optim"]["warmup_steps"]
    assert incompatible_keys(short, longer) == []
    assert incompatible_keys(short, experiment(paths, steps=4, seed=1)) == ["data.seed", "run.seed"]


def run_quickstart_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "mvar_dist", "quickstart", "--out", str(out), *args]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    from mvar_dist.model import MVAR

    out, steps, per_class = tmp_path / "qs", 4, 2
    args = ("--steps", str(steps), "--per-class", str(per_class), "--grid-per-class", str(per_class))
    result = run_quickstart_cli(out, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "judged accuracy of generated digits" in result.stdout
    assert summary["mlflow"]["ui_command"] in result.stdout
    # the FID in the judge's feature space, beside the accuracy: generated and real-vs-real floor
    for key in ("judged_fid", "real_fid_floor"):
        assert isinstance(summary[key], float) and summary[key] >= 0
    assert summary["real_fid_floor"] < summary["judged_fid"]  # 4 steps do not make real-looking digits
    fid_line = next(line for line in result.stdout.splitlines() if "FID in the judge's feature space" in line)
    assert f"{summary['judged_fid']:.3f}" in fid_line and f"{summary['real_fid_floor']:.3f}" in fid_line

    for key in ("judged_accuracy", "real_val_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["real_val_accuracy"] > 0.9  # the judge recognises real digits
    assert summary["judged_samples"] == NUM_CLASSES * per_class and summary["steps"] == steps
    assert summary["verified"]["samples"] == 1497

    cell = IMAGE_SIZE * GRID_ZOOM + 2  # compose_grid's default 2 px padding
    with Image.open(summary["grid"]) as grid:
        grid.load()
        assert grid.size == (per_class * cell + 2, NUM_CLASSES * cell + 2)
        pixels = np.asarray(grid.convert("L"))
    assert pixels[2:-2, 2:-2].std() > 10  # samples were drawn, not a blank canvas

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    run_id = summary["mlflow"]["run_id"]
    assert [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == list(range(1, steps + 1))
    judged = client.get_metric_history(run_id, "quality/judged_accuracy")
    assert [(m.step, m.value) for m in judged] == [(steps, summary["judged_accuracy"])]
    fid = client.get_metric_history(run_id, "quality/judged_fid")
    assert [(m.step, m.value) for m in fid] == [(steps, pytest.approx(summary["judged_fid"]))]

    # MLflow's artifacts (the run's config.yaml) stay under --out, not in ./mlruns of the cwd
    assert not (out.parent / "mlruns").exists()
    assert list((out / "mlartifacts").rglob("config.yaml"))

    model = MVAR.from_pretrained(summary["model_dir"])
    assert model.config.mode == "mvar" and model.config.num_classes == NUM_CLASSES

    # a rerun reuses every stage: same tokenizer file, no retraining, same MLflow run; a summary
    # written before the quickstart computed the FID gets it from the (same) samples
    tokenizer_mtime = Path(summary["tokenizer"]).stat().st_mtime_ns
    older = {k: v for k, v in summary.items() if k not in ("judged_fid", "real_fid_floor")}
    (out / "summary.json").write_text(json.dumps(older))
    again = run_quickstart_cli(out, *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already trained to step" in again.stderr
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["mlflow"]["run_id"] == run_id
    assert Path(rerun["tokenizer"]).stat().st_mtime_ns == tokenizer_mtime
    assert rerun["judged_accuracy"] == summary["judged_accuracy"]  # same export, same seed
    assert rerun["judged_fid"] == pytest.approx(summary["judged_fid"])
    assert rerun["real_fid_floor"] == pytest.approx(summary["real_fid_floor"])


def test_ranks_get_a_fixed_thread_count_whatever_the_machine(tmp_path, monkeypatch):
    """Results depend on the thread count (CPU reductions split by thread), so the quickstart's
    ranks get THREADS, not cores / ranks nor the caller's OMP_NUM_THREADS: the same figures on a
    2-core and on a 16-core machine."""
    from mvar_dist.quickstart import pipeline

    launched = {}
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setattr(pipeline, "launch", lambda nproc, command, env: launched.update(env) or 0)
    pipeline.train(tmp_path / "experiment.yaml", 2)
    assert launched["OMP_NUM_THREADS"] == "1"  # was cores / ranks, or the caller's: 8 here
    assert launched["MKL_NUM_THREADS"] == "1"


def test_the_quickstart_process_computes_with_the_fixed_thread_count(tmp_path, monkeypatch):
    """Its own torch work (tokenizer encode of the shards, the VQVAE's report, sampling, the judge)
    runs at THREADS too, and the caller's setting is restored afterwards."""
    import torch

    from mvar_dist.quickstart import pipeline

    seen = []

    def first_stage(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise pipeline.QuickstartError("stop after the first stage")

    monkeypatch.setattr(pipeline, "write_digits_image_folder", first_stage)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(pipeline.QuickstartError, match="first stage"):
            pipeline.run_quickstart(tmp_path / "qs")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
