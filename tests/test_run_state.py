"""The run state a checkpoint carries (mvar_dist/run_state.py): typed, versioned, one owner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mvar_dist.run_state import (
    RUN_STATE_VERSION,
    RankState,
    RunState,
    read_rank_state,
    read_run_state,
    write_rank_state,
    write_run_state,
)

ROOT = Path(__file__).resolve().parent.parent


def test_run_state_round_trips_with_integer_steps_for_undelivered_metrics(tmp_path):
    state = RunState(step=7, config={"run": {"dir": "x"}}, world_size=4, config_hash="abc", mlflow_run_id="r1",
                     consecutive_nonfinite=2, evaluation_pending=True, undelivered_metrics={5: {"train/loss": 1.5}})
    write_run_state(tmp_path / "run_state.json", state)
    on_disk = json.loads((tmp_path / "run_state.json").read_text())
    assert on_disk["version"] == RUN_STATE_VERSION and on_disk["undelivered_metrics"] == {"5": {"train/loss": 1.5}}
    assert read_run_state(tmp_path / "run_state.json") == state


def test_version_1_run_state_reads_with_defaults(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"step": 3, "config": {"a": 1}, "world_size": 2}))
    state = read_run_state(tmp_path / "old.json")
    assert (state.step, state.world_size, state.consecutive_nonfinite, state.evaluation_pending) == (3, 2, 0, False)
    assert state.undelivered_metrics == {} and state.mlflow_run_id is None


@pytest.mark.parametrize("content, message", [
    ('{"config": {}}', "no valid step and config"),
    ('{"step": 1, "config": []}', "config is not a mapping"),
    ('{"step": 1, "config": {}, "version": 99}', "version 99; this mvar-dist reads up to 3"),
    ("[1, 2]", "does not hold a run state"),
    ("{not json", "is not valid JSON"),
])
def test_bad_run_state_files_are_named(tmp_path, content, message):
    (tmp_path / "run_state.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_run_state(tmp_path / "run_state.json")


def test_rank_state_keeps_the_task_state_apart_and_reads_version_1(tmp_path):
    state = RankState(loader={"epoch": 1}, rng={"torch": torch.get_rng_state()}, task={"codebook": {"ema": torch.ones(2)}})
    write_rank_state(tmp_path / "rank_00000.pt", state)
    back = read_rank_state(tmp_path / "rank_00000.pt")
    assert back.loader == {"epoch": 1} and torch.equal(back.task["codebook"]["ema"], torch.ones(2))
    torch.save({"loader": {"epoch": 2}, "rng": {}, "codebook": {"ema": torch.zeros(3)}}, tmp_path / "v1.pt")
    old = read_rank_state(tmp_path / "v1.pt")
    assert old.loader == {"epoch": 2} and set(old.task) == {"codebook"}
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mvar-dist rank state"):
        read_rank_state(tmp_path / "other.pt")


def test_no_module_but_run_state_reads_run_state_keys_by_string():
    """The run state's fields are read as attributes everywhere else (the issue counted 28 string reads)."""
    keys = "step|config|config_hash|mlflow_run_id|world_size|consecutive_nonfinite|evaluation_pending|undelivered_metrics"
    pattern = re.compile(rf"(run_state|rank_state|saved|point)(\.get\(|\[)[\"']({keys}|loader|rng|codebook)[\"']")
    found = [f"{path.relative_to(ROOT)}:{number}" for path in (ROOT / "mvar_dist").rglob("*.py")
             if path.name != "run_state.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_step_tags_keep_working_beyond_eight_digits(tmp_path):
    from mvar_dist.run_dir import RunDir, step_of, tag_for

    assert tag_for(123_456_789) == "step_123456789" and step_of("step_123456789") == 123_456_789
    assert step_of("step_00000004") == 4 and step_of("step_4") is None and step_of("step_0000000x") is None
    run_dir = RunDir(tmp_path)
    for step in (99_999_999, 100_000_000, 4):
        (run_dir.checkpoints / tag_for(step)).mkdir(parents=True)
    assert run_dir.tag_steps() == [4, 99_999_999, 100_000_000]
