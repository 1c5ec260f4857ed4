"""Export: ZeRO 1/2/3 checkpoints -> safetensors / released .pth -> MVAR.from_pretrained, same logits.

The DeepSpeed checkpoints are written by this file run as a script in a child process (one
rank, gloo, CPU), so that the test process itself never initialises torch.distributed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar_dist.cli import main as cli_main
from mvar_dist.commands.export import main
from mvar_dist.model import MVAR, MVARConfig
from mvar_dist.model.released import derived_buffers, official_state_dict
from mvar_dist.run_dir import RunDir
from mvar_dist.runtime.zero_checkpoint import strip_wrapper_prefixes
from mvar_dist.training.export import export_run

REFERENCE_KEYS = Path(__file__).parent / "data" / "mvar_d16_keys.json"  # copy of shared/reference
STAGES = (1, 2, 3)
RUNS = [f"zero{stage}" for stage in STAGES] + ["zero2_bf16"]  # run names: zero<stage>[_<precision>]
TRACKED_STAGE = 2  # the run that also has an MLflow run
TOKENIZER_STAGE = 1  # the run whose config names a tokenizer checkpoint

TINY_MODEL = {
    "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10, "vocab_size": 16,
    "z_channels": 4, "patch_nums": [1, 2, 3, 4], "refine_step": 3, "kernel_size": 3,
}


def tiny_experiment(run_dir: Path, stage: int, tokenizer: Path | None = None, precision: str = "fp32") -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0},
        "model": TINY_MODEL,
        "tokenizer": {"kind": "patch", "checkpoint": None if tokenizer is None else str(tokenizer)},
        "train": {"global_batch_size": 2, "micro_batch_size": 2, "total_steps": 4},
        "optim": {"lr": 1e-2},
        "deepspeed": {"template": f"zero{stage}", "precision": precision, "backend": "gloo"},
    }


# ----- fast tests: no DeepSpeed -----


def _released_keys(depth: int) -> tuple[list[str], dict[str, list[int]], dict[str, str]]:
    """The d16 listing narrowed to ``depth`` blocks (names only depend on the block index)."""
    reference = json.loads(REFERENCE_KEYS.read_text())
    keep = [k for k in reference["state_dict"] if not k.startswith("blocks.") or int(k.split(".")[1]) < depth]
    return keep, reference["state_dict"], reference["dtypes"]


def test_official_layout_equals_the_released_d16_checkpoint():
    config = MVARConfig(depth=16)
    with torch.device("meta"):
        state = MVAR(config).state_dict()
    official = official_state_dict(state, config)
    keys, shapes, dtypes = _released_keys(16)
    assert list(official) == keys
    assert {k: list(v.shape) for k, v in official.items()} == shapes
    for name in ("lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias"):
        assert str(official[name].dtype).removeprefix("torch.") == dtypes[name]


def test_derived_buffers_follow_the_released_masks():
    config = MVARConfig(**TINY_MODEL)
    buffers = derived_buffers(config)
    level = torch.tensor([0, 1, 1, 1, 1] + [2] * 9 + [3] * 16)
    assert torch.equal(buffers["lvl_1L"], level[None])
    mask = buffers["attn_bias_for_masking"][0, 0]
    assert mask.shape == (30, 30)
    # MVAR: token 0 sees itself; every scale sees exactly its own tokens
    assert torch.isfinite(mask[0]).nonzero().flatten().tolist() == [0]
    assert torch.isfinite(mask[3]).nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert torch.isfinite(mask[7]).nonzero().flatten().tolist() == list(range(5, 14))
    assert torch.isfinite(mask[20]).nonzero().flatten().tolist() == list(range(14, 30))
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    var_mask = derived_buffers(MVARConfig(**TINY_MODEL, mode="var"))["attn_bias_for_masking"][0, 0]
    assert torch.isfinite(var_mask[3]).nonzero().flatten().tolist() == list(range(5))
    assert torch.isfinite(var_mask[7]).nonzero().flatten().tolist() == list(range(14))
    assert torch.isfinite(var_mask[29]).all()


def test_strip_wrapper_prefixes():
    state = {"module.head.weight": 1, "module._orig_mod.pos_start": 2, "lvl_embed.weight": 3}
    assert strip_wrapper_prefixes(state) == {"head.weight": 1, "pos_start": 2, "lvl_embed.weight": 3}


def test_clear_errors_for_missing_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="never completed a checkpoint"):
        RunDir(tmp_path).resolve_tag("latest")
    with pytest.raises(FileNotFoundError, match="available tags: \\['step_00000002'\\]"):
        RunDir(tmp_path).resolve_tag("step_00000001")
    with pytest.raises(FileNotFoundError, match="not an mvar-dist export"):
        MVAR.from_pretrained(tmp_path)
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


# ----- DeepSpeed checkpoints (slow) -----


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("zero_runs")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, __file__, str(root), *RUNS],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {name: root / name for name in RUNS}


def _logits(model: torch.nn.Module, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    reference = torch.load(run_dir / "reference.pt", weights_only=True)
    with torch.no_grad():
        logits = model(reference["label"], reference["teacher"], range(len(TINY_MODEL["patch_nums"])))
    return logits, reference["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_safetensors_export_gives_the_engine_logits(zero_runs, tmp_path, stage):
    run_dir = zero_runs[f"zero{stage}"]
    weights = export_run(run_dir, tmp_path / "export")
    assert weights.name == "model.safetensors"
    model = MVAR.from_pretrained(tmp_path / "export")  # the public entry
    logits, expected = _logits(model, run_dir)
    torch.testing.assert_close(logits, expected)

    metadata = json.loads((tmp_path / "export" / "config.json").read_text())
    assert metadata["model"] == MVARConfig(**TINY_MODEL).to_dict()
    assert metadata["patch_nums"] == TINY_MODEL["patch_nums"]
    training = metadata["training"]
    assert (training["steps"], training["images_seen"], training["checkpoint_tag"]) == (2, 4, "step_00000002")
    if stage == TOKENIZER_STAGE:
        from mvar_dist.tokenizer import PatchResidualTokenizer

        tokenizer = PatchResidualTokenizer.from_checkpoint(run_dir / "tokenizer.safetensors")
        assert metadata["tokenizer"]["identity"] == tokenizer.identity()
    else:
        assert metadata["tokenizer"]["identity"] is None
    if stage == TRACKED_STAGE:
        record = json.loads((run_dir / "mlflow_run.json").read_text())
        assert training["mlflow_run_id"] == record["run_id"]
        assert training["final_metrics"] == {"train/loss": 2.5, "lr": 0.01}
    else:
        assert training["mlflow_run_id"] is None and training["final_metrics"] == {}


@pytest.mark.slow
def test_older_tag_and_mlflow_logging(zero_runs, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = zero_runs[f"zero{TRACKED_STAGE}"]
    out = tmp_path / "export"
    assert main([str(run_dir), "--tag", "step_00000001", "--out", str(out), "--log-to-mlflow"]) == 0
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["training"]["steps"] == 1
    assert metadata["training"]["final_metrics"] == {"train/loss": 1.5, "lr": 0.01}
    model = MVAR.from_pretrained(out)
    with torch.no_grad():
        step1 = torch.load(run_dir / "reference_step1.pt", weights_only=True)
        logits = model(step1["label"], step1["teacher"], range(len(TINY_MODEL["patch_nums"])))
    torch.testing.assert_close(logits, step1["logits"])
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    listed = {a.path for a in client.list_artifacts(record["run_id"], "model/step_00000001")}
    assert {"model/step_00000001/model.safetensors", "model/step_00000001/config.json"} <= listed


@pytest.mark.slow
def test_official_pth_has_the_released_keys_and_loads_back(zero_runs, tmp_path):
    run_dir = zero_runs["zero3"]
    out = tmp_path / "official"
    assert main([str(run_dir), "--out", str(out), "--format", "official"]) == 0
    state = torch.load(out / "mvar_d2.pth", weights_only=True)
    keys, _, dtypes = _released_keys(TINY_MODEL["depth"])
    assert list(state) == keys
    for name in ("lvl_1L", "attn_bias_for_masking", "blocks.1.attn.zero_k_bias", "head.weight"):
        assert str(state[name].dtype).removeprefix("torch.") == dtypes[name]
    assert state["attn_bias_for_masking"].shape == (1, 1, 30, 30)
    assert not state["blocks.0.attn.zero_k_bias"].any()
    logits, expected = _logits(MVAR.from_pretrained(out), run_dir)
    torch.testing.assert_close(logits, expected)


@pytest.mark.slow
def test_bf16_export(zero_runs, tmp_path):
    from safetensors import safe_open

    run_dir = zero_runs["zero1"]
    export_run(run_dir, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as stored:
        assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = export_run(run_dir, tmp_path / "fp32")
    from safetensors.torch import load_file

    full, half = load_file(str(fp32)), load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for key in full:
        assert torch.equal(half[key], full[key].to(torch.bfloat16)), key
    logits, expected = _logits(MVAR.from_pretrained(tmp_path / "bf16"), run_dir)
    assert not torch.equal(logits, expected)  # rounded weights give different, close logits
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_bf16_training_exports_its_fp32_master_weights(zero_runs, tmp_path):
    from safetensors.torch import load_file

    run_dir = zero_runs["zero2_bf16"]
    module_weights = torch.load(run_dir / "module_weights.pt", weights_only=True)
    masters = load_file(str(export_run(run_dir, tmp_path / "fp32")))
    assert {t.dtype for t in masters.values()} == {torch.float32}
    rounded = load_file(str(export_run(run_dir, tmp_path / "bf16", dtype="bf16")))
    assert set(rounded) == set(module_weights)
    for key, weight in module_weights.items():
        assert weight.dtype == torch.bfloat16 and torch.equal(rounded[key], weight), key
    assert any(not torch.equal(masters[k], masters[k].bfloat16().float()) for k in masters)  # masters keep more bits


# ----- the checkpoint writer (child process) -----


def _write_runs(root: Path, names: list[str]) -> None:
    """Train a tiny MVAR for two steps with DeepSpeed ZeRO ``stage`` on one CPU rank; checkpoint
    both steps exactly as the trainer does, and keep the engine's eval logits beside them."""
    import deepspeed
    import torch.nn.functional as F

    from mvar_dist.config import config_from_dict, experiment_hash, save_resolved
    from mvar_dist.run_state import RankState, RunState
    from mvar_dist.runtime import checkpoint as checkpoints
    from mvar_dist.runtime.distributed import free_port
    from mvar_dist.runtime.rng import rng_states
    from mvar_dist.tokenizer import PatchResidualTokenizer
    from mvar_dist.tracking import RunTracker
    from mvar_dist.training.optimizer import build_engine

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo", init_method="env://")
    torch.set_num_threads(1)
    for name in names:
        stage, _, precision = name.removeprefix("zero").partition("_")
        stage, precision = int(stage), precision or "fp32"
        run_dir = root / name
        run_dir.mkdir(parents=True)
        tokenizer = None
        if name == f"zero{TOKENIZER_STAGE}":  # an (unfitted) quickstart tokenizer: export records its identity
            tokenizer = run_dir / "tokenizer.safetensors"
            PatchResidualTokenizer().save(tokenizer)
        config = config_from_dict(tiny_experiment(run_dir, stage, tokenizer, precision))
        save_resolved(config, run_dir / "config.yaml")
        torch.manual_seed(stage)
        engine = build_engine(MVAR(config.model), config, world_size=1)
        tracker = None
        if name == f"zero{TRACKED_STAGE}":
            tracker = RunTracker.create(config.to_dict(), run_dir, None, "export-test", None, 0, system_metrics=False)
        scales = range(len(config.model.patch_nums))
        num_tokens = config.model.layout.num_tokens
        for step in (1, 2):
            label = torch.randint(0, 10, (2,))
            teacher = torch.randn(2, num_tokens - 1, config.model.z_channels)
            targets = torch.randint(0, 16, (2, num_tokens))
            teacher = teacher.to(next(engine.module.parameters()).dtype)  # bf16 engines run in bf16
            engine.train()
            logits = engine(label, teacher, scales)
            engine.backward(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
            engine.step()
            engine.eval()
            with torch.no_grad():
                reference = engine(label, teacher, scales)
            reference_file = "reference.pt" if step == 2 else "reference_step1.pt"
            torch.save({"label": label, "teacher": teacher, "logits": reference}, run_dir / reference_file)
            if tracker is not None:
                tracker.log_metrics({"train/loss": step + 0.5, "lr": 0.01}, step)
                tracker.flush()
            run_state = RunState(step=step, config=config.to_dict(), world_size=1, config_hash=experiment_hash(config),
                                 mlflow_run_id=tracker.run_id if tracker else None)
            checkpoints.save_checkpoint(checkpoints.Engines(engine), RunDir(run_dir), run_state,
                                        RankState(loader={}, rng=rng_states(torch.device("cpu"))), keep_last=2)
        if tracker is not None:
            tracker.finish()
        if precision != "fp32" and stage < 3:  # the low-precision weights the engine computes with
            torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, run_dir / "module_weights.pt")
        engine.destroy()


if __name__ == "__main__":
    _write_runs(Path(sys.argv[1]), sys.argv[2:])


@pytest.mark.slow
def test_damaged_or_swapped_weights_are_refused_naming_the_file(zero_runs, tmp_path):
    """config.json records the weights' sha256: a file zeroed in part, or another run's weights of
    the same shape, must not load silently under the wrong config."""
    first, second = (export_run(zero_runs[f"zero{stage}"], tmp_path / f"export{stage}") for stage in STAGES[:2])
    metadata = json.loads((first.parent / "config.json").read_text())
    assert metadata["weights_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    data = bytearray(first.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{first}: sha256 [0-9a-f]{{12}}\.\.\. differs from [0-9a-f]{{12}}\.\.\. recorded in"):
        MVAR.from_pretrained(first.parent)
    MVAR.from_pretrained(first.parent, verify=False)  # the caller's choice, for speed: loads (the zeros)
    first.write_bytes(second.read_bytes())
    with pytest.raises(ValueError, match="differs from"):
        MVAR.from_pretrained(first.parent)


@pytest.mark.slow
def test_export_out_never_mixes_two_exports(zero_runs, tmp_path, capsys):
    first, second = (str(zero_runs[f"zero{stage}"]) for stage in STAGES[:2])
    out = tmp_path / "out"
    assert cli_main(["export", first, "--out", str(out)]) == 0
    (out / ".model.safetensors.x1y2.tmp").write_bytes(b"\0" * 1000)  # what a killed export leaves
    assert cli_main(["export", first, "--out", str(out), "--format", "official"]) == 0  # the same run again
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mvar_d2.pth"]  # no safetensors, no temp file
    capsys.readouterr()
    assert cli_main(["export", second, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"mvar-dist export: --out {out} holds an export of {Path(first).resolve()}; choose a new or empty "
                   f"directory, or pass --force to replace it\n")
    assert cli_main(["export", second, "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["training"]["run_dir"] == str(Path(second).resolve())

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    capsys.readouterr()
    assert cli_main(["export", first, "--out", str(notes)]) == 2
    assert "holds 1 other file (todo.txt)" in capsys.readouterr().err
    assert cli_main(["export", first, "--out", str(notes / "todo.txt")]) == 2
    assert capsys.readouterr().err == f"mvar-dist export: --out {notes / 'todo.txt'} is a file, not a directory\n"
    assert cli_main(["export", first, "--out", str(notes), "--force"]) == 0
    assert (notes / "todo.txt").read_text() == "mine"  # --force replaces an export's files, nothing else
