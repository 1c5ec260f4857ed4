"""``mvar-dist evaluate``: reading samples and reference batches, the five metrics end to end
with an Inception weights file in the standard layout (random values made here), ranks that
split the work without changing the result, the reference cache, reruns, MLflow, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sample_cli import patch_export  # noqa: F401  (fixture: a tiny export with a patch tokenizer)
from test_slurm import needs_cluster, wait_for_job

from mvar_dist.cli import main as cli_main
from mvar_dist.evaluation.features import Features
from mvar_dist.evaluation.image_batches import read_npz_images, read_reference
from mvar_dist.evaluation.inception import load_inception, random_inception_state
from mvar_dist.evaluation.metrics import adm_metrics
from mvar_dist.evaluation.statistics import feature_statistics, frechet_distance

NUM_SAMPLES, NUM_REFERENCE, SIZE = 24, 20, 16
REPO = Path(__file__).resolve().parent.parent


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """A weights file in the converted Inception's layout with random values."""
    torch.save(random_inception_state(seed), path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return write_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth")


def images(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 1, 1, 3))  # a colour per image, plus texture: features spread out
    return np.clip(base + rng.integers(-40, 40, (count, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    np.savez(path, arr_0=images(NUM_REFERENCE, seed=1))
    return path


def evaluate(*args: str) -> int:
    return cli_main(["evaluate", "--no-progress", "--device", "cpu", *args])


def one_thread_env(**extra: str) -> dict[str, str]:
    # features of a batch are bitwise equal across processes only at the same thread count
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvar_dist", "evaluate", "--no-progress", "--device", "cpu", *args],
                          capture_output=True, text=True, env=env or one_thread_env(), timeout=600)


# ----- reading the files -----


def test_samples_are_memory_mapped_when_stored_and_read_whole_when_compressed(tmp_path):
    data = images(5, seed=0)
    np.savez(tmp_path / "stored.npz", arr_0=data)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=data)
    stored, compressed = read_npz_images(tmp_path / "stored.npz"), read_npz_images(tmp_path / "compressed.npz")
    assert isinstance(stored, np.memmap) and not isinstance(compressed, np.memmap)
    assert np.array_equal(stored, data) and np.array_equal(compressed, data)


def test_bad_sample_files_are_named(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "text.npz").write_text("not a zip")
    for name, message in (("floats.npz", "must be uint8"), ("other.npz", "has no arr_0"), ("text.npz", "is not an .npz")):
        with pytest.raises(ValueError, match=message) as error:
            read_npz_images(tmp_path / name)
        assert name in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_npz_images(tmp_path / "missing.npz")


def test_reference_statistics_are_read_as_stored_and_checked(tmp_path):
    mu, sigma = np.arange(2048.0), np.eye(2048) * 3
    np.savez(tmp_path / "ref.npz", arr_0=images(3, seed=0), mu=mu, sigma=sigma)
    reference = read_reference(tmp_path / "ref.npz")
    assert np.array_equal(reference.pool.mu, mu) and np.array_equal(reference.pool.sigma, sigma)
    assert reference.spatial is None
    np.savez(tmp_path / "bad.npz", arr_0=images(3, seed=0), mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match="bad.npz.*not"):
        read_reference(tmp_path / "bad.npz")


def test_metrics_use_the_reference_statistics_when_it_has_them(tmp_path):
    rng = np.random.default_rng(0)
    samples = Features(rng.normal(size=(40, 2048)), rng.normal(size=(40, 2023)), rng.dirichlet(np.ones(1008), 40))
    reference = Features(rng.normal(size=(30, 2048)) + 1, rng.normal(size=(30, 2023)), rng.dirichlet(np.ones(1008), 30))
    computed = adm_metrics(samples, reference)
    assert computed["fid"] == pytest.approx(frechet_distance(feature_statistics(samples.pool), feature_statistics(reference.pool)))
    stored_mu = np.full(2048, 5.0)
    np.savez(tmp_path / "ref.npz", arr_0=images(3, seed=0), mu=stored_mu, sigma=np.eye(2048))
    stored = adm_metrics(samples, reference, read_reference(tmp_path / "ref.npz"))
    from mvar_dist.evaluation.statistics import FeatureStatistics

    assert stored["fid"] == pytest.approx(frechet_distance(feature_statistics(samples.pool), FeatureStatistics(stored_mu, np.eye(2048))))
    assert stored["sfid"] == computed["sfid"]  # no mu_s/sigma_s stored: computed from the reference images
    assert stored["precision"] == computed["precision"] and stored["recall"] == computed["recall"]


# ----- end to end -----


@pytest.mark.slow
def test_samples_file_is_scored_the_same_by_one_and_two_ranks(inception_file, reference_file, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(NUM_SAMPLES, seed=2))
    common = ["--samples", str(samples), "--ref", str(reference_file), "--inception", str(inception_file),
              "--feature-batch-size", "5"]
    one = run_cli(*common, "--out", str(tmp_path / "one.json"), "--cache-dir", str(tmp_path / "cache1"))
    assert one.returncode == 0, one.stderr
    two = run_cli(*common, "--out", str(tmp_path / "two.json"), "--cache-dir", str(tmp_path / "cache2"), "--nproc", "2")
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert first["metrics"] == second["metrics"]  # bitwise: the same batches, computed the same way
    assert first["world_size"] == 1 and second["world_size"] == 2
    assert first["num_samples"] == NUM_SAMPLES and first["num_reference"] == NUM_REFERENCE
    assert set(first["metrics"]) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(np.isfinite(v) for v in first["metrics"].values()) and first["metrics"]["fid"] > 0
    assert first["table"] in one.stdout and "FID" in first["table"]
    assert not (tmp_path / "one.json.parts").exists()  # the samples' parts go once the report is written

    # the metrics are those of the network's features, computed here in one process
    network = load_inception(inception_file)
    with torch.no_grad():
        sample_features = network(torch.from_numpy(images(NUM_SAMPLES, seed=2)))
        reference_features = network(torch.from_numpy(images(NUM_REFERENCE, seed=1)))
    expected = adm_metrics(Features(*(t.numpy() for t in sample_features)), Features(*(t.numpy() for t in reference_features)))
    for name, value in expected.items():
        assert first["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-6), name


@pytest.mark.slow
def test_an_export_is_sampled_kept_and_scored_alike_by_one_and_two_ranks(patch_export, inception_file, reference_file, tmp_path):  # noqa: F811
    model_dir, tokenizer = patch_export
    common = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--num", "20", "--batch-size", "3",
              "--seed", "7", "--ref", str(reference_file), "--inception", str(inception_file),
              "--cache-dir", str(tmp_path / "cache")]
    one = run_cli(*common, "--out", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    two = run_cli(*common, "--out", str(tmp_path / "two.json"), "--nproc", "2")
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert first["metrics"] == second["metrics"]
    kept_one, kept_two = read_npz_images(tmp_path / "one.npz"), read_npz_images(tmp_path / "two.npz")
    assert np.array_equal(kept_one, kept_two) and kept_one.shape == (20, 8, 8, 3)
    # the same images as `mvar-dist sample --npz` with the same seed and batch size
    assert cli_main(["sample", "--no-progress", "--device", "cpu", "--model", str(model_dir), "--tokenizer", str(tokenizer),
                     "--npz", "--num", "20", "--batch-size", "3", "--seed", "7", "--out", str(tmp_path / "sampled.npz")]) == 0
    assert np.array_equal(read_npz_images(tmp_path / "sampled.npz"), kept_one)
    assert first["sampling"] == {"cfg": 1.5, "top_k": 8, "top_p": 0.9} and first["seed"] == 7
    # the reference's features were computed once and then read from the cache
    cached = sorted((tmp_path / "cache" / "reference_features").glob("*/reference_*.npz"))
    assert len(cached) == 1  # 20 reference images, one feature batch, shared by both runs


def test_reference_features_are_cached_and_parts_of_other_inputs_discarded(inception_file, reference_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(6, seed=3, size=8))
    out, cache = tmp_path / "report.json", tmp_path / "cache"
    stale = tmp_path / "report.json.parts"
    stale.mkdir()
    (stale / "samples_000000.npz").write_bytes(b"parts of another evaluation")
    (stale / "inputs.json").write_text("{}")
    args = ["--samples", str(samples), "--ref", str(reference_file), "--inception", str(inception_file),
            "--feature-batch-size", "3", "--cache-dir", str(cache), "--out", str(out)]
    assert evaluate(*args) == 0
    assert torch.is_grad_enabled()  # called in-process (a script, a test): no global state left behind
    first = json.loads(out.read_text())
    parts = sorted((cache / "reference_features").glob("*/reference_*.npz"))
    assert len(parts) == -(-NUM_REFERENCE // 3)
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert evaluate(*args) == 0  # the second run reads the reference's parts, writes none
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    assert json.loads(out.read_text())["metrics"] == first["metrics"]
    assert first["reference_statistics"] == "computed"  # this reference batch has no mu/sigma


def test_metrics_go_to_the_runs_mlflow_run(inception_file, reference_file, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mvar_dist.tracking.run_record import RunRecord, write_run_record

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("evaluate", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_record(run_dir, RunRecord(uri, experiment, run.info.run_id))
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(6, seed=3, size=8))
    assert evaluate("--samples", str(samples), "--ref", str(reference_file), "--inception", str(inception_file),
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"),
                    "--run", str(run_dir), "--step", "1234") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    for name, value in report["metrics"].items():
        history = client.get_metric_history(run.info.run_id, f"eval/{name}")
        assert [(m.step, m.value) for m in history] == [(1234, pytest.approx(value))]
    assert client.get_run(run.info.run_id).data.tags["mvar_dist.evaluation.num_samples"] == "6"


def test_input_errors_are_one_line_before_any_work(inception_file, reference_file, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MVAR_DIST_INCEPTION", raising=False)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(4, seed=3, size=8))
    base = ["--samples", str(samples), "--ref", str(reference_file), "--out", str(tmp_path / "r.json")]
    assert evaluate(*base) == 2
    assert "MVAR_DIST_INCEPTION" in capsys.readouterr().err
    assert evaluate(*base, "--inception", str(tmp_path / "nowhere.pth")) == 2
    assert "nowhere.pth" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    state = torch.load(inception_file, weights_only=True)
    state["Mixed_6d.branch1x1.conv.weight"] = torch.zeros(3, 3)
    torch.save(state, broken)
    assert evaluate(*base, "--inception", str(broken)) == 2
    assert "Mixed_6d.branch1x1.conv.weight" in capsys.readouterr().err
    assert evaluate(*base, "--inception", str(inception_file), "--num", "10") == 2
    assert "only apply with --model" in capsys.readouterr().err
    assert evaluate("--samples", str(samples), "--ref", str(tmp_path / "noref.npz"), "--inception", str(inception_file),
                    "--out", str(tmp_path / "r.json")) == 2
    assert "noref.npz" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with zipfile.ZipFile(samples) as archive:
        assert archive.namelist() == ["arr_0.npy"]  # the input is untouched


@needs_cluster
@pytest.mark.slow
def test_the_sbatch_script_splits_the_work_over_srun_tasks(patch_export, inception_file, reference_file, tmp_path):  # noqa: F811
    """slurm/evaluate.sbatch on the local cluster with 2 CPU tasks: the same report as one process."""
    model_dir, tokenizer = patch_export
    common = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--num", "10", "--batch-size", "3",
              "--ref", str(reference_file), "--inception", str(inception_file), "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu"]
    alone = run_cli(*common, "--out", str(tmp_path / "alone.json"))
    assert alone.returncode == 0, alone.stderr
    env = one_thread_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", f"--chdir={tmp_path}", str(REPO / "slurm" / "evaluate.sbatch"), *common,
         "--out", str(tmp_path / "job.json")],
        capture_output=True, text=True, env=env, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = wait_for_job(job_id)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*"))
    assert state == "COMPLETED", logs[-3000:]
    job, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("job", "alone"))
    assert job["world_size"] == 2 and job["metrics"] == single["metrics"]
