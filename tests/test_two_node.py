"""Jobs across the two nodes of the local two-node SLURM cluster (n1 and n2, one CPU each, in
separate network namespaces and hostnames; the file system is shared). ``bash .ci/two_node.sh``
switches the local cluster to two nodes, runs these (``-m two_node``) and switches back; on any
other cluster they skip.

What must hold: ZeRO-2 and ZeRO-3 jobs with one rank per node train to the weights of a local
2-rank run; a preempted (USR2) two-node job requeues and resumes to those same weights; a hung
rank requeues the job, which then finishes; the prep array spreads over both nodes and its
merged shards verify; ``status`` names the nodes of every attempt and MLflow holds one run with
the node list; two node launchers started by hand (``mvar-dist train --nnodes 2``), one in each
node's network namespace, train like the local run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_slurm import HAVE_SLURM, TINY_CONFIG, make_prep_inputs, run_cli, TOKENIZER_FLAGS, wait_for_job
from test_train import REPO, ok, run_train

from mvar_dist.cli import main as cli_main
from mvar_dist.launch.status import read_job_record, run_status

N2_NETNS = "/run/netns/local_slurm_n2"  # where the two-node mode puts node n2 (shared/slurm/NOTES.md)
TRAIN_STEPS = 12


def cluster_nodes() -> list[str]:
    if not HAVE_SLURM:
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


TWO_NODES = cluster_nodes() == ["n1", "n2"]
pytestmark = [
    pytest.mark.two_node,
    pytest.mark.slow,
    pytest.mark.skipif(not TWO_NODES, reason="needs the local two-node SLURM cluster (bash .ci/two_node.sh runs these)"),
]


def exported_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mvar_dist.training.export import export_run

    return load_file(str(export_run(run_dir, out)))


def assert_same_weights(run_dir: Path, reference: Path, tmp_path: Path) -> None:
    """Bitwise: the same ranks doing the same arithmetic, wherever they run."""
    got, expected = exported_weights(run_dir, tmp_path / "got"), exported_weights(reference, tmp_path / "expected")
    assert got.keys() == expected.keys()
    differ = [name for name in got if not torch.equal(got[name], expected[name])]
    assert not differ, f"{len(differ)} tensors differ from the local 2-rank run, e.g. {differ[:3]}"


def submit_two_node(capsys, tiny_codes, run_dir: Path, *overrides: str) -> dict:
    code, out, err = run_cli(
        capsys, "submit", "--config", str(TINY_CONFIG), *tiny_codes.overrides(run_dir), f"train.total_steps={TRAIN_STEPS}",
        *overrides, "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1",
        "--time", "15", "--job-name", "two-node-test",
    )
    assert code == 0, err
    return read_job_record(run_dir)


@pytest.fixture(scope="module")
def local_runs(tiny_codes, tmp_path_factory):
    """The same experiment as 2 local ranks on one machine, per ZeRO template: the reference."""
    runs: dict[str, Path] = {}

    def run(template: str) -> Path:
        if template not in runs:
            run_dir = tmp_path_factory.mktemp(f"local_{template}") / "run"
            ok(run_train(tiny_codes, run_dir, f"train.total_steps={TRAIN_STEPS}", f"deepspeed.template={template}"))
            runs[template] = run_dir
        return runs[template]

    return run


def rank_hosts(log: str) -> dict[int, str]:
    """rank -> host from the job's 'rank R of W on HOST' lines."""
    hosts = {}
    for line in log.splitlines():
        if " of 2 on " in line and "rank " in line:
            words = line.split("rank ", 1)[1].split()
            hosts[int(words[0])] = words[4].rstrip(",")
    return hosts


@pytest.mark.parametrize("template", ["zero2", "zero3"])
def test_a_job_with_one_rank_per_node_trains_like_a_local_run(template, tiny_codes, local_runs, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from mvar_dist.tracking import read_run_record

    run_dir = tmp_path / "run"
    record = submit_two_node(capsys, tiny_codes, run_dir, f"deepspeed.template={template}")
    assert wait_for_job(record["job_id"]) == "COMPLETED", Path(record["stderr"]).read_text()[-3000:]
    log = "\n".join(path.read_text() for path in Path(record["folder"]).glob(f"{record['job_id']}_*_log.err"))
    assert rank_hosts(log) == {0: "n1", 1: "n2"}
    assert_same_weights(run_dir, local_runs(template), tmp_path)

    status = run_status(run_dir)
    assert [attempt["nodes"] for attempt in status["job"]["attempts"]] == ["n[1-2]"]
    code, out, _ = run_cli(capsys, "status", str(run_dir))
    assert code == 0 and "on n[1-2]" in out
    tracking = read_run_record(run_dir)
    runs = MlflowClient(tracking_uri=tracking.tracking_uri).search_runs([tracking.experiment_id])
    assert [run.info.run_id for run in runs] == [tracking.run_id]
    assert runs[0].data.tags["hosts"] == "n[1-2]" and runs[0].data.tags["world_size"] == "2"


def wait_for_checkpoint(run_dir: Path) -> None:
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600  # a guard against a stuck test, not a timing
    while not latest.exists():
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.5)


def test_a_preempted_two_node_job_requeues_and_resumes_to_the_local_result(tiny_codes, local_runs, capsys, tmp_path):
    run_dir = tmp_path / "run"
    record = submit_two_node(capsys, tiny_codes, run_dir)
    wait_for_checkpoint(run_dir)
    subprocess.run(["scancel", "--signal=USR2", str(record["job_id"])], check=True)  # what preemption sends
    assert wait_for_job(record["job_id"]) == "COMPLETED"
    log = Path(record["stderr"]).read_text()
    assert "stopping on SIGUSR2" in log and "resumed from" in log

    status = run_status(run_dir)
    attempts = status["job"]["attempts"]
    assert status["job"]["requeues"] == 1 and [a["nodes"] for a in attempts] == ["n[1-2]", "n[1-2]"]
    assert attempts[-1]["state"] == "COMPLETED" and status["mlflow"]["requeues"] == "1"
    code, out, _ = run_cli(capsys, "status", str(run_dir))
    assert code == 0 and out.count("on n[1-2]") >= 2, out
    assert_same_weights(run_dir, local_runs("zero2"), tmp_path)


def test_a_hung_rank_requeues_the_job_which_then_finishes(tiny_codes, local_runs, capsys, tmp_path):
    """Rank 1 (on n2) stops at step 4; rank 0 waits in a collective until train.hang_timeout_s,
    then requeues the job; the requeued job resumes from step 2 and finishes."""
    run_dir = tmp_path / "run"
    record = submit_two_node(capsys, tiny_codes, run_dir, "train.hang_timeout_s=8", "debug.hang_at_step=4")
    assert wait_for_job(record["job_id"]) == "COMPLETED"
    log = Path(record["stderr"]).read_text()
    assert "made no progress for" in log and "requeueing job" in log and "resumed from step_00000002" in log
    status = run_status(run_dir)
    assert status["job"]["requeues"] == 1 and status["checkpoint"]["step"] == TRAIN_STEPS
    assert not (run_dir / ".lock").exists()
    assert_same_weights(run_dir, local_runs("zero2"), tmp_path)


def test_the_prep_array_spreads_over_both_nodes_and_its_shards_verify(capsys, tmp_path):
    images, tokenizer = make_prep_inputs(tmp_path)
    out_dir = tmp_path / "codes"
    code, _, err = run_cli(
        capsys, "submit-prep", "--array-tasks", "2", "--cpus-per-task", "1", "--time", "15", "--",
        str(images), "--out", str(out_dir), "--split", "train", "--name", "tiny", "--tokenizer", str(tokenizer),
        *TOKENIZER_FLAGS, "--shard-size", "3", "--device", "cpu", "--decode-threads", "1", "--no-progress",
    )
    assert code == 0, err
    record = read_job_record(out_dir / "train")
    assert wait_for_job(record["job_id"]) == "COMPLETED"
    assert wait_for_job(record["merge_job_id"]) == "COMPLETED"
    status = run_status(out_dir / "train")
    assert sorted(task["nodes"] for task in status["job"]["attempts"]) == ["n1", "n2"]
    code, out, err = run_cli(capsys, "verify-shards", str(out_dir / "train" / "manifest.json"))
    assert code == 0, err
    assert json.loads((out_dir / "train" / "manifest.json").read_text())["num_samples"] == 12


def test_node_launchers_started_by_hand_in_two_namespaces_train_like_a_local_run(tiny_codes, local_runs, tmp_path):
    """`mvar-dist train --nnodes 2` once per node, as without SLURM: node 0 in n1's namespace,
    node 1 in n2's, rendezvous at n1's address over the veth both nodes share."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lslurm0")
    def node(rank: int) -> list[str]:
        return [sys.executable, "-m", "mvar_dist", "train", "--config", str(TINY_CONFIG), "--nproc", "1",
                "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "10.77.0.1", "--master-port", "29731",
                *tiny_codes.overrides(run_dir), f"train.total_steps={TRAIN_STEPS}"]

    node_commands = [node(0), ["nsenter", f"--net={N2_NETNS}", *node(1)]]
    launchers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cmd in node_commands]
    results = [launcher.communicate(timeout=600) for launcher in launchers]
    for launcher, (_, err) in zip(launchers, results):
        assert launcher.returncode == 0, err[-3000:]
    assert_same_weights(run_dir, local_runs("zero2"), tmp_path)
