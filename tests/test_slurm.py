"""SLURM launching: sbatch scripts (golden files, templates in sync), bad input, and real jobs on
the local cluster (.ci/start_slurm.sh starts it; tests that need it skip where sinfo is absent)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_dist.cli import main as cli_main
from mvar_dist.config import LaunchConfig, LaunchError, validate_launch
from mvar_dist.launch.status import read_job_record, run_status, write_job_record

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
REFERENCE_CONFIG = GOLDEN / "submit_reference.yaml"
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
HAVE_SLURM = shutil.which("sinfo") is not None and shutil.which("sbatch") is not None
needs_cluster = pytest.mark.skipif(
    not HAVE_SLURM, reason="no SLURM client here (sinfo/sbatch not found); CI starts a local cluster in .ci/start_slurm.sh"
)
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
# flags whose value is a path or a submission-time choice, not a resource
PER_SUBMISSION_FLAGS = ("output", "error", "wckey", "array", "dependency")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def normalized(script: str, run_dir: Path) -> str:
    """The script with the two machine-specific strings (run dir, interpreter) as placeholders."""
    return script.replace(str(run_dir), "<RUN_DIR>").replace(shlex.quote(sys.executable), "<PYTHON>")


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            if key not in PER_SUBMISSION_FLAGS:
                options[key] = value
    return options


# ----- scripts -----

GOLDEN_SUBMIT_FLAGS = (
    "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "8", "--mem", "480G", "--time", "1440",
    "--partition", "gpu", "--account", "proj", "--qos", "normal", "--constraint", "a100", "--exclusive",
    "--job-name", "mvar-d16", "--slurm-setup", "module load cuda/12.4", "--slurm-setup", "export NCCL_DEBUG=WARN",
    "--signal-delay", "180", "--max-requeues", "3",
)


def test_dry_run_matches_golden_file_and_has_the_resources(capsys, tmp_path):
    run_dir = tmp_path / "run"
    args = ("submit", "--config", str(REFERENCE_CONFIG), f"run.dir={run_dir}", *GOLDEN_SUBMIT_FLAGS, "--dry-run")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert normalized(out, run_dir) == (GOLDEN / "submit_dry_run.sbatch").read_text()
    options = sbatch_options(out)
    expected = {"nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "8", "mem": "480G",
                "time": "1440", "partition": "gpu", "account": "proj", "qos": "normal", "constraint": "a100",
                "job-name": "mvar-d16", "signal": "USR2@180"}
    assert {k: options.get(k) for k in expected} == expected
    assert "exclusive" in options and "requeue" in options
    assert "module load cuda/12.4\nexport NCCL_DEBUG=WARN\n" in out
    assert not run_dir.exists(), "a dry run must not create the run directory"
    assert run_cli(capsys, *args)[1] == out  # deterministic


def test_prep_dry_run_matches_golden_file(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "tok.pth").write_bytes(b"")
    code, out, err = run_cli(
        capsys, "submit-prep", "--array-tasks", "4", "--cpus-per-task", "2", "--time", "30", "--dry-run", "--",
        str(tmp_path / "images"), "--out", str(tmp_path / "codes"), "--split", "train", "--tokenizer", str(tmp_path / "tok.pth"),
    )
    assert code == 0, err
    assert normalized(out, tmp_path) == (GOLDEN / "submit_prep_dry_run.sbatch").read_text()


@pytest.mark.parametrize("template", ["train.sbatch", "prep_array.sbatch", "merge.sbatch"])
def test_plain_sbatch_templates_match_dry_run(capsys, tmp_path, template):
    text = (REPO / "slurm" / template).read_text()
    command = next(line for line in text.splitlines() if line.startswith("# sync-with: "))
    argv = shlex.split(command[len("# sync-with: mvar-dist "):])
    (tmp_path / "SOURCE").mkdir()
    (tmp_path / "TOKENIZER").write_bytes(b"")
    placeholders = {"SOURCE": str(tmp_path / "SOURCE"), "OUT": str(tmp_path / "OUT"), "TOKENIZER": str(tmp_path / "TOKENIZER")}
    argv = [placeholders.get(a, a) for a in argv]
    if argv[0] == "submit":
        argv.insert(3, f"run.dir={tmp_path / 'run'}")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    if template == "merge.sbatch":
        out = out.split("# ---- merge job ----")[1]
    elif template == "prep_array.sbatch":
        out = out.split("# ---- merge job ----")[0]
    assert sbatch_options(text) == sbatch_options(out)


def test_resources_default_to_the_config_launch_section(capsys, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(REFERENCE_CONFIG.read_text() + "launch:\n  tasks_per_node: 2\n  time: 30\n"
                      "  partition: debug\n  job_name: from-config\n")
    code, out, err = run_cli(capsys, "submit", "--config", str(config), f"run.dir={tmp_path / 'run'}",
                             "train.global_batch_size=32", "--time", "45", "--dry-run")
    assert code == 0, err
    options = sbatch_options(out)
    assert (options["ntasks-per-node"], options["partition"], options["job-name"]) == ("2", "debug", "from-config")
    assert options["time"] == "45"  # the flag wins over the config


# ----- bad input -----


def test_launch_validation_names_the_flag():
    with pytest.raises(LaunchError, match="--nodes"):
        validate_launch(LaunchConfig(nodes=0))
    with pytest.raises(LaunchError, match="one task per GPU"):
        validate_launch(LaunchConfig(gpus_per_node=4, tasks_per_node=2))
    with pytest.raises(LaunchError, match="--mem"):
        validate_launch(LaunchConfig(mem="lots"))
    with pytest.raises(LaunchError, match="--signal-delay"):
        validate_launch(LaunchConfig(time=2, signal_delay_s=120))
    validate_launch(LaunchConfig(tasks_per_node=2, time=30))


def test_bad_input_fails_before_submitting(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "submit", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml does not exist" in err
    code, _, err = run_cli(capsys, "submit", "--config", str(REFERENCE_CONFIG), f"run.dir={run_dir}", "--nodes", "0")
    assert code == 2 and "--nodes (launch.nodes) must be >= 1, got 0" in err
    code, _, err = run_cli(capsys, "submit", "--config", str(REFERENCE_CONFIG), f"run.dir={run_dir}", "train.micro_batch_size=3")
    assert code == 2 and "global_batch_size" in err  # the experiment is checked too, for the job's world size
    assert not run_dir.exists()


def write_manifest_stub(split_dir: Path) -> Path:
    """A manifest.json load_manifest accepts (no shards): enough for the checks before submitting."""
    split_dir.mkdir(parents=True, exist_ok=True)
    path = split_dir / "manifest.json"
    path.write_text(json.dumps({"format": "mvar-dist-codes", "format_version": 1, "split": split_dir.name, "shards": []}))
    return path


def refuse_submission(*args, **kwargs):
    raise AssertionError("the job was submitted although a check should have refused it")


def test_missing_manifests_are_refused_before_submitting(capsys, tmp_path, monkeypatch):
    import mvar_dist.commands.submit as submit_command

    monkeypatch.setattr(submit_command, "submit", refuse_submission)
    run_dir, manifest = tmp_path / "run", write_manifest_stub(tmp_path / "codes" / "train")
    base = ("submit", "--config", str(TINY_CONFIG), f"run.dir={run_dir}", "tokenizer.checkpoint=null", "--cluster", "local")
    missing = tmp_path / "gone" / "manifest.json"
    code, _, err = run_cli(capsys, *base, f"data.train_manifest={missing}")
    assert code == 2 and f"data.train_manifest: manifest {missing} does not exist" in err
    code, _, err = run_cli(capsys, *base, f"data.train_manifest={manifest}", f"data.val_manifest={tmp_path / 'gone'}")
    assert code == 2 and f"data.val_manifest: manifest {tmp_path / 'gone'} does not exist" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("not a manifest")
    code, _, err = run_cli(capsys, *base, f"data.train_manifest={notes}")
    assert code == 2 and f"data.train_manifest: {notes} is not a readable manifest.json" in err
    code, _, err = run_cli(capsys, "submit", "--config", str(REFERENCE_CONFIG), f"run.dir={run_dir}", "--cluster", "local")
    assert code == 2 and "data.train_manifest is not set" in err
    assert not run_dir.exists()


def test_manifest_urls_and_dry_runs_are_not_checked(tmp_path):
    from mvar_dist.launch.submit import prepare

    manifest = write_manifest_stub(tmp_path / "codes" / "train")
    base = [f"run.dir={tmp_path / 'run'}", "tokenizer.checkpoint=null"]
    # a split directory is as good as its manifest.json; a URL can only be read by the job
    prepare(TINY_CONFIG, [*base, f"data.train_manifest={manifest.parent}", "data.val_manifest=s3://bucket/val/manifest.json"],
            {"cluster": "local"})
    prepare(TINY_CONFIG, [*base, "data.train_manifest=pipe:aws s3 cp s3://bucket/train/manifest.json -",
                          "data.shard_url_template=pipe:aws s3 cp s3://bucket/{split}/{name} -"], {"cluster": "local"})
    prepare(TINY_CONFIG, [*base, f"data.train_manifest={tmp_path / 'gone'}"], {"cluster": "local"}, dry_run=True)


def test_the_job_logs_where_submit_says(tmp_path, monkeypatch):
    """The tracking URI is fixed at submission: the job must not depend on the environment it
    starts in (a cluster profile, sbatch --export=NONE)."""
    from mvar_dist.launch.submit import prepare

    manifest = write_manifest_stub(tmp_path / "codes" / "train")
    base = [f"run.dir={tmp_path / 'run'}", "tokenizer.checkpoint=null", f"data.train_manifest={manifest}"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    config, _ = prepare(TINY_CONFIG, base, {"cluster": "local"})
    assert config.tracking.uri == "http://127.0.0.1:5999"
    config, _ = prepare(TINY_CONFIG, [*base, "tracking.uri=sqlite:////elsewhere.db"], {"cluster": "local"})
    assert config.tracking.uri == "sqlite:////elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    config, _ = prepare(TINY_CONFIG, base, {"cluster": "local"})
    assert config.tracking.uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"


def test_status_without_submission_says_so(capsys, tmp_path):
    code, _, err = run_cli(capsys, "status", str(tmp_path))
    assert code == 2 and "slurm_job.json not found" in err


def test_job_record_keeps_earlier_job_ids(tmp_path):
    base = {"kind": "train", "cluster": "local", "folder": "f", "stdout": "o", "stderr": "e"}
    write_job_record(tmp_path, dict(base, job_id="11"))
    write_job_record(tmp_path, dict(base, job_id="12"))
    record = read_job_record(tmp_path)
    assert record["job_id"] == "12" and record["previous_job_ids"] == ["11"]
    status = run_status(tmp_path)
    assert status["checkpoint"] is None and status["mlflow"] is None


def test_requeues_are_bounded(tmp_path):
    from mvar_dist.config import config_from_dict
    from mvar_dist.launch.job import TrainingJob

    job = TrainingJob(config_from_dict({"run": {"dir": str(tmp_path)}}), max_requeues=2)
    again = job.checkpoint()
    assert again.function.requeues == 1 and again.function.config is job.config
    assert again.function.checkpoint().function.requeues == 2
    assert TrainingJob(job.config, max_requeues=2, requeues=2).checkpoint() is None


# ----- the local cluster -----


def wait_for_job(job_id: str, timeout_s: float = 600) -> str:
    """Poll sacct until the job (every array task) is in a final state; returns the states."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True).stdout
        states = [line.split()[0] for line in out.splitlines() if line.strip()]
        if states and all(s in TERMINAL_STATES for s in states):
            return ",".join(sorted(set(states)))
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")


@needs_cluster
@pytest.mark.slow
def test_unknown_partition_is_refused_before_submitting(capsys, tmp_path):
    run_dir, manifest = tmp_path / "run", write_manifest_stub(tmp_path / "codes" / "train")
    code, _, err = run_cli(capsys, "submit", "--config", str(REFERENCE_CONFIG), f"run.dir={run_dir}",
                           f"data.train_manifest={manifest}", "--partition", "nope")
    assert code == 2 and "partition 'nope' does not exist" in err and "debug" in err
    assert not run_dir.exists()


@needs_cluster
@pytest.mark.parametrize(
    "flags, reason",
    [
        (("--cpus-per-task", "4096"), "'allocation failure: Requested node configuration is not available'"),
        (("--mem", "64T"), "'allocation failure: Requested node configuration is not available'"),
        # no GPU at all on a CPU cluster (an invalid gres), more than a node has on a GPU cluster
        (("--gpus-per-node", "64", "train.global_batch_size=128"), "--gpus-per-node=64"),
    ],
)
def test_resources_no_node_has_are_refused_before_submitting(capsys, tmp_path, monkeypatch, flags, reason):
    """sbatch would queue these and the job would pend forever; sbatch --test-only refuses them."""
    import mvar_dist.commands.submit as submit_command

    monkeypatch.setattr(submit_command, "submit", refuse_submission)
    run_dir, manifest = tmp_path / "run", write_manifest_stub(tmp_path / "codes" / "train")
    code, _, err = run_cli(capsys, "submit", "--config", str(TINY_CONFIG), f"run.dir={run_dir}", "tokenizer.checkpoint=null",
                           f"data.train_manifest={manifest}", "--cluster", "slurm", "--time", "15", *flags)
    assert code == 2, err
    assert "the cluster can never run this job on the default partition: sbatch --test-only" in err and reason in err
    assert not run_dir.exists()


@needs_cluster
def test_prep_tasks_no_node_can_run_are_refused_before_submitting(capsys, tmp_path, monkeypatch):
    import mvar_dist.commands.submit_prep as submit_prep_command

    monkeypatch.setattr(submit_prep_command, "submit_prep", refuse_submission)
    images, tokenizer = tmp_path / "images", tmp_path / "tokenizer.pth"
    (images / "c0").mkdir(parents=True)
    tokenizer.write_bytes(b"")
    code, _, err = run_cli(capsys, "submit-prep", "--array-tasks", "2", "--cpus-per-task", "4096", "--time", "15", "--",
                           str(images), "--split", "train", "--out", str(tmp_path / "codes"), "--tokenizer", str(tokenizer))
    assert code == 2, err
    assert "the cluster can never run this job" in err


@needs_cluster
def test_resources_a_node_has_pass_the_cluster_check(tmp_path):
    from mvar_dist.launch.submit import prepare

    manifest = write_manifest_stub(tmp_path / "codes" / "train")
    overrides = [f"run.dir={tmp_path / 'run'}", "tokenizer.checkpoint=null", f"data.train_manifest={manifest}"]
    _, launch = prepare(TINY_CONFIG, overrides, {"cluster": "slurm", "tasks_per_node": 2, "time": 15, "cpus_per_task": 1})
    assert launch.world_size == 2


@needs_cluster
@pytest.mark.slow
def test_two_task_job_agrees_on_rendezvous(tmp_path):
    from mvar_dist.launch.job import export_rendezvous_env
    from mvar_dist.launch.slurm import make_executor

    executor = make_executor(LaunchConfig(tasks_per_node=2, time=15, job_name="rendezvous-test"), tmp_path)
    job = executor.submit(export_rendezvous_env, "slurm")  # the job's own code, in a real 2-task job
    first, second = job.results()
    assert (first["RANK"], second["RANK"], first["WORLD_SIZE"]) == ("0", "1", "2")
    assert first["MASTER_ADDR"] == second["MASTER_ADDR"] and first["MASTER_PORT"] == second["MASTER_PORT"]
    assert (first["LOCAL_RANK"], second["LOCAL_RANK"]) == ("0", "1")


TOKENIZER_FLAGS = (
    "--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--patch-nums", "1,2,3,4",
    "--tokenizer-options", json.dumps({"ch_mult": [1, 2], "num_res_blocks": 1}),
)


def make_prep_inputs(root: Path) -> tuple[Path, Path]:
    """A 3-class image folder (12 images) and a tiny random tokenizer checkpoint."""
    from mvar_dist.tokenizer import MultiScaleVQVAE

    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cow"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{name}_{i}.png")
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 2), num_res_blocks=1)
    torch.save(tokenizer.state_dict(), root / "tok.pth")
    return root / "images", root / "tok.pth"


@needs_cluster
@pytest.mark.slow
def test_prep_job_array_equals_single_process_run(capsys, tmp_path):
    images, tokenizer = make_prep_inputs(tmp_path)
    prep_args = ("--split", "train", "--name", "tiny", "--tokenizer", str(tokenizer), *TOKENIZER_FLAGS,
                 "--shard-size", "3", "--device", "cpu", "--decode-threads", "1", "--no-progress")
    code, out, err = run_cli(
        capsys, "submit-prep", "--array-tasks", "3", "--cpus-per-task", "1", "--time", "15", "--",
        str(images), "--out", str(tmp_path / "array"), *prep_args,
    )
    assert code == 0, err
    record = read_job_record(tmp_path / "array" / "train")
    assert code == 0 and record["kind"] == "prep" and record["num_tasks"] == 3
    # meanwhile, the same prep in one process, as a user without SLURM runs it
    assert cli_main(["prep", str(images), "--out", str(tmp_path / "single"), *prep_args]) == 0
    assert wait_for_job(record["merge_job_id"]) == "COMPLETED"
    assert wait_for_job(record["job_id"]) == "COMPLETED"

    array_manifest = json.loads((tmp_path / "array" / "train" / "manifest.json").read_text())
    single_manifest = json.loads((tmp_path / "single" / "train" / "manifest.json").read_text())
    assert array_manifest["num_shards"] == 4 and array_manifest["num_samples"] == 12
    assert array_manifest == single_manifest
    for shard in single_manifest["shards"]:
        a, b = tmp_path / "array" / "train" / shard["name"], tmp_path / "single" / "train" / shard["name"]
        assert a.read_bytes() == b.read_bytes()
    status = run_status(tmp_path / "array" / "train")
    assert status["job"]["state"] == "3 COMPLETED" and status["merge_job"]["state"] == "COMPLETED"
