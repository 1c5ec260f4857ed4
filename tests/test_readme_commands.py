"""The README's "ImageNet 256 px, end to end" block, run as written, in order, with bash, on a
miniature ImageNet and the local SLURM cluster.

What is replaced, and nothing else:

- the data: ``/data/imagenet`` is a miniature Kaggle layout (``train/<synset>/*.JPEG``, a flat
  ``val/`` and ``LOC_val_solution.csv``), ``/data/codes`` a temporary folder;
- the weights: ``checkpoints/vae_ch160v4096z32.pth`` has the released tokenizer's architecture
  with random weights (the prep commands and the configs load it as written);
  ``checkpoints/var_d16.pth`` is a released-format VAR of the tiny size below;
  ``checkpoints/VIRTUAL_imagenet256_labeled.npz`` is a reference batch of 8 random images and
  ``checkpoints/pt_inception-2015-12-05-6726825d.pth`` Inception weights of the converted
  layout with random values;
- the MLflow address: ``http://mlflow-host:5000`` is a real ``mlflow server`` on loopback;
- the machine: every ``mvar-dist submit`` first runs exactly as written with ``--dry-run`` (the
  4 x 8 GPU batch split must resolve), then for real with this machine's resources appended
  (1 node, 2 CPU ranks, the local partition) and a tiny model (depth 2, width 64, the 4 classes
  of the miniature, 4 steps, global batch 8: a d16 does not train on 2 CPU cores); ``sample``
  draws 4 images (one per class), not 50,000.

The commands run from a folder that holds the repository's ``configs/`` and the weights, as the
README's "commands run from this repository's root" says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow_server import MlflowServer
from PIL import Image
from test_evaluate import write_random_inception
from test_slurm import HAVE_SLURM, needs_cluster, wait_for_job

REPO = Path(__file__).resolve().parents[1]
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
TRAIN_PER_CLASS, VAL_IMAGES = 2, 4
TINY_MODEL = ("model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.attention_backend=torch", "model.num_classes=4",
              "train.total_steps=4", "train.global_batch_size=8", "train.max_micro_batch_size=4",
              "optim.warmup_steps=1", "checkpoint.every_steps=2", "data.num_workers=0", "data.shuffle_window=8")


def readme_block(section: str = "## ImageNet 256 px, end to end") -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(section)
    body = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    assert len(blocks) == 1, f"expected one bash block in the README's {section!r}"
    return blocks[0]


def doc_commands(program: str) -> list[tuple[str, str]]:
    """(file, command) of every ``program ...`` line in the bash blocks of the docs."""
    found = []
    for doc in sorted((REPO / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            found += [(doc.name, line.split(" #")[0].rstrip()) for line in logical_lines(block)
                      if line.startswith(program + " ")]
    return found


def shown_output(doc: str, command: str) -> list[str]:
    """The lines a doc shows as the output of ``command`` (a text block after its marker)."""
    text = (REPO / "docs" / doc).read_text()
    start = text.index(f"<!-- output: {command} -->")
    return re.search(r"```text\n(.*?)```", text[start:], re.S).group(1).splitlines()


def output_pattern(shown: str) -> re.Pattern:
    """A shown output line with its paths, addresses, run ids and numbers left open."""
    parts = []
    for token in re.split(r"(\s+)", shown):
        if token.startswith(("/", "sqlite:", "http")):
            parts.append(r"\S+")
        else:
            parts.append(re.sub(r"[0-9a-f]{32}|\d+", lambda m: "[0-9a-f]{32}" if len(m[0]) == 32 else r"\d+", re.escape(token)))
    return re.compile("".join(parts))


def logical_lines(script: str) -> list[str]:
    """Lines with their backslash continuations joined."""
    return script.replace("\\\n", " ").splitlines()


def local_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    return next(p.rstrip("*") for p in out.split() if p.endswith("*"))


def rewrite(script: str, data: Path, mlflow_uri: str) -> tuple[str, str]:
    """The block with only the documented replacements, split where the jobs must have finished
    (after the ``status`` of step 2): the part that submits, and the part that reads the runs."""
    script = script.replace("/data/", f"{data}/").replace("http://mlflow-host:5000", mlflow_uri)
    machine = f"--nodes 1 --gpus-per-node 0 --tasks-per-node 2 --cpus-per-task 1 --time 15 --partition {local_partition()}"
    lines = []
    for line in logical_lines(script):
        command = line.split("#")[0].rstrip() if line.lstrip().startswith("mvar-dist") else line
        if command.startswith("mvar-dist submit"):
            lines.append(f"{command} --dry-run >/dev/null 2>>dry_runs.txt")
            lines.append(f"{command} {machine} {' '.join(TINY_MODEL)}")
        elif command.startswith("mvar-dist sample"):
            assert "--num 50000 --batch-size 128" in command
            lines.append(command.replace("--num 50000 --batch-size 128", "--num 4 --batch-size 4"))
        else:
            lines.append(command)
    split = next(i for i, line in enumerate(lines) if line.startswith("mvar-dist status")) + 1
    return "\n".join(lines[:split]), "\n".join(lines[split:])


def write_miniature_imagenet(root: Path) -> None:
    rng = np.random.default_rng(0)
    for synset in SYNSETS:
        (root / "train" / synset).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            image = rng.integers(0, 256, (int(rng.integers(200, 300)), int(rng.integers(200, 300)), 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "train" / synset / f"{synset}_{i + 1}.JPEG")
    (root / "val").mkdir()
    solution = ["ImageId,PredictionString"]
    for i in range(VAL_IMAGES):
        name, synset = f"ILSVRC2012_val_{i + 1:08d}", SYNSETS[i % len(SYNSETS)]
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(root / "val" / f"{name}.JPEG")
        solution.append(f"{name},{synset} 12 30 200 180 {synset} 1 2 3 4")  # Kaggle: boxes after each synset
    (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")


def write_weights(checkpoints: Path) -> None:
    from mvar_dist.model import MVAR, MVARConfig
    from mvar_dist.model.released import official_state_dict
    from mvar_dist.tokenizer import MultiScaleVQVAE

    checkpoints.mkdir()
    torch.manual_seed(0)
    torch.save(MultiScaleVQVAE().state_dict(), checkpoints / "vae_ch160v4096z32.pth")
    config = MVARConfig(mode="var", depth=2, embed_dim=64, num_heads=2, num_classes=len(SYNSETS), vocab_size=4096)
    torch.save(official_state_dict(MVAR(config).state_dict(), config), checkpoints / "var_d16.pth")
    rng = np.random.default_rng(1)
    np.savez(checkpoints / "VIRTUAL_imagenet256_labeled.npz", arr_0=rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8))
    write_random_inception(checkpoints / "pt_inception-2015-12-05-6726825d.pth")


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    return result.stdout


@needs_cluster
@pytest.mark.slow
def test_readme_imagenet_section_runs_as_written(tmp_path):
    from mlflow.tracking import MlflowClient

    from mvar_dist.launch.status import read_job_record

    assert HAVE_SLURM
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    write_miniature_imagenet(data / "imagenet")
    write_weights(work / "checkpoints")
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow").start()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MVAR_DIST_CACHE"] = str(tmp_path / "cache")  # the reference's features, not in the user's home
    try:
        submitting, reading = rewrite(readme_block(), data, server.uri)
        out = run_bash(submitting + "\nexport -p > environment.sh", work, env)
        # docs/slurm.md shows what a submission prints: the same lines
        submitted = out[out.index("submitted job"):].splitlines()
        shown = shown_output("slurm.md", "mvar-dist submit")
        for line, printed in zip(shown, submitted):
            assert output_pattern(line).fullmatch(printed), (line, printed)
        # the published recipes split at 4 x 8 GPUs without edits
        dry_runs = (work / "dry_runs.txt").read_text()
        assert dry_runs.count("batch split: micro batch 14 x 32 ranks x 1 accumulation = global batch 448") == 2
        assert "data/codes/train/manifest.json: 1 shards, 8 samples: OK" in out
        assert f"data/codes/val/manifest.json: 1 shards, {VAL_IMAGES} samples: OK" in out
        assert f"at {server.uri}" in out  # submit says where the job logs
        for run in ("mvar_d16_ft", "mvar_d16"):
            assert wait_for_job(read_job_record(work / "runs" / run)["job_id"]) == "COMPLETED", run

        out = run_bash("source environment.sh\n" + reading, work, env)
        assert (work / "exports" / "mvar_d16_ft" / "model.safetensors").is_file()
        with np.load(work / "samples" / "mvar_d16_ft.npz") as samples:
            assert samples["arr_0"].shape == (4, 256, 256, 3)
        table = (work / "compare" / "table.md").read_text()
        assert "mvar_d16_ft" in table and "| mvar_d16 " in table

        # both runs logged to the one server, each a run named after its directory
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("mvar-imagenet256")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {"mvar_d16", "mvar_d16_ft"}
        assert all(len(client.get_metric_history(r.info.run_id, "train/loss")) == 4 for r in runs.values())
        # step 5: the five numbers in the report and in the fine-tuning run, at its last step
        report = json.loads((work / "eval" / "mvar_d16_ft.json").read_text())
        assert report["num_samples"] == 4 and report["num_reference"] == 8 and report["table"] in out
        for name, value in report["metrics"].items():
            history = client.get_metric_history(runs["mvar_d16_ft"].info.run_id, f"eval/{name}")
            assert [(m.step, m.value) for m in history] == [(4, pytest.approx(value))], name
    finally:
        server.stop()


def test_docs_submit_examples_pass_the_dry_run(tmp_path, monkeypatch, capsys):
    """Every ``mvar-dist submit`` in docs/ is accepted as written (with --dry-run: the cluster's
    flags and the recipe's batch split for that world size), its paths pointing at files here."""
    from mvar_dist.cli import main as cli_main

    examples = doc_commands("mvar-dist submit")
    assert {doc for doc, _ in examples} >= {"config.md", "slurm.md", "tokenizer_training.md"}
    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_weights(tmp_path / "checkpoints")
    for folder in ("my/imagenet/train", "my/imagenet/val", "my/models"):
        (tmp_path / folder).mkdir(parents=True)
    for weights in ("vgg16.pth", "lpips_vgg.pth"):  # a dry run checks that they exist; the job loads them
        (tmp_path / "my/models" / weights).touch()
    monkeypatch.chdir(tmp_path)
    for doc, command in examples:
        argv = command.replace("/my/", f"{tmp_path}/my/").replace("/data/", f"{tmp_path}/data/").split()[1:]
        code = cli_main([*argv, "--dry-run"])
        err = capsys.readouterr().err
        assert code == 0 and "batch split:" in err, f"{doc}: {command}\n{err}"
