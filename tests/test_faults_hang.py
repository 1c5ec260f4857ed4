"""A hung rank ends the job (train.hang_timeout_s): a rank stopped with SIGSTOP, or blocked in a
read that never returns, makes the local launcher stop every rank and exit non-zero, leaving no
process, no lock and an intact latest checkpoint; the same command then resumes. A stop signal
to a job with a hung rank ends it too."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
from test_train import REPO, latest_step, ok, run_train, train_command

HANG = ["train.total_steps=6", "checkpoint.every_steps=2", "train.hang_timeout_s=5", "debug.hang_at_step=4"]

@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "read"])
def test_a_hung_rank_ends_the_job_which_then_resumes(tiny_codes, tmp_path, how):
    run_dir = tmp_path / "run"
    result = run_train(tiny_codes, run_dir, *HANG, f"debug.hang_how={how}")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "made no progress for" in result.stderr and "train.hang_timeout_s=5" in result.stderr
    if how == "stop":  # the stopped rank never handles SIGTERM: the launcher kills it
        assert "did not exit 10 s after SIGTERM (stopped or hung): SIGKILL" in result.stderr
    assert latest_step(run_dir) == 2
    assert not (run_dir / ".lock").exists()
    ok(run_train(tiny_codes, run_dir, "train.total_steps=6", "checkpoint.every_steps=2"))
    assert latest_step(run_dir) == 6

@pytest.mark.slow
def test_a_stop_signal_to_a_job_with_a_hung_rank_ends_it(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(train_command(tiny_codes, run_dir, *HANG, "train.hang_timeout_s=20"), cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # a guard against a hang of the test itself, not a timing
        while not any(p.status() == psutil.STATUS_STOPPED for p in psutil.Process(launcher.pid).children()):
            assert launcher.poll() is None and time.monotonic() < deadline, "the rank never hung"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 3, err[-3000:]
    assert "made no progress for" in err
    assert latest_step(run_dir) == 2 and not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(tiny_codes, tmp_path):
    """The run directory's file system fills up at the second checkpoint (a 4 MiB tmpfs: the
    pre-flight check sees room for one): one line naming the tag directory and the cause, the
    previous checkpoint stays latest, and with room again the same command resumes."""
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        run_dir = target / "run"
        common = ["train.total_steps=6", "checkpoint.every_steps=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        result = run_train(tiny_codes, run_dir, *common)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("mvar-dist train:")]
        assert lines and lines[0].startswith(f"mvar-dist train: checkpoint step_00000004: cannot write {run_dir / 'checkpoints'}")
        assert "No space left on device" in lines[0] and "step_00000002 stays the latest" in lines[0]
        assert "Traceback" not in result.stderr
        assert latest_step(run_dir) == 2
        subprocess.run(["mount", "-o", "remount,size=16m", str(target)], check=True)
        ok(run_train(tiny_codes, run_dir, *common))
        assert latest_step(run_dir) == 6
    finally:
        subprocess.run(["umount", str(target)], check=False)
