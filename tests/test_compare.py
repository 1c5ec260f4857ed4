"""``mvar-dist compare`` on two runs in a temporary MLflow sqlite store."""

from __future__ import annotations


import pytest
from PIL import Image

from mvar_dist.cli import main as cli_main
from mvar_dist.tracking.compare import compare, higher_is_better, value_at


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs 'short' (steps 0..4, every step) and 'long' (steps 0..8, every 2 steps)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("exp")
    client.create_experiment("other")

    def log(name: str, steps: range, loss, batch: int) -> str:
        run = client.create_run(experiment, run_name=name)
        metrics = []
        for step in steps:
            values = {
                "train/loss": loss(step), "train/acc/mean": 10.0 * step, "tokens_per_s": 100.0 + step,
                "peak_memory_mb": 500.0, "train/loss/scale_0": loss(step) + 1, "train/loss/scale_1": loss(step) + 2,
            }
            metrics += [Metric(k, v, 1000 + step, step) for k, v in values.items()]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.log_param(run.info.run_id, "train.global_batch_size", str(batch))
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    log("short", range(0, 5), lambda s: 5.0 - s, 8)          # loss 5,4,3,2,1
    log("long", range(0, 9, 2), lambda s: 10.0 - s / 2, 16)  # loss 10,9,8,7,6 at steps 0,2,4,6,8
    return uri


def test_rows_hold_final_best_and_equal_step_values(store, tmp_path):
    table, rows, plots = compare("exp", None, ["train/loss", "train/acc/mean"], store, tmp_path / "out")
    by = {(r.metric, r.run): r for r in rows}
    short, long = by[("train/loss", "short")], by[("train/loss", "long")]
    assert (short.last_step, short.final, short.best, short.rule) == (4, 1.0, 1.0, "min")
    assert (long.last_step, long.final, long.best) == (8, 6.0, 6.0)
    # the largest step both runs reached is 4
    assert short.equal_step == long.equal_step == 4
    assert (short.at_equal_step, long.at_equal_step) == (1.0, 8.0)
    acc = by[("train/acc/mean", "long")]
    assert (acc.best, acc.rule, acc.at_equal_step) == (80.0, "max", 40.0)

    assert "| train/loss | long | 8 | 6 | 6 | min | 4 | 8 |" in table.splitlines()
    assert (tmp_path / "out" / "table.md").read_text().strip() == table
    names = {p.name for p in plots}
    assert {"metrics.png", "loss_per_scale_vs_step.png", "loss_per_scale_vs_images.png", "throughput.png", "memory.png"} <= names
    for path in plots:
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100


def test_runs_can_be_chosen_by_name_or_id(store, tmp_path):
    _, rows, _ = compare("exp", ["long"], ["train/loss"], store, None)
    assert [r.run for r in rows] == ["long"] and rows[0].equal_step == 8
    with pytest.raises(ValueError, match="no run 'nope'.*short"):
        compare("exp", ["nope"], None, store, None)


def test_cli_prints_the_table_and_reports_missing_things(store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli_main(["compare", "--experiment", "exp", "--tracking-uri", store, "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| train/loss | short | 4 | 1 | 1 | min | 4 | 1 |" in out  # default metrics include train/loss
    assert "tokens_per_s" in out and "val/loss" not in out  # defaults that were not logged are left out

    assert cli_main(["compare", "--experiment", "missing", "--tracking-uri", store, "--no-plots"]) == 2
    assert "experiment 'missing' does not exist" in (err := capsys.readouterr().err) and "'exp'" in err and "'other'" in err

    assert cli_main(["compare", "--experiment", "exp", "--tracking-uri", store, "--metrics", "val/loss", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "['val/loss'] were not logged" in err and "train/loss/scale_1" in err

    assert cli_main(["compare", "--experiment", "exp", "--run-dir", str(tmp_path / "nowhere"), "--no-plots"]) == 2
    assert "no MLflow database" in capsys.readouterr().err


def test_best_rule_and_value_lookup():
    assert higher_is_better("train/acc/mean") and higher_is_better("tokens_per_s")
    assert not higher_is_better("val/loss") and not higher_is_better("peak_memory_mb")
    history = [(0, 1.0), (10, 2.0), (20, 3.0)]
    assert (value_at(history, 15), value_at(history, 20), value_at(history, -1)) == (2.0, 3.0, None)
