"""Training jobs on the local SLURM cluster through `mvar-dist submit`: a 2-rank job completes with
one rank logging and the script `--dry-run` prints; a job preempted (requeued) and then killed
resumes to the uninterrupted result. Needs the cluster (.ci/start_slurm.sh); skips without it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_slurm import HAVE_SLURM, TINY_CONFIG, needs_cluster, run_cli, wait_for_job

from mvar_dist.cli import main as cli_main
from mvar_dist.launch.status import read_job_record, run_status

TRAIN_STEPS = 12


def submit_tiny(capsys: pytest.CaptureFixture, tiny_codes, run_dir: Path, *extra: str) -> tuple[list[str], dict]:
    argv = ["submit", "--config", str(TINY_CONFIG), *tiny_codes.overrides(run_dir), f"train.total_steps={TRAIN_STEPS}",
            "--cluster", "slurm", "--tasks-per-node", "2", "--time", "15", "--job-name", "slurm-test", *extra]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    record = read_job_record(run_dir)
    assert f"submitted job {record['job_id']}" in out and str(run_dir) in out
    return argv, record


def metric_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(record.run_id, key))


def exported_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mvar_dist.training.export import export_run

    return load_file(str(export_run(run_dir, out)))


@pytest.fixture(scope="module")
def completed_run(tiny_codes, tmp_path_factory) -> Path:
    """A 2-rank CPU training job submitted with `mvar-dist submit` and run to the end."""
    if not HAVE_SLURM:
        pytest.skip("no SLURM client here (sinfo/sbatch not found); CI starts a local cluster in .ci/start_slurm.sh")
    run_dir = tmp_path_factory.mktemp("slurm_train") / "run"
    argv = ["submit", "--config", str(TINY_CONFIG), *tiny_codes.overrides(run_dir), f"train.total_steps={TRAIN_STEPS}",
            "--cluster", "slurm", "--tasks-per-node", "2", "--time", "15", "--job-name", "slurm-test"]
    assert cli_main(argv) == 0  # module scope has no capsys: the CLI prints to the real stdout
    record = read_job_record(run_dir)
    assert wait_for_job(record["job_id"]) == "COMPLETED"
    return run_dir


@needs_cluster
@pytest.mark.slow
def test_training_job_completes_with_one_rank_logging(completed_run, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from mvar_dist.model import MVAR
    from mvar_dist.tracking import read_run_record

    run_dir = completed_run
    record = read_job_record(run_dir)
    # the script that ran is the one --dry-run prints
    argv = record["command"][1:]
    code, out, _ = run_cli(capsys, *argv, "--dry-run")
    assert code == 0 and out == (Path(record["folder"]) / f"{record['job_id']}_submission.sh").read_text()

    # one value per step: rank 1 logs nothing, and there is a single run
    losses = metric_history(run_dir, "train/loss")
    assert [step for step, _ in losses] == list(range(1, TRAIN_STEPS + 1))
    mlflow_record = read_run_record(run_dir)
    client = MlflowClient(tracking_uri=mlflow_record.tracking_uri)
    assert len(client.search_runs([mlflow_record.experiment_id])) == 1

    status = run_status(run_dir)
    assert status["job"]["state"] == "COMPLETED" and status["job"]["requeues"] == 0
    assert status["checkpoint"]["step"] == TRAIN_STEPS
    assert status["mlflow"]["status"] == "FINISHED" and status["mlflow"]["requeues"] == "0"

    exported_weights(run_dir, tmp_path / "export")
    model = MVAR.from_pretrained(tmp_path / "export")
    assert model.config.depth == 2 and sum(p.numel() for p in model.parameters()) > 0


# a checkpoint step (tiny_cpu saves every 2) after the preemption, before the end (12): late, since
# a tiny step takes ~0.1 s on an idle machine and the signal must arrive before it
KILL_STEP = 10


@needs_cluster
@pytest.mark.slow
def test_preempted_then_killed_job_resumes_to_the_uninterrupted_result(completed_run, tiny_codes, capsys, tmp_path):
    """USR2 mid-run: checkpoint, requeue, resume. Then every rank dies at a checkpoint, as with a
    node failure: the job fails and a resubmission resumes from it. The end equals an
    uninterrupted run: every step logged once, the same values and weights."""
    run_dir = tmp_path / "run"
    _, record = submit_tiny(capsys, tiny_codes, run_dir, f"debug.kill_after_checkpoint_step={KILL_STEP}")
    job_id = record["job_id"]
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.exists():  # the trainer is in its loop once the first checkpoint exists
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what preemption sends
    assert wait_for_job(job_id) == "FAILED"  # requeued once, then killed at KILL_STEP

    log = Path(record["stderr"]).read_text()
    stopped_at = [int(line.rsplit("at step ", 1)[1].split(";")[0]) for line in log.splitlines() if "stopping on SIGUSR2" in line]
    assert stopped_at and stopped_at[0] < KILL_STEP, "the signal must interrupt the run before the kill"
    assert "resumed from" in log and latest.read_text().strip() == f"step_{KILL_STEP:08d}"
    status = run_status(run_dir)
    assert status["job"]["requeues"] == 1 and status["mlflow"]["requeues"] == "1"
    assert status["mlflow"]["slurm_restart_count"] == "1"

    _, again = submit_tiny(capsys, tiny_codes, run_dir, "debug.kill_after_checkpoint_step=null")
    assert again["previous_job_ids"] == [job_id]
    assert wait_for_job(again["job_id"]) == "COMPLETED"
    assert f"resumed from step_{KILL_STEP:08d}" in Path(again["stderr"]).read_text()

    # no step lost or repeated, the same values as the uninterrupted run, the same final weights
    # (tolerances as tests/test_train.py's resume test: the trainer's resume is meant to be exact)
    got, expected = metric_history(run_dir, "train/loss"), metric_history(completed_run, "train/loss")
    assert [step for step, _ in got] == list(range(1, TRAIN_STEPS + 1))
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]))
    resumed = exported_weights(run_dir, tmp_path / "resumed")
    uninterrupted = exported_weights(completed_run, tmp_path / "uninterrupted")
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-6
