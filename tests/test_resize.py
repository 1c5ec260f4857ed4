"""A run resumes on another number of ranks: weights, Adam moments and step counts, the lr
schedule, the loop and the MLflow run continue (docs/training.md, "Changing the cluster size")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import TINY, metric_history, ok, run_train

from mvar_dist.run_dir import RunDir
from mvar_dist.run_state import read_run_state


def optimizer_step_count(run_dir: Path, step: int) -> int:
    states = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return int(states["global_steps"])


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


@pytest.mark.slow
@pytest.mark.parametrize("template, precision", [("zero1", "fp32"), ("zero2", "bf16"), ("zero3", "fp32")])
def test_run_resumes_on_another_world_size(tiny_codes, tmp_path, template, precision):
    common = ["model.depth=1", "model.embed_dim=32", "train.total_steps=4", "checkpoint.every_steps=2",
              f"deepspeed.template={template}", f"deepspeed.precision={precision}", "train.micro_batch_size=auto"]
    run_dir = tmp_path / "run"
    first = run_train(tiny_codes, run_dir, *common, "debug.kill_after_checkpoint_step=2", nproc=2)
    assert first.returncode != 0 and (run_dir / "checkpoints" / "step_00000002").is_dir()
    resumed = run_train(tiny_codes, run_dir, *common, nproc=1)
    ok(resumed)
    assert "written by 2 ranks, on 1 ranks" in resumed.stderr
    state = read_run_state(RunDir(run_dir).run_state_file("step_00000004"))
    assert state.world_size == 1 and state.world_sizes == ((0, 2), (2, 1))
    assert not (run_dir / "checkpoints" / "universal").exists()  # the conversion is removed once loaded
    steps = [s for s, _ in metric_history(run_dir, "train/loss")]
    assert steps == [1, 2, 3, 4]  # one MLflow run, continued
    whole = tmp_path / "whole"
    ok(run_train(tiny_codes, whole, *common, nproc=2))
    if template != "zero3":  # ZeRO-3 keeps no full weights in the model-states file
        assert optimizer_step_count(run_dir, 4) == optimizer_step_count(whole, 4) == 4
        a, b = final_weights(run_dir, 4), final_weights(whole, 4)
        worst = max(float(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)))
                    for k in a)
        print(f"{template} {precision}: largest relative weight difference vs uninterrupted 2-rank run {worst:.3g}")


def test_checkpoints_of_earlier_versions_keep_their_world_size(tmp_path):
    """A checkpoint without the universal-checkpoint info (run-state version < 3) is refused on
    another world size before anything starts, naming the world size to use."""
    from mvar_dist.config import ConfigError, load_config
    from mvar_dist.runtime.setup import check_resumable

    legacy = Path(__file__).resolve().parent / "data" / "legacy_runs" / "transformer"
    point = RunDir(legacy).read_resume_point("step_00000002")
    config = load_config(TINY, [f"run.dir={legacy}", *json.loads("[]")])
    with pytest.raises(ConfigError, match="resume it with 2 ranks"):
        check_resumable(RunDir(legacy), point, config, 1)
