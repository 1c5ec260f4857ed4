"""Checkpoints survive what a cluster does to them: a node crash (files durable before ``latest``
moves), a damaged newest checkpoint (fall back, keep the evidence), a second job on the same run
directory (a lock, with stale locks taken over), and a run directory from someone else (no
unpickling of code). Real 2-rank training through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import REPO, RUN_TIMEOUT, latest_step, model_states, ok, run_train, train_command

STEPS = ["checkpoint.every_steps=2", "checkpoint.keep_last=3"]

# Loaded by every Python process of a run (PYTHONPATH): logs fsync and rename with their paths
# and a machine-wide clock, so the test can see what was durable when `latest` moved.
AUDIT_HOOK = '''
import os, time
_log = os.environ["FSYNC_AUDIT_LOG"]
_fsync, _replace = os.fsync, os.replace

def _write(kind, path):
    with open(f"{_log}.{os.getpid()}", "a") as f:
        f.write(f"{time.monotonic_ns()} {kind} {path}\\n")

def fsync(fd):
    _fsync(fd)
    _write("fsync", os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else fd.name)

def replace(src, dst, **kw):
    _replace(src, dst, **kw)
    _write("rename", os.path.abspath(os.fspath(dst)) + " " + os.path.abspath(os.fspath(src)))

os.fsync, os.replace = fsync, replace
'''


def _audit_env(tmp_path: Path) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    python_path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=python_path, FSYNC_AUDIT_LOG=str(tmp_path / "audit"))


@pytest.mark.slow
def test_every_file_of_a_tag_is_durable_before_latest_names_it(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    env = _audit_env(tmp_path)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(train_command(tiny_codes, run_dir, "train.total_steps=4", *STEPS), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    ok(result)
    events = sorted(line.split(" ", 2) for log in tmp_path.glob("audit.*") for line in log.read_text().splitlines())
    fsynced = {(path, int(t)) for t, kind, path in events if kind == "fsync"}
    checkpoints = (run_dir / "checkpoints").resolve()
    latest = str(checkpoints / "latest")

    def durable_at(path: str) -> int | None:
        """When ``path`` became durable: fsynced itself, or renamed into place after its
        temporary file was fsynced (an atomic write)."""
        times = [t for p, t in fsynced if p == path]
        for t, kind, paths in events:
            if kind == "rename" and paths.split(" ")[0] == path:
                source = paths.split(" ")[1]
                if any(p == source and ft < int(t) for p, ft in fsynced):
                    times.append(int(t))
        return min(times) if times else None

    for step in (2, 4):
        tag_dir = checkpoints / f"step_{step:08d}"
        moved = [int(t) for t, kind, paths in events if kind == "rename" and paths.split(" ")[0] == latest]
        # the rename of `latest` that published this tag: the first after all of the tag was written
        files = {str(p) for p in tag_dir.iterdir()} | {str(tag_dir)}
        synced = {path: t for path in files if (t := durable_at(path)) is not None}
        assert files - set(synced) == set(), f"never fsynced: {sorted(files - set(synced))}"
        published = min(t for t in moved if t > max(synced.values()))
        assert max(synced.values()) < published
        assert any(path == str(checkpoints) and t > published for path, t in fsynced), \
            "the checkpoints directory was not fsynced after latest moved"


@pytest.fixture(scope="module")
def uninterrupted(tiny_codes, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    ok(run_train(tiny_codes, run_dir, "train.total_steps=6", *STEPS))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_codes, tmp_path, uninterrupted, damage):
    run_dir = tmp_path / "run"
    ok(run_train(tiny_codes, run_dir, "train.total_steps=4", *STEPS))
    tag_dir = run_dir / "checkpoints" / "step_00000004"
    victim = tag_dir / ("zero_pp_rank_1_mp_rank_00_optim_states.pt" if damage == "truncate" else "mp_rank_00_model_states.pt")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    result = run_train(tiny_codes, run_dir, "train.total_steps=6", *STEPS)
    ok(result)
    assert "step_00000004" in result.stderr and "falling back to step_00000002" in result.stderr
    assert latest_step(run_dir) == 6
    whole, resumed = model_states(uninterrupted, 6)["module"], model_states(run_dir, 6)["module"]
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    kept = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_00000004.damaged")]
    assert len(kept) == 1  # the evidence is kept, never deleted automatically
    assert (kept[0] / victim.name).exists() == (damage == "truncate")


MALICIOUS = '''
import sys, torch
class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
torch.save({"module": Payload()}, sys.argv[1])
'''


@pytest.mark.slow
def test_resume_and_export_refuse_a_checkpoint_that_would_run_code(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    ok(run_train(tiny_codes, run_dir, "train.total_steps=2", *STEPS))
    marker = tmp_path / "code_ran"
    planted = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    subprocess.run([sys.executable, "-c", MALICIOUS, str(planted), str(marker)], check=True)

    result = run_train(tiny_codes, run_dir, "train.total_steps=4", *STEPS)
    assert result.returncode != 0
    assert "mp_rank_00_model_states.pt" in result.stderr and "refus" in result.stderr
    assert not marker.exists()

    exported = subprocess.run([sys.executable, "-m", "mvar_dist", "export", str(run_dir), "--out", str(tmp_path / "out")],
                              cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
    assert exported.returncode != 0
    assert "mp_rank_00_model_states.pt" in exported.stderr and "refus" in exported.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_second_job_on_the_same_run_directory_is_refused(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    first = subprocess.Popen(train_command(tiny_codes, run_dir, "train.total_steps=100000", *STEPS), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT  # a guard against hanging, not a timing assertion
        while not (run_dir / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
        second = run_train(tiny_codes, run_dir, "train.total_steps=100000", *STEPS)
        assert second.returncode != 0
        assert "in use" in second.stderr
        assert first.poll() is None  # the first job goes on
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=RUN_TIMEOUT)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.slow
def test_a_dead_jobs_lock_does_not_block_the_next_one(tiny_codes, tmp_path):
    run_dir = tmp_path / "run"
    ok(run_train(tiny_codes, run_dir, "train.total_steps=2", *STEPS))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": None,
                                               "heartbeat": time.time()}))
    result = run_train(tiny_codes, run_dir, "train.total_steps=4", *STEPS)
    ok(result)
    assert "stale" in result.stderr
    assert latest_step(run_dir) == 4
