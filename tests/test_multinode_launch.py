"""Several nodes without SLURM: one launcher per node, by hand (``mvar-dist train --nproc N
--nnodes M --node-rank R --master-addr A --master-port P``) or with ``torchrun``.

The slow tests start two node launchers on loopback, as two processes sharing one run directory
(the shared file system of a cluster), and require the weights and every step's loss to equal
those of a local ``--nproc 2`` run of the same config exactly: the ranks get the same numbers,
the same data and the same rendezvous, so nothing may differ. The fast tests cover the flags'
checks and the rank environment each launcher gives its ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar_dist.commands.train import build_parser, launch_or_train
from mvar_dist.config import TRANSFORMER, ConfigError
from mvar_dist.launch.local import Nodes, launch
from mvar_dist.runtime.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
STEPS = ["train.total_steps=4", "checkpoint.every_steps=2"]
RUN_TIMEOUT = 600


def rank_environment() -> dict[str, str]:
    """This test's environment without a layout of an outer launcher (srun, torchrun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train_args(tiny_codes, run_dir: Path) -> list[str]:
    return ["train", "--config", str(TINY), *tiny_codes.overrides(run_dir), *STEPS]


def run_launchers(commands: list[list[str]], logs: Path) -> None:
    """Start every node's launcher at once (each waits for the others at the rendezvous) and
    require all of them to succeed; on a timeout or a failure, every launcher is stopped."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for node, command in enumerate(commands):
            files.append((logs / f"node{node}.log").open("w"))
            procs.append(subprocess.Popen(command, cwd=REPO, env=rank_environment(),
                                          stdout=files[-1], stderr=subprocess.STDOUT))
        codes = [proc.wait(timeout=RUN_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for file in files:
            file.close()
    outputs = "\n".join(f"--- node {n} ---\n" + (logs / f"node{n}.log").read_text()[-3000:] for n in range(len(commands)))
    assert codes == [0] * len(commands), outputs


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    states = torch.load(path, map_location="cpu", weights_only=True)
    assert states["global_steps"] == 4
    return states["module"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(record.run_id, "train/loss"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, expected = final_weights(run_dir), final_weights(reference)
    assert got.keys() == expected.keys()
    difference = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert difference == 0.0, f"largest weight difference to the local run: {difference}"
    assert losses(run_dir) == losses(reference)
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def local_run(tiny_codes, tmp_path_factory) -> Path:
    """The same config as 2 ranks of one launcher: what the node launchers must reproduce."""
    run_dir = tmp_path_factory.mktemp("multinode") / "local"
    run_launchers([[sys.executable, "-m", "mvar_dist", *train_args(tiny_codes, run_dir), "--nproc", "2"]],
                  run_dir.parent / "local_logs")
    return run_dir


@pytest.mark.slow
def test_two_node_launchers_equal_a_local_run(tiny_codes, local_run, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    run_launchers([
        [sys.executable, "-m", "mvar_dist", *train_args(tiny_codes, run_dir), "--nproc", "1", "--nnodes", "2",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        for node in (0, 1)
    ], tmp_path / "logs")
    assert_same_run(run_dir, local_run)
    assert "node 1 of 2: starting ranks 1..1 of 2, meeting at 127.0.0.1" in (tmp_path / "logs" / "node1.log").read_text()


@pytest.mark.slow
def test_two_torchrun_launchers_equal_a_local_run(tiny_codes, local_run, tmp_path):
    """torchrun's static rendezvous hosts its store on the master port of node 0; the ranks'
    env:// rendezvous joins that store (TORCHELASTIC_USE_AGENT_STORE) instead of opening its own."""
    run_dir, port = tmp_path / "run", free_port()
    run_launchers([
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "mvar_dist", *train_args(tiny_codes, run_dir)]
        for node in (0, 1)
    ], tmp_path / "logs")
    assert_same_run(run_dir, local_run)


BAD_FLAGS = [
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"],
     "--node-rank must be in 0..1 for --nnodes 2, got 2"),
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "-1", "--master-addr", "h"],
     "--node-rank must be in 0..1 for --nnodes 2, got -1"),
    (["--nproc", "1", "--node-rank", "1"], "--node-rank must be in 0..0 for --nnodes 1, got 1"),
    (["--nproc", "1", "--nnodes", "0"], "--nnodes must be >= 1, got 0"),
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr"),
    (["--nproc", "1", "--nnodes", "2", "--master-addr", " "], "--master-addr is empty"),
    (["--nnodes", "2", "--node-rank", "0", "--master-addr", "h"], "--nnodes 2 needs --nproc N"),
    (["--node-rank", "1"], "--node-rank 1 needs --nproc N"),
    (["--master-port", "29400"], "--master-port 29400 needs --nproc N"),
    (["--nproc", "1", "--nnodes", "2", "--master-addr", "h", "--master-port", "0"],
     "--master-port must be in 1..65535, got 0"),
    (["--nproc", "1", "--nnodes", "2", "--master-addr", "h", "--master-port", "65536"],
     "--master-port must be in 1..65535, got 65536"),
    (["--nproc", "1", "--nnodes", "2", "--master-addr", "h", "--master-port", "http"],
     "argument --master-port: invalid int value: 'http'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_node_flags_are_parser_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        launch_or_train("train", build_parser(), ["--config", str(TINY), *flags], TRANSFORMER)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_config_is_checked_for_every_node_s_ranks():
    """--nproc 1 on each of 3 nodes is a world of 3, which the tiny batch split refuses before
    any rank starts (with 1 rank it would be fine)."""
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        launch_or_train("train", build_parser(), [
            "--config", str(TINY), "--nproc", "1", "--nnodes", "3", "--node-rank", "2", "--master-addr", "10.0.0.1",
            "tokenizer.checkpoint=null"], TRANSFORMER)


def test_a_node_launcher_gives_its_ranks_their_share_of_the_world(tmp_path):
    script = (
        "import os, sys\n"
        "e = os.environ\n"
        "local = int(e['LOCAL_RANK'])\n"
        "assert e['RANK'] == str(4 + local) and e['WORLD_SIZE'] == '6' and e['LOCAL_WORLD_SIZE'] == '2', dict(e)\n"
        "assert e['MASTER_ADDR'] == 'node0.example' and e['MASTER_PORT'] == '29411', dict(e)\n"
        "assert 'TORCHELASTIC_USE_AGENT_STORE' not in e and 'SLURM_PROCID' not in e\n"
        "open(sys.argv[1] + '/rank' + e['RANK'], 'w').close()\n"
    )
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", SLURM_PROCID="7")
    nodes = Nodes(count=3, rank=2, master_addr="node0.example", master_port=29411)
    assert launch(2, [sys.executable, "-c", script, str(tmp_path)], env=env, nodes=nodes) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank4", "rank5"]


def test_several_nodes_need_a_fixed_port():
    with pytest.raises(ValueError, match="fixed master port"):
        Nodes(count=2, rank=0, master_addr="h")
