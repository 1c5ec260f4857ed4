"""``mvar-dist plan``: its model-state bytes against a real 2-rank DeepSpeed engine (ZeRO 1, 2, 3,
bf16 and fp32, ZeRO-3 offload) on CPU, and the command itself (text, --json, errors).

The slow tests run tests/engine_memory_probe.py on 2 gloo ranks: one optimizer step of the tiny
model (widened to 96 so that partitions split parameters) and a checkpoint, counting every
tensor storage the engine holds at five points. The plan must match: weights, fp32 master
weights and Adam states to the byte (except that ZeRO-3 gathers its small whole parameters only
in the first forward and drops them for the optimizer step, where the plan counts them
throughout); gradients and DeepSpeed's buffers within MARGIN above the plan (measured: at most
409 bytes, DeepSpeed's scalars and one gradient ZeRO-1 allocates 384 bytes larger); checkpoint
files within 1% + 64 KiB each (pickle framing; measured 0.4% to 1.0%).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar_dist import cli
from mvar_dist.config import load_config
from mvar_dist.config.deepspeed_templates import read_template
from mvar_dist.memory.model_state import DEFAULTS, ModelState, ZeroSetup, model_state
from mvar_dist.memory.plan import Cluster, param_layout, plan_run

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
PROBE = REPO / "tests" / "engine_memory_probe.py"
WIDER = ["model.depth=2", "model.embed_dim=96", "model.num_heads=2"]
MARGIN = 4096  # bytes of DeepSpeed scalars (norms, overflow flags, the loss) beside gradients and buffers
GIB = 2**30


# ----- the plan against a real engine -----


def run_probe(tmp_path: Path, overrides: list[str]) -> list[dict]:
    from mvar_dist.runtime.distributed import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    ranks = [subprocess.Popen([sys.executable, str(PROBE), str(TINY), str(tmp_path), *overrides], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        codes = [rank.wait(timeout=600) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
        for log in logs:
            log.close()
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def expected_points(state: ModelState) -> dict[str, dict[str, int]]:
    """What the plan says the probe's points hold (see tests/engine_memory_probe.py)."""
    stage, first_group = state.setup.stage, state.partitions[0]
    held = state.persistent_buffers + (state.gradients if stage == 3 else 0)  # ZeRO-3 allocates both at start
    accumulating = {1: state.gradients + state.backward_buffers, 2: state.gradients, 3: held}[stage]
    boundary = {1: state.boundary_gradients, 2: state.gradients, 3: held}[stage]
    first_adam = 2 * 4 * first_group + 4

    def point(adam: int, other: int) -> dict[str, int]:
        return {"parameters": state.parameters, "master_weights": state.master_weights, "adam_states": adam, "other": other}

    points = {"init": point(0, held), "accumulating": point(0, accumulating), "boundary": point(0, boundary),
              "step": point(first_adam, boundary + 4 * first_group), "after_step": point(state.adam_states, held)}
    if stage == 3:  # the whole (persistent) small parameters are gathered by the first forward, not at start
        points["init"]["parameters"] = state.setup.bytes_per_value * sum(state.partitions)
    return points


def planned_state(overrides: list[str], template_json: dict | None = None) -> ModelState:
    config = load_config(TINY, overrides)
    ds = template_json or read_template(config.deepspeed.template, config.deepspeed.precision)
    return model_state(param_layout(config.model, config.optim.weight_decay),
                       ZeroSetup.from_deepspeed(ds, config.deepspeed.precision), 2)


def check_checkpoint(state: ModelState, files: dict[str, int]) -> None:
    def close(planned: int, measured: int, count: int) -> bool:
        return planned <= measured <= planned * 1.01 + count * 64 * 1024

    rank0 = {name: size for name, size in files.items() if "rank_0_" in name or name == "mp_rank_00_model_states.pt"}
    assert close(state.checkpoint_total, sum(files.values()), len(files)), (state.checkpoint_total, files)
    assert close(state.checkpoint_rank0, sum(rank0.values()), len(rank0)), (state.checkpoint_rank0, rank0)


@pytest.mark.slow
@pytest.mark.parametrize("template, precision", [("zero1", "bf16"), ("zero2", "bf16"), ("zero3", "bf16"),
                                                 ("zero2", "fp32")])
def test_model_state_equals_a_real_engine(tmp_path, template, precision):
    overrides = [*WIDER, f"deepspeed.template={template}", f"deepspeed.precision={precision}"]
    state = planned_state(overrides)
    ranks = run_probe(tmp_path, overrides)
    expected = expected_points(state)
    for point, planned in expected.items():
        # the plan is per rank, for the rank holding the most
        measured = {kind: max(rank["points"][point][kind] for rank in ranks) for kind in planned}
        for kind in ("parameters", "master_weights", "adam_states"):
            if point in ("accumulating", "step") and kind == "parameters" and state.setup.stage == 3:
                # ZeRO-3 has gathered only part of its persistent parameters after the first
                # backward and releases them for the optimizer step: the plan counts them throughout
                assert measured[kind] <= planned[kind], (point, kind, measured, planned)
            else:
                assert measured[kind] == planned[kind], (point, kind, measured, planned)
        assert 0 <= measured["other"] - planned["other"] <= MARGIN, (point, measured, planned)
    check_checkpoint(state, ranks[0]["files"])


@pytest.mark.slow
def test_offload_totals_equal_a_real_engine(tmp_path):
    """zero3_offload (with the flag DeepSpeed needs for torch's AdamW): on CPU device and host are
    one memory, so the totals are compared."""
    template = read_template("zero3_offload", "bf16")
    template["zero_force_ds_cpu_optimizer"] = False
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(template))
    overrides = [*WIDER, f"deepspeed.template={path}", "deepspeed.precision=bf16"]
    state = planned_state(overrides, template)
    assert state.setup.offload_optimizer and state.setup.offload_param
    ranks = run_probe(tmp_path, overrides)
    held = state.parameters + state.persistent_buffers + state.host_total - state.host["adam_states"]
    for point, planned in (("boundary", held), ("after_step", held + state.host["adam_states"])):
        measured = max(sum(rank["points"][point].values()) for rank in ranks)
        assert 0 <= measured - planned <= MARGIN, (point, measured, planned)
    check_checkpoint(state, ranks[0]["files"])


def test_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    by_key = {field.alias or name: int(field.default) for name, field in fields.items() if (field.alias or name) in DEFAULTS}
    assert by_key == DEFAULTS


def test_templates_read_as_zero_setups():
    setups = {name: ZeroSetup.from_deepspeed(read_template(name, "bf16"), "bf16")
              for name in ("zero1", "zero2", "zero3", "zero3_offload")}
    assert [s.stage for s in setups.values()] == [1, 2, 3, 3]
    assert setups["zero2"].reduce_bucket_size == 50_000_000 and not setups["zero2"].overlap_comm
    assert setups["zero3"].overlap_comm is False  # the templates set it; DeepSpeed's default would be on
    assert setups["zero3_offload"].offload_optimizer and setups["zero3_offload"].offload_param
    assert setups["zero3_offload"].name == "ZeRO-3+offload"


# ----- the command -----


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", "--config", str(TINY), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_plan_names_every_stage_and_a_recommendation(capsys):
    code, out, _ = plan_cli(capsys, "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "1GB")
    assert code == 0
    for text in ("ZeRO-1", "ZeRO-2 *", "ZeRO-3", "ZeRO-3+offload", "largest micro batch that fits (of 4)",
                 "recommended: ZeRO-1 (deepspeed.template=zero1), micro batch 2 x 2 ranks x 2 accumulation",
                 "MiB per GPU",
                 "reserve 102.40 MiB", "at 1.00 GiB/s"):
        assert text in out, out


def test_json_plan_is_consistent_with_its_budget(capsys):
    # the published templates' 50M-element reduce buckets take 200 MB in fp32: the budget leaves
    # room for some hundred tiny samples, fewer than the rank's share of 2048
    overrides = ["train.micro_batch_size=auto", "train.global_batch_size=4096"]
    code, out, _ = plan_cli(capsys, "--gpus-per-node", "2", "--gpu-memory", "1GB", "--reserve", "700MB", "--json",
                            *overrides)
    plan = json.loads(out)
    budget = plan["cluster"]["budget"]
    assert budget == 324 * 2**20 and plan["cluster"]["world_size"] == 2
    stages = plan["stages"]
    assert [s["template"] for s in stages] == ["zero1", "zero2", "zero3", "zero3_offload"]
    assert [s["configured"] for s in stages] == [False, True, False, False]
    fitting = [s for s in stages if s["fits"]]
    assert fitting and code == 0
    for stage in fitting:
        assert stage["peak"] <= budget
        assert stage["split"]["micro_batch"] * stage["split"]["accumulation"] * 2 == 4096
    # the memory limit binds below the rank's share: the micro batch after it must not fit
    config = load_config(TINY, overrides)
    cluster = Cluster(1, 2, GIB, 700 * 2**20, float(GIB))
    result = plan_run(config, cluster)
    from mvar_dist.memory.plan import PassCounter

    counter = PassCounter(config.model, "fp32", 0)
    for stage in result.stages:
        assert 0 < stage.largest_micro_batch < 2048
        assert stage.peak_at(counter.largest(stage.largest_micro_batch)) <= budget
        assert stage.peak_at(counter.largest(stage.largest_micro_batch + 1)) > budget
    assert plan["recommended"] == result.stages[result.recommended].template


def test_plan_counts_the_activations_of_the_largest_pass():
    from mvar_dist.memory.activations import count_activations

    config = load_config(TINY, ["train.activation_checkpointing=blocks"])
    plan = plan_run(config, Cluster(1, 2, GIB, 0, float(GIB)))
    exact = max(count_activations(config.model, 1, dtype=torch.float32, checkpointing=1, scales=scales).peak_bytes
                for scales in [(0, 1), (2,), (3,)])
    assert plan.per_sample.activations == exact and plan.checkpointing == 1


def test_a_config_that_does_not_fit_says_so(capsys):
    code, out, _ = plan_cli(capsys, "--gpus-per-node", "2", "--gpu-memory", "100MB")
    assert code == 1
    assert "does not fit: no ZeRO stage holds one sample per GPU within 90.00 MiB" in out
    code, out, _ = plan_cli(capsys, "--gpus-per-node", "2", "--gpu-memory", "1GB", "--reserve", "700MB",
                            "train.global_batch_size=4096", "train.micro_batch_size=2048")
    assert code == 1
    assert "does not fit: train.micro_batch_size=2048 fits no stage" in out
    assert "train.micro_batch_size=auto train.max_micro_batch_size=" in out


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "80"], "'80' needs a unit, e.g. 80GB"),
    (["--gpu-memory", "lots"], "'lots' is not a size"),
    (["--nodes", "0"], "must be >= 1, got 0"),
    (["--reserve", "120%"], "'120%' must be in 0% .. 99%"),
    (["--reserve", "2GB", "--gpu-memory", "1GB"], "--reserve (2.0 GiB) must be less than --gpu-memory (1.0 GiB)"),
    (["--write-bandwidth", "0GB/s"], "'0GB/s' must be more than 0"),
])
def test_bad_flags_are_refused_naming_the_flag(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "--config", str(TINY), "--gpus-per-node", "2", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_config_errors_are_one_line(capsys):
    code, _, err = plan_cli(capsys, "--gpus-per-node", "8")  # 8 images cannot be split 2 per pass over 8 ranks
    assert code == 2
    assert err.startswith("mvar-dist plan: train.micro_batch_size=2 does not divide")
    code, _, err = plan_cli(capsys, "--gpus-per-node", "2", "train.totl_steps=3")
    assert code == 2 and "did you mean 'train.total_steps'" in err


def documented_plans() -> list[tuple[str, str]]:
    """(file, command) of every ``mvar-dist plan`` line in the bash blocks of the README and docs."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.DOTALL):
            found += [(doc.name, line.split(" #")[0].strip()) for line in block.replace("\\\n", " ").splitlines()
                      if line.startswith("mvar-dist plan ")]
    return found


def test_documented_plans_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = documented_plans()
    assert len(commands) >= 2
    for doc, command in commands:
        code = cli.main(shlex.split(command)[1:])
        out, err = capsys.readouterr()
        assert code == 0, (doc, command, err)
        assert json.loads(out)["fits"] if "--json" in command else "recommended:" in out, (doc, command)
