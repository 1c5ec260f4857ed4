"""``mvar-dist train`` end to end on CPU: 2 gloo ranks, tiny model, real shards and tokenizer.

Slow tests launch the real CLI (``--nproc 2``); DeepSpeed's first start on a machine compiles a
small CPU communication op (about a minute), which the first test pays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvar_dist.config import load_config
from mvar_dist.run_dir import LATEST as LATEST_FILE
from mvar_dist.run_dir import RUN_STATE as RUN_STATE_FILE
from mvar_dist.training.optimizer import param_groups
from mvar_dist.training.schedule import lr_factor
from mvar_dist.training.losses import token_loss

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
RUN_TIMEOUT = 900


def train_command(tiny_codes, run_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    launch = ["--nproc", str(nproc)] if nproc else []
    return [sys.executable, "-m", "mvar_dist", "train", "--config", str(TINY), *launch,
            *tiny_codes.overrides(run_dir), *overrides]


def run_train(tiny_codes, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run(
        train_command(tiny_codes, run_dir, *overrides, nproc=nproc), cwd=REPO, env=env,
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def latest_step(run_dir: Path) -> int:
    tag = (run_dir / "checkpoints" / LATEST_FILE).read_text().strip()
    return json.loads((run_dir / "checkpoints" / tag / RUN_STATE_FILE).read_text())["step"]


def model_states(run_dir: Path, step: int) -> dict:
    tag_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():  # ZeRO-3 names it per rank (and keeps no full weights there)
        path = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(record.run_id, key))


@pytest.mark.slow
# ZeRO-2 (the default) runs in the resume test; the offload template with the trainer's torch AdamW
@pytest.mark.parametrize("template", ["zero1", "zero3", "zero3_offload"])
def test_zero_stages_take_one_optimizer_step_per_global_batch(tiny_codes, tmp_path, template):
    run_dir = tmp_path / template
    ok(run_train(tiny_codes, run_dir, f"deepspeed.template={template}", "train.total_steps=2"))
    assert latest_step(run_dir) == 2
    states = model_states(run_dir, 2)
    # 2 micro-batches x 3 scale groups per rank, yet one optimizer step per global batch
    assert states["global_steps"] == 2 and states["skipped_steps"] == 0
    losses = metric_history(run_dir, "train/loss")
    assert [s for s, _ in losses] == [1, 2] and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert {s for s, _ in metric_history(run_dir, "train/loss/scale_3")} == {1, 2}
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_and_metrics(tiny_codes, tmp_path):
    steps = ["train.total_steps=5", "checkpoint.every_steps=2"]
    ok(run_train(tiny_codes, tmp_path / "whole", *steps))
    assert model_states(tmp_path / "whole", 5)["global_steps"] == 5  # one optimizer step per global batch
    killed = run_train(tiny_codes, tmp_path / "resumed", *steps, "debug.kill_after_checkpoint_step=2")
    assert killed.returncode != 0
    assert latest_step(tmp_path / "resumed") == 2
    ok(run_train(tiny_codes, tmp_path / "resumed", *steps))
    whole, resumed = model_states(tmp_path / "whole", 5)["module"], model_states(tmp_path / "resumed", 5)["module"]
    assert whole.keys() == resumed.keys()
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    expected = metric_history(tmp_path / "whole", "train/loss")
    got = metric_history(tmp_path / "resumed", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]  # no gap, no duplicate
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]))
    # the first checkpoints were pruned to checkpoint.keep_last
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]


@pytest.mark.slow
def test_schedule_all_step_equals_a_plain_torch_full_loss_step(tiny_codes, tmp_path):
    """2 ranks x 2 micro-batches x 3 scale groups through DeepSpeed ZeRO-2 == one AdamW step on
    the full per-token loss of the 8 images in one pass, computed with plain torch."""
    overrides = ["train.total_steps=1", "checkpoint.every_steps=1", "model.cond_drop_rate=0.0",
                 "model.drop_path_rate=0.0", "optim.warmup_steps=0", "train.label_smoothing=0.1"]
    ok(run_train(tiny_codes, tmp_path / "ds", *overrides))
    trained = model_states(tmp_path / "ds", 1)["module"]

    from mvar_dist.data import build_train_loader
    from mvar_dist.model import MVAR
    from mvar_dist.tokenizer import MultiScaleVQVAE

    config = load_config(TINY, tiny_codes.overrides(tmp_path / "unused") + overrides)
    torch.manual_seed(config.run.seed)
    model = MVAR(config.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = MultiScaleVQVAE.from_checkpoint(tiny_codes.tokenizer, **config.tokenizer.options)
    codes, labels = [], []
    for rank in range(2):
        batches = iter(build_train_loader(config.data, rank=rank, world_size=2, batch_size=2,
                                          global_batch=config.train.global_batch_size))  # the trainer's order
        for _ in range(2):
            c, l, _ = next(batches)
            codes.append(c), labels.append(l)
    codes, labels = torch.cat(codes), torch.cat(labels)
    scales = tuple(range(model.layout.num_scales))
    logits = model(labels, tokenizer.codes_to_teacher_input(codes), scales)
    token_loss(logits, model.targets_for(codes, scales), model.layout.num_tokens, 0.1).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay), lr=config.peak_lr * lr_factor(0, config),
        betas=config.optim.betas, eps=config.optim.eps,
    )
    optimizer.step()
    expected = model.state_dict()
    moved = max((expected[k] - initial[k]).abs().max().item() for k in trained)
    assert moved > 1e-4  # the step is large enough for the comparison to mean something
    assert max((trained[k] - expected[k]).abs().max().item() for k in trained) <= 1e-6


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_codes, tmp_path):
    run_dir = tmp_path / "nan"
    result = run_train(
        tiny_codes, run_dir, "train.total_steps=6", "debug.nonfinite_loss_steps=[2,3]",
        "train.max_consecutive_nonfinite=2",
    )
    assert result.returncode != 0
    assert "consecutive steps had a non-finite loss" in result.stderr
    assert latest_step(run_dir) == 3
    states = model_states(run_dir, 3)
    assert states["skipped_steps"] == 2  # both ranks skipped the same two optimizer steps
    assert [v for _, v in metric_history(run_dir, "nonfinite_steps")] == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_every_rank(tiny_codes, tmp_path):
    run_dir = tmp_path / "term"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = train_command(tiny_codes, run_dir, "train.total_steps=10000", "checkpoint.every_steps=2")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (run_dir / "checkpoints" / LATEST_FILE).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training did not reach its first checkpoint"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, stderr[-4000:]
    assert "stopping on SIGTERM" in stderr
    stopped = latest_step(run_dir)
    assert 2 <= stopped < 10000
    assert metric_history(run_dir, "train/loss")[-1][0] == stopped


def test_mismatched_shards_and_incompatible_resume_are_refused_before_compute(tiny_codes, tmp_path):
    result = run_train(tiny_codes, tmp_path / "bad", "model.vocab_size=128", nproc=0)
    assert result.returncode == 2
    assert "vocab_size: shards 64, model 128" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()

    run_dir = tmp_path / "resume"
    saved = load_config(TINY, tiny_codes.overrides(run_dir) + ["model.num_heads=4"]).to_dict()
    tag_dir = run_dir / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    (tag_dir / RUN_STATE_FILE).write_text(json.dumps({"step": 2, "config": saved, "world_size": 1}))
    (run_dir / "checkpoints" / LATEST_FILE).write_text("step_00000002\n")
    result = run_train(tiny_codes, run_dir, nproc=0)
    assert result.returncode == 2
    assert "model.num_heads changed" in result.stderr


def test_launcher_reports_a_failing_rank(tmp_path):
    from mvar_dist.launch.local import launch

    script = "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"
    assert launch(2, [sys.executable, "-c", script]) == 3
    assert launch(2, [sys.executable, "-c", "import os; assert os.environ['WORLD_SIZE'] == '2'"]) == 0


def test_per_scale_metrics_from_reduced_sums():
    from mvar_dist.scales import ScaleLayout
    from mvar_dist.training.losses import ScaleStats, scale_metrics
    from mvar_dist.training.task import StepResult, reduce_step

    layout = ScaleLayout((1, 2, 3))
    stats = ScaleStats(layout.num_scales)
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 13, 5), torch.randint(0, 5, (4, 13))  # scales 1 and 2: 4 + 9 tokens
    stats.add(layout, (1, 2), logits, targets)
    result = StepResult(torch.tensor(0.5, dtype=torch.float64), 1, False, 4, 52, 0.0)
    sums, reduced = reduce_step(result, stats, skipped_samples=0, step_time=1.0, peak_mb=1.0)
    metrics = scale_metrics(sums)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert metrics["loss/scale_1"] == pytest.approx(ce[:, :4].mean().item())
    assert metrics["loss/scale_2"] == pytest.approx(ce[:, 4:].mean().item()) == metrics["loss/last"]
    assert metrics["acc/mean"] == pytest.approx(100 * (logits.argmax(-1) == targets).float().mean().item())
    assert "loss/scale_0" not in metrics and reduced["loss_sum"] == 0.5 and reduced["tokens"] == 52
