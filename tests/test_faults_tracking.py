"""Tracking never takes training down: a tracking server that dies mid-run, one that accepts
connections and never answers, errors at the end of a run, and a run killed before its first
checkpoint. Real servers on loopback, real 2-rank training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, SilentServer
from test_train import REPO, RUN_TIMEOUT, latest_step, ok, run_train, train_command

from mvar_dist.tracking import LOGGED_THROUGH_TAG, RunTracker, read_run_record

SIGNAL_WINDOW_S = 120  # what Slurm gives a job between USR2 and the kill (launch.signal_delay_s)


def _env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _wait_for(condition, process: subprocess.Popen | None, what: str, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout  # a guard against hanging, not a timing assertion
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training ended before {what}:\n{process.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _logged_through(uri: str, run_dir: Path) -> int:
    from mlflow import MlflowClient

    record = read_run_record(run_dir)
    if record is None:
        return -1
    try:
        return int(MlflowClient(uri).get_run(record.run_id).data.tags.get(LOGGED_THROUGH_TAG, -1))
    except Exception:
        return -1


def _history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _last_run_state(run_dir: Path) -> dict:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / tag / "run_state.json").read_text())


@pytest.mark.slow
def test_server_dies_mid_run_training_finishes_and_metrics_arrive_once_on_resume(tiny_codes, tmp_path):
    server = MlflowServer(tmp_path).start()
    run_dir = tmp_path / "run"
    steps = 12
    overrides = (f"tracking.uri={server.uri}", f"train.total_steps={steps}", "checkpoint.every_steps=3")
    proc = subprocess.Popen(train_command(tiny_codes, run_dir, *overrides), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # the tracker sends every 10 steps or at a checkpoint: wait for the first checkpoint's metrics
        _wait_for(lambda: _logged_through(server.uri, run_dir) >= 3, proc, "metrics in MLflow")
        server.stop()
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert latest_step(run_dir) == steps  # checkpoints kept coming on schedule
    undelivered = _last_run_state(run_dir)["undelivered_metrics"]
    assert undelivered and max(int(s) for s in undelivered) == steps  # kept, not dropped
    assert "could not be sent" in stderr

    # the server is back: running the same command again delivers what was kept, exactly once
    with server.start():
        ok(run_train(tiny_codes, run_dir, *overrides))
        record = read_run_record(run_dir)
        assert _history(server.uri, record.run_id, "train/loss") == list(range(1, steps + 1))
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        assert len(client.search_runs([record.experiment_id])) == 1
        assert client.get_run(record.run_id).info.status == "FINISHED"
        # the checkpoint still lists them; resuming again must not send them twice
        ok(run_train(tiny_codes, run_dir, *overrides))
        assert _history(server.uri, record.run_id, "train/loss") == list(range(1, steps + 1))


@pytest.mark.slow
def test_a_server_that_never_answers_does_not_stop_training_or_the_stop(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    with SilentServer() as silent:
        command = train_command(tiny_codes, run_dir, f"tracking.uri={silent.uri}", "train.total_steps=100000",
                                "checkpoint.every_steps=2")
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), proc, "the first checkpoint")
            first = latest_step(run_dir)
            _wait_for(lambda: latest_step(run_dir) > first, proc, "a second checkpoint")  # training goes on
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=SIGNAL_WINDOW_S)  # stopped inside the signal window
        finally:
            if proc.poll() is None:
                proc.kill()
        assert silent.connections > 0  # it did try the server
    assert proc.returncode == 0, stderr[-4000:]
    assert "stopping on SIGTERM" in stderr
    state = _last_run_state(run_dir)
    assert max(int(s) for s in state["undelivered_metrics"]) == state["step"]


def test_errors_at_the_end_of_a_run_are_reported_not_raised(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.create({"a": 1}, tmp_path / "run", uri, "end", None, 0, system_metrics=False)

    def down(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    tracker.log_metrics({"loss": 1.0}, 1)
    for name in ("log_batch", "set_terminated", "set_tag", "update_run", "log_artifact"):
        setattr(tracker._client, name, down)
    tracker.set_tags({"x": 1})  # must not raise
    tracker.finish("KILLED")  # must not raise
    assert tracker.undelivered() == {1: {"loss": 1.0}}
    assert "could not be sent" in caplog.text


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_continues_the_same_mlflow_run(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 24
    overrides = (f"tracking.uri={uri}", f"train.total_steps={steps}", "checkpoint.every_steps=1000")
    proc = subprocess.Popen(train_command(tiny_codes, run_dir, *overrides), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: _logged_through(uri, run_dir) >= 10, proc, "metrics of the first steps")
    os.killpg(proc.pid, signal.SIGKILL)  # a node crash: nothing runs after this
    proc.wait()
    assert not (run_dir / "checkpoints" / "latest").exists()
    first = read_run_record(run_dir)

    ok(run_train(tiny_codes, run_dir, *overrides))
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert read_run_record(run_dir).run_id == first.run_id
    assert len(client.search_runs([first.experiment_id])) == 1
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert _history(uri, first.run_id, "train/loss") == list(range(1, steps + 1))
