"""MLflow tracking: params, tags, artifacts and exactly one metric value per step across resumes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from mvar_dist.tracking import (
    LOGGED_THROUGH_TAG,
    NullTracker,
    RunTracker,
    flatten_config,
    read_run_record,
    resolve_tracking_uri,
)
from mvar_dist.tracking.mlflow_run import MAX_PARAM_VALUE_LENGTH

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

CONFIG = {
    "model": {"depth": 2, "patch_nums": [1, 2, 3], "embed_dim": None},
    "optim": {"betas": (0.9, 0.95), "lr": 1e-3},
    "data": {"shards": "x" * 7000, "extra": {}},
    "run": {"dir": "runs/a"},
}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables costs seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _tracker(tmp_path: Path, uri: str, run_id: str | None = None, **kwargs) -> RunTracker:
    kwargs.setdefault("system_metrics", False)
    tracker = RunTracker.create(CONFIG, tmp_path / "run", uri, "test-tracking", run_id, 0, **kwargs)
    assert isinstance(tracker, RunTracker)
    return tracker


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_flatten_config_joins_keys_and_respects_param_limit():
    flat = flatten_config(CONFIG)
    assert flat["model.depth"] == "2"
    assert flat["model.patch_nums"] == "[1, 2, 3]"
    assert flat["model.embed_dim"] == "None"
    assert flat["optim.betas"] == "[0.9, 0.95]"
    assert flat["data.extra"] == "{}"
    assert len(flat["data.shards"]) == MAX_PARAM_VALUE_LENGTH and flat["data.shards"].endswith("...")


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///a.db", tmp_path) == "sqlite:///a.db"


def test_new_run_records_params_config_and_tags(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    tracker = _tracker(tmp_path, tracking_uri)
    tracker.set_tags({"phase": "pretrain"})
    tracker.finish()

    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == flatten_config(CONFIG)
    tags = run.data.tags
    assert (tags["slurm_job_id"], tags["slurm_requeue_count"]) == ("4242", "0")
    assert (tags["world_size"], tags["hosts"], tags["phase"]) == ("8", "gpu[01-02]", "pretrain")
    from mvar_dist import __version__

    assert tags["mvar_dist_version"] == __version__
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:  # the tests run from a checkout
        assert tags["git_commit"] == git.stdout.strip()
    assert run.info.status == "FINISHED"

    saved = yaml.safe_load(Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))).read_text())
    assert saved["model"] == CONFIG["model"] and saved["optim"]["betas"] == [0.9, 0.95]
    record = read_run_record(tmp_path / "run")
    assert record.run_id == tracker.run_id and record.tracking_uri == tracking_uri
    assert record.experiment_id == run.info.experiment_id


def test_resume_gives_exactly_one_value_per_step(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = _tracker(tmp_path, tracking_uri, flush_every=4, flush_seconds=None)
    for step in range(1, 14):
        first.log_metrics({"train/loss_s9": 10.0 + step, "lr": 0.1}, step)
        if step == 5:
            first.flush()  # the trainer checkpoints at step 5, then flushes
    # killed at step 13: no finish(); some steps after the checkpoint reached MLflow, some did not
    client = MlflowClient(tracking_uri)
    sent = _steps(client, first.run_id, "train/loss_s9")
    assert 5 < sent[-1] < 13 and sent == list(range(1, sent[-1] + 1))

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = _tracker(tmp_path, tracking_uri, run_id=first.run_id, flush_every=4, flush_seconds=None)
    assert second.run_id == first.run_id
    for step in range(6, 21):  # resumed from the step-5 checkpoint
        second.log_metrics({"train/loss_s9": 20.0 + step, "lr": 0.1}, step)
    second.finish()

    for key in ("train/loss_s9", "lr"):
        assert _steps(client, first.run_id, key) == list(range(1, 21))
    values = {m.step: m.value for m in client.get_metric_history(first.run_id, "train/loss_s9")}
    assert values[sent[-1]] == 10.0 + sent[-1] and values[20] == 40.0
    run = client.get_run(first.run_id)
    assert run.data.tags["slurm_requeue_count"] == "1"
    assert run.data.tags[LOGGED_THROUGH_TAG] == "20"
    assert run.info.status == "FINISHED"


def test_failed_batches_stay_queued_and_are_retried(tmp_path, tracking_uri):
    tracker = _tracker(tmp_path, tracking_uri, flush_every=None, flush_seconds=None)
    real_log_batch = tracker._client.log_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("tracking server unreachable")
        return real_log_batch(*args, **kwargs)

    tracker._client.log_batch = flaky
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.flush()  # fails, keeps step 1
    tracker.log_metrics({"loss": 2.0}, 2)
    tracker.finish()
    assert _steps(MlflowClient(tracking_uri), tracker.run_id, "loss") == [1, 2]


def test_step_wider_than_one_batch(tmp_path, tracking_uri):
    tracker = _tracker(tmp_path, tracking_uri)
    tracker.log_metrics({f"probe/{i}": float(i) for i in range(1200)}, 3)
    tracker.finish()
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    probes = {k: v for k, v in run.data.metrics.items() if k.startswith("probe/")}
    assert len(probes) == 1200 and probes["probe/1199"] == 1199.0


def test_log_image_and_artifact(tmp_path, tracking_uri):
    from PIL import Image

    tracker = _tracker(tmp_path, tracking_uri)
    image = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    tracker.log_image(image, "samples/step_10.png")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, "notes")
    with pytest.raises(ValueError, match="uint8"):
        tracker.log_image(image.astype(np.float32), "x.png")
    tracker.finish()
    client = MlflowClient(tracking_uri)
    out = tmp_path / "download"
    out.mkdir()
    png = client.download_artifacts(tracker.run_id, "samples/step_10.png", str(out))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)
    assert Path(client.download_artifacts(tracker.run_id, "notes/note.txt", str(out))).read_text() == "hello"


def test_exception_marks_run_failed(tmp_path, tracking_uri):
    with pytest.raises(RuntimeError):
        with _tracker(tmp_path, tracking_uri) as tracker:
            tracker.log_metrics({"loss": 1.0}, 1)
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert _steps(client, tracker.run_id, "loss") == [1]


def test_other_ranks_get_a_no_op_tracker(tmp_path):
    tracker = RunTracker.create(CONFIG, tmp_path / "run", "sqlite:///never.db", "x", None, rank=3)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_image(np.zeros((2, 2, 3), np.uint8), "a.png")
    tracker.set_tags({"a": 1})
    tracker.flush()
    tracker.finish("FAILED")
    assert not (tmp_path / "run").exists() and not Path("never.db").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_against_a_real_mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded machine takes minutes
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)

        first = _tracker(tmp_path, uri, flush_every=2, flush_seconds=None)
        for step in range(1, 8):
            first.log_metrics({"train/loss": float(step)}, step)
        first.log_image(np.full((4, 4, 3), 200, np.uint8), "samples/a.png")
        second = _tracker(tmp_path, uri, run_id=first.run_id)  # resumed from step 3
        for step in range(4, 11):
            second.log_metrics({"train/loss": float(step)}, step)
        second.finish()

        client = MlflowClient(uri)
        assert _steps(client, first.run_id, "train/loss") == list(range(1, 11))
        assert client.get_run(first.run_id).data.params == flatten_config(CONFIG)
        artifacts = {a.path for a in client.list_artifacts(first.run_id)}
        assert {"config.yaml", "samples"} <= artifacts
        assert read_run_record(tmp_path / "run").tracking_uri == uri
    finally:  # the server runs uvicorn in a child process: stop the whole group we started
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_system_metrics_are_logged_when_psutil_is_present(tmp_path, tracking_uri, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracker = _tracker(tmp_path, tracking_uri, system_metrics=True)
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
    while not any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
        assert time.monotonic() < deadline, "no system/ metrics were logged"
        time.sleep(0.5)
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_resume_of_a_run_missing_from_the_store_starts_a_new_one(tmp_path, tracking_uri):
    tracker = _tracker(tmp_path, tracking_uri, run_id="0123456789abcdef0123456789abcdef")
    tracker.log_metrics({"loss": 1.0}, 7)
    tracker.finish()
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert run.data.tags["resumed_from_missing_run_id"] == "0123456789abcdef0123456789abcdef"
    assert run.data.params == flatten_config(CONFIG)


def test_artifacts_of_a_sqlite_store_live_beside_it(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the command ran in, shared by unrelated runs."""
    store = tmp_path / "store"
    store.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracker = _tracker(tmp_path, f"sqlite:///{store / 'mlflow.db'}")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, "notes")
    tracker.finish()
    assert list(elsewhere.iterdir()) == []
    assert [p.read_text() for p in (store / "mlartifacts").rglob("note.txt")] == ["hello"]
