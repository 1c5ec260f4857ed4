"""Prep stopped by SLURM's signals (issue 11): SIGTERM/SIGUSR2 drop the shard in progress and exit
75, a rerun completes the split byte for byte, and slurm/prep_array.sbatch requeues a stopped task."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data_faults import REPO, TOKENIZER_FLAGS, leftovers, tokenizer, write_images  # noqa: F401

from mvar_dist.cli import main as cli_main
from mvar_dist.data_prep import sources
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import RECORDS_DIR, shard_dataset
from mvar_dist.shards.manifest import MANIFEST_NAME

def test_prep_stops_on_sigterm_leaving_consistent_output_and_rerun_completes(tmp_path, tokenizer):
    images = write_images(tmp_path / "images", 3, 8, seed=5)
    checkpoint = tmp_path / "tok.pth"
    torch.save(tokenizer.state_dict(), checkpoint)
    shard_size = 4
    # shard 1's first image is a FIFO: prep blocks there until the test feeds it, so the signal
    # deterministically arrives while shard 0 is complete and shard 1 is in progress
    fifo_path = images / sources.list_class_folder(images).records[shard_size].relative_path
    content = fifo_path.read_bytes()
    fifo_path.unlink()
    os.mkfifo(fifo_path)

    def prep_argv(source: Path, out: Path) -> list[str]:
        return ["prep", str(source), "--out", str(out), "--split", "train", "--name", "s", "--tokenizer", str(checkpoint),
                "--shard-size", str(shard_size), "--batch-size", "2", "--decode-threads", "2", *TOKENIZER_FLAGS]

    out = tmp_path / "out"
    log = tmp_path / "prep.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "mvar_dist", *prep_argv(images, out)], cwd=REPO,
                                stdout=stderr, stderr=subprocess.STDOUT)
    try:
        first_record = out / "train" / RECORDS_DIR / "s-train-000000.tar.json"
        deadline = time.monotonic() + 120
        while not first_record.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "prep wrote no shard"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:  # feed the FIFO once prep's decoder opens it
            try:
                fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
                continue
            os.write(fd, content)
            os.close(fd)
            break
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    from mvar_dist.data_prep.pipeline import EXIT_STOPPED

    text = log.read_text()
    assert code == EXIT_STOPPED, text
    assert "SIGTERM" in text and "rerun" in text
    split = out / "train"
    tars = sorted(p.name for p in split.glob("*.tar"))
    records = sorted(p.name[: -len(".json")] for p in (split / RECORDS_DIR).glob("*.tar.json"))
    assert tars == records and "s-train-000000.tar" in tars and len(tars) < 6
    assert leftovers(out) == [] and not (split / MANIFEST_NAME).exists()

    fifo_path.unlink()
    fifo_path.write_bytes(content)
    assert cli_main(prep_argv(images, out)) == 0
    assert cli_main(prep_argv(images, tmp_path / "reference")) == 0
    reference = tmp_path / "reference" / "train"
    assert (split / MANIFEST_NAME).read_text() == (reference / MANIFEST_NAME).read_text()
    for shard in sorted(reference.glob("*.tar")):
        assert (split / shard.name).read_bytes() == shard.read_bytes()
    assert leftovers(out) == []


def test_stop_signals_are_caught_only_while_prep_runs_and_only_where_unclaimed():
    from mvar_dist.data_prep.pipeline import stop_on_signals

    def claimed(number, frame):  # e.g. submitit's handler: prep must leave it alone
        raise AssertionError("not to be called")

    before = signal.signal(signal.SIGTERM, claimed)
    try:
        with stop_on_signals() as stop:
            assert not stop()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop() and stop.signal_name == "SIGUSR2"
            assert signal.getsignal(signal.SIGTERM) is claimed
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_stopped_prep_drops_the_shard_in_progress_and_a_rerun_completes_it(tmp_path, tokenizer):
    source = sources.list_class_folder(write_images(tmp_path / "images", 3, 4))
    common = dict(name="t", split="train", shard_size=3, batch_size=2, progress=False)
    polls = []

    def stop() -> bool:  # polled before each shard and batch: true once shard 1 has one of its two batches
        polls.append(1)
        return len(polls) > 5

    summary = shard_dataset(source, tmp_path / "out", tokenizer, stop=stop, **common)
    split = tmp_path / "out" / "train"
    assert summary.stopped and summary.shards_written == ["t-train-000000.tar"] and len(polls) == 6
    assert sorted(p.name for p in split.glob("*.tar")) == ["t-train-000000.tar"]
    assert sorted(p.name for p in (split / RECORDS_DIR).iterdir()) == ["prep.json", "t-train-000000.tar.json"]
    assert leftovers(tmp_path / "out") == []
    rerun = shard_dataset(source, tmp_path / "out", tokenizer, **common)
    assert not rerun.stopped and rerun.shards_skipped == ["t-train-000000.tar"] and len(rerun.shards_written) == 3
    shard_dataset(source, tmp_path / "reference", tokenizer, **common)
    reference = merge_manifest(tmp_path / "reference", "train").read_text()
    assert merge_manifest(tmp_path / "out", "train").read_text() == reference


def fake_slurm(tmp_path: Path, srun_status: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/srun_args"\nexit {srun_status}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/scontrol_calls"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "3",
            "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("srun_status, restarts, expected_code, requeued", [
    ("stopped", "0", 0, True), ("stopped", "10", "stopped", False), (0, "0", 0, False), (1, "0", 1, False),
])
def test_prep_array_script_requeues_a_stopped_task(tmp_path, srun_status, restarts, expected_code, requeued):
    from mvar_dist.data_prep.pipeline import EXIT_STOPPED

    status = EXIT_STOPPED if srun_status == "stopped" else srun_status
    env = fake_slurm(tmp_path, status) | {"SLURM_RESTART_COUNT": restarts}
    script = REPO / "slurm" / "prep_array.sbatch"
    result = subprocess.run(["bash", str(script), "SOURCE", "--out", "OUT", "--split", "train"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == (EXIT_STOPPED if expected_code == "stopped" else expected_code), result.stderr
    assert "--task-id 3 --num-tasks 8 --no-merge" in (tmp_path / "srun_args").read_text()
    calls = (tmp_path / "scontrol_calls").read_text().split("\n") if (tmp_path / "scontrol_calls").exists() else []
    assert ("requeue 4242" in calls) == requeued, calls
    if srun_status == "stopped" and not requeued:
        assert "not requeueing" in result.stderr
