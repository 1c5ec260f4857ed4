"""Config validation before any rank starts: every numeric field that can hold NaN, infinity or an
out-of-range value, the shard URL template, the DeepSpeed template and the sample section are
refused by ``mvar_dist.config.validate`` naming the field and the value; ``mvar-dist train``
says so once, from the parent with ``--nproc`` and from rank 0 under an external launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvar_dist.cli import main as cli_main
from mvar_dist.config import ConfigError, load_config, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny_cpu.yaml"
MESSAGE_PREFIX = "mvar-dist train:"


def tiny(*overrides: str):
    config = load_config(TINY, ["tokenizer.checkpoint=null", *overrides])
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=.nan"], "optim.lr must be a finite number > 0, got nan"),
        (["optim.lr=inf"], "optim.lr must be a finite number > 0, got inf"),
        (["optim.lr=-.inf"], "optim.lr must be a finite number > 0, got -inf"),
        (["optim.lr=0"], "optim.lr must be a finite number > 0, got 0.0"),
        (["optim.lr=null", "optim.base_lr=nan"], "optim.base_lr must be a finite number > 0, got nan"),
        (["optim.lr=null", "optim.base_lr=.inf"], "optim.base_lr must be a finite number > 0, got inf"),
        (["optim.base_lr=nan"], "optim.base_lr must be a finite number > 0, got nan"),  # even when lr is set
        (["optim.betas=[0.9, 1.0]"], "optim.betas[1] must be in [0, 1), got 1.0"),
        (["optim.betas=[-0.1, 0.95]"], "optim.betas[0] must be in [0, 1), got -0.1"),
        (["optim.betas=[.nan, 0.95]"], "optim.betas[0] must be in [0, 1), got nan"),
        (["optim.eps=0"], "optim.eps must be a finite number > 0, got 0.0"),
        (["optim.eps=-1e-8"], "optim.eps must be a finite number > 0, got -1e-08"),
        (["optim.eps=.nan"], "optim.eps must be a finite number > 0, got nan"),
        (["optim.eps=.inf"], "optim.eps must be a finite number > 0, got inf"),
        (["optim.warmup_start=1.5"], "optim.warmup_start must be in [0, 1], got 1.5"),
        (["optim.warmup_start=-0.1"], "optim.warmup_start must be in [0, 1], got -0.1"),
        (["optim.final_lr_ratio=.nan"], "optim.final_lr_ratio must be in [0, 1], got nan"),
        (["optim.final_lr_ratio=2"], "optim.final_lr_ratio must be in [0, 1], got 2.0"),
        (["optim.grad_clip=.nan"], "optim.grad_clip must be a finite number >= 0 (0 disables clipping), got nan"),
        (["optim.grad_clip=-1"], "optim.grad_clip must be a finite number >= 0 (0 disables clipping), got -1.0"),
        (["optim.weight_decay=.inf"], "optim.weight_decay must be a finite number >= 0, got inf"),
        (["data.seed=-1"], "data.seed must be >= 0, got -1"),
        (["data.shard_url_template=codes/{split}/{shard}"],
         "data.shard_url_template: unknown placeholder {shard} in 'codes/{split}/{shard}'; only {name} and {split} exist"),
        (["data.shard_url_template=codes/{}"], "data.shard_url_template: unknown placeholder {} in 'codes/{}'"),
        (["data.shard_url_template=codes/{name.upper}"], "data.shard_url_template: unknown placeholder {name.upper}"),
        (["data.shard_url_template=codes/{split}/all.tar"],
         "data.shard_url_template 'codes/{split}/all.tar' must contain {name} (the shard's file name)"),
        (["data.shard_url_template=codes/{name"], "data.shard_url_template 'codes/{name' is not a valid template"),
        (["data.shard_url_template=codes/{name:d}"], "data.shard_url_template 'codes/{name:d}' is not a valid template"),
        (["deepspeed.template=zero9"], "deepspeed.template: no template 'zero9' in"),
        (["deepspeed.template=/nonexistent/ds.json"], "deepspeed.template: file /nonexistent/ds.json does not exist"),
        (["sample.cfg=-1"], "sample.cfg must be a finite number >= 0, got -1.0"),
        (["sample.cfg=.nan"], "sample.cfg must be a finite number >= 0, got nan"),
        (["sample.cfg=.inf"], "sample.cfg must be a finite number >= 0, got inf"),
        (["sample.top_p=1.5"], "sample.top_p must be in [0, 1], got 1.5"),
        (["sample.top_p=.nan"], "sample.top_p must be in [0, 1], got nan"),
        (["sample.top_k=-1"], "sample.top_k must be >= 0 (0 keeps every token), got -1"),
        (["sample.per_class=0"], "sample.per_class must be >= 1, got 0"),  # sample.every_steps is 0 (no grids)
        (["sample.classes=[0, 9]"], "sample.classes must be a non-empty list of labels in 0..4"),
        (["sample.classes=[-1]"], "sample.classes must be a non-empty list of labels in 0..4"),
        (["sample.classes=[]"], "sample.classes must be a non-empty list of labels in 0..4"),
        (["tracking.timeout_s=0"], "tracking.timeout_s must be a finite number > 0, got 0.0"),
        (["tracking.timeout_s=.nan"], "tracking.timeout_s must be a finite number > 0, got nan"),
        (["tracking.retry_interval_s=-1"], "tracking.retry_interval_s must be a finite number >= 0, got -1.0"),
    ],
)
def test_validate_refuses_bad_values_naming_field_and_value(overrides, message):
    config = tiny(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(config, 2)
    assert message in str(err.value)


def test_deepspeed_template_that_is_not_json_is_refused(tmp_path):
    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=f"deepspeed.template: {broken} is not valid JSON"):
        validate(tiny(f"deepspeed.template={broken}"), 2)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"deepspeed.template: {listed} must hold a JSON object, got list"):
        validate(tiny(f"deepspeed.template={listed}"), 2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.betas=[0.0, 0.999]", "optim.warmup_start=0", "optim.final_lr_ratio=1", "optim.eps=1e-12"],
        ["optim.lr=null", "optim.base_lr=3e-4", "optim.grad_clip=0", "optim.weight_decay=0"],
        ["sample.cfg=0", "sample.top_p=0", "sample.top_k=0", "sample.classes=[0, 4]", "sample.per_class=1"],
        ["sample.top_p=1", "sample.every_steps=3"],
        ["data.seed=0", "data.shard_url_template='{name}'"],
        ["data.shard_url_template=pipe:aws s3 cp s3://bucket/codes/{split}/{name} -"],
        ["data.shard_url_template=https://host/{split}/{name:s}"],
        ["deepspeed.template=zero3_offload", "deepspeed.precision=bf16"],
        ["deepspeed.template=zero2", "deepspeed.precision=fp16"],
    ],
)
def test_validate_accepts_edge_values(overrides):
    validate(tiny(*overrides), 2)


def test_deepspeed_template_accepts_an_existing_json_file(tmp_path):
    template = tmp_path / "mine.json"
    template.write_text('{"zero_optimization": {"stage": 1}}')
    validate(tiny(f"deepspeed.template={template}"), 2)


def test_template_lookup_lives_in_the_config_layer():
    from mvar_dist.config import deepspeed_templates
    from mvar_dist.runtime import deepspeed_engine

    assert deepspeed_engine.resolve_template is deepspeed_templates.resolve_template
    assert deepspeed_templates.resolve_template("zero2", "bf16") == deepspeed_templates.TEMPLATE_DIR / "zero2_bf16.json"
    assert deepspeed_templates.resolve_template("zero3_offload", "fp32").name == "zero3_offload.json"  # no suffixed file


# ----- mvar-dist train: refused once -----

BAD = ("train.global_batch_size=10", "tokenizer.checkpoint=null")  # 10 is no multiple of 2 x 2 ranks


def test_nproc_validates_in_the_parent_and_spawns_nothing(monkeypatch, capsys):
    from mvar_dist.launch import local

    spawned: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(local, "launch", lambda nproc, command, env=None, nodes=None: spawned.append((nproc, list(command))) or 0)
    code = cli_main(["train", "--nproc", "2", "--config", str(TINY), *BAD])
    err = capsys.readouterr().err
    assert spawned == [], "a config the parent can refuse must not start any rank"
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith(MESSAGE_PREFIX)]
    # validated for the ranks --nproc asks for
    assert len(lines) == 1 and "train.micro_batch_size=2 does not divide the 5 images each of 2 ranks" in lines[0]


def test_nproc_with_a_good_config_spawns_the_ranks(monkeypatch, capsys):
    from mvar_dist.launch import local

    spawned: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(local, "launch", lambda nproc, command, env=None, nodes=None: spawned.append((nproc, list(command))) or 0)
    assert cli_main(["train", "--nproc", "2", "--config", str(TINY), "tokenizer.checkpoint=null"]) == 0
    assert len(spawned) == 1 and spawned[0][0] == 2
    assert spawned[0][1][-1] == "tokenizer.checkpoint=null"


@pytest.mark.parametrize("rank, printed", [("0", 1), ("1", 0)])
def test_only_rank_zero_reports_a_config_error(monkeypatch, capsys, rank, printed):
    """torchrun-style variables (RANK/WORLD_SIZE), as --nproc's ranks get them."""
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    code = cli_main(["train", "--config", str(TINY), *BAD])
    err = capsys.readouterr().err
    assert code == 2
    assert sum(line.startswith(MESSAGE_PREFIX) for line in err.splitlines()) == printed


def test_srun_ranks_report_a_config_error_once(tmp_path):
    """Two processes with the variables srun gives its tasks (no RANK): one message in all."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mvar_dist", "train", "--config", str(TINY), *BAD],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    assert [code for code, _ in results] == [2, 2]
    counts = [sum(line.startswith(MESSAGE_PREFIX) for line in err.splitlines()) for _, err in results]
    assert counts == [1, 0], [err for _, err in results]
    assert "train.micro_batch_size=2 does not divide the 5 images" in results[0][1]
