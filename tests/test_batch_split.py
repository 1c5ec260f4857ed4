"""The global batch is the recipe, the micro batch is derived for the cluster: every published
config submits as written at 1 to 128 GPUs, with the recipe's global batch and lr."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvar_dist.cli import main as cli_main
from mvar_dist.config import ConfigError, load_experiment, validate_experiment
from mvar_dist.config.batch_split import resolve_batch_split, split_for
from mvar_dist.training.optimizer import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                   if p.name not in ("tiny_cpu.yaml", "tokenizer_tiny_cpu.yaml", "quickstart.yaml"))
CLUSTERS = [(1, 1), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8)]  # nodes x GPUs per node


def test_auto_takes_the_largest_micro_batch_under_the_limit():
    assert resolve_batch_split(448, "auto", 8, 56).micro_batch == 56
    split = resolve_batch_split(448, "auto", 1, 56)
    assert (split.micro_batch, split.accumulation) == (56, 8)
    split = resolve_batch_split(448, "auto", 32, 56)
    assert (split.micro_batch, split.accumulation) == (14, 1)
    split = resolve_batch_split(192, "auto", 2, 40)  # 96 per rank: 32 x 3, not 40
    assert (split.micro_batch, split.accumulation) == (32, 3)
    assert resolve_batch_split(8, "auto", 2).micro_batch == 4  # no limit: one pass


def test_explicit_micro_batch_keeps_todays_behaviour():
    split = resolve_batch_split(8, 2, 2)
    assert (split.micro_batch, split.accumulation) == (2, 2)
    assert split_for(8, 2, 3, None) is None


def test_no_split_lists_world_sizes_that_work_before_a_new_global_batch():
    with pytest.raises(ConfigError) as error:
        resolve_batch_split(448, "auto", 3, 56)
    message = str(error.value)
    assert "2 ranks: 56 x 4 accumulation" in message and "4 ranks: 56 x 2 accumulation" in message
    assert message.index("ranks:") < message.index("change train.global_batch_size")


def test_explicit_micro_batch_that_does_not_fit_names_micro_batches_that_do():
    with pytest.raises(ConfigError, match=r"use train.micro_batch_size=auto, or one of \[2, 7, 14\]"):
        resolve_batch_split(448, 56, 32)


def weight_paths(config_file: Path, tmp_path: Path) -> list[str]:
    """Overrides that point the recipe's weight files at stand-ins, as a user points them at theirs."""
    recipe = load_experiment(config_file, [])
    overrides = []
    for key, value in (("tokenizer.checkpoint", getattr(recipe.tokenizer, "checkpoint", None)),
                       ("train.init_from", getattr(recipe.train, "init_from", None)),
                       ("loss.vgg_weights", getattr(getattr(recipe, "loss", None), "vgg_weights", None)),
                       ("loss.lpips_weights", getattr(getattr(recipe, "loss", None), "lpips_weights", None))):
        if value:
            stand_in = tmp_path / Path(value).name
            stand_in.write_bytes(b"")
            overrides.append(f"{key}={stand_in}")
    return overrides


@pytest.mark.parametrize("config_file", PUBLISHED, ids=lambda p: p.name)
def test_published_configs_submit_as_written_on_any_cluster(capsys, tmp_path, config_file):
    overrides = weight_paths(config_file, tmp_path)
    recipe = load_experiment(config_file, overrides)
    assert recipe.train.micro_batch_size == "auto"
    done = 0
    for nodes, gpus in CLUSTERS:
        world = nodes * gpus
        if recipe.train.global_batch_size % world:
            continue  # the recipe's batch cannot be shared by this many GPUs at all
        done += 1
        code = cli_main(["submit", "--config", str(config_file), "--cluster", "slurm", "--nodes", str(nodes),
                         "--gpus-per-node", str(gpus), "--dry-run", f"run.dir={tmp_path / 'run'}", *overrides])
        out, err = capsys.readouterr()
        assert code == 0, err
        split = recipe.train.batch_split(world)
        assert f"batch split: {split.describe()}" in err
        assert split.micro_batch * world * split.accumulation == recipe.train.global_batch_size
        assert split.micro_batch <= recipe.train.max_micro_batch_size
        validate_experiment(recipe, world)  # the trainer's own pre-flight, for the same world size
        if hasattr(recipe, "peak_lr"):
            ds = deepspeed_config(recipe, world)
            assert ds["train_batch_size"] == recipe.train.global_batch_size
            assert ds["gradient_accumulation_steps"] == split.accumulation
    assert done >= 4


def test_auto_is_read_from_yaml_and_overrides(tmp_path):
    config = load_experiment(ROOT / "configs" / "tiny_cpu.yaml", ["train.micro_batch_size=auto",
                                                                  "train.max_micro_batch_size=1"])
    assert config.train.batch_split(2).accumulation == 4
    with pytest.raises(ConfigError, match="train.micro_batch_size must be an integer >= 1 or 'auto'"):
        validate_experiment(load_experiment(ROOT / "configs" / "tiny_cpu.yaml", ["train.micro_batch_size=0"]), 2)


def test_gpu_memory_caps_auto_at_the_largest_micro_batch_the_plan_fits(capsys, tmp_path):
    """`submit --gpu-memory` with micro_batch_size auto and no max_micro_batch_size: the job's
    micro batch is the plan's largest that fits one GPU, not the rank's whole share."""
    from mvar_dist.memory.plan import Cluster, plan_run

    config_file = ROOT / "configs" / "mvar_d24.yaml"
    overrides = [*weight_paths(config_file, tmp_path), "train.max_micro_batch_size=null", f"run.dir={tmp_path / 'run'}"]
    submit = ["submit", "--config", str(config_file), "--cluster", "slurm", "--nodes", "1", "--gpus-per-node", "8",
              "--dry-run"]
    recipe = load_experiment(config_file, overrides)
    uncapped = recipe.train.batch_split(8)
    assert cli_main([*submit, *overrides]) == 0
    assert f"batch split: {uncapped.describe()}" in capsys.readouterr().err

    plan = plan_run(recipe, Cluster(1, 8, 24 * 2**30, reserve=24 * 2**30 // 10, write_bandwidth=2.0**30))
    largest = next(stage for stage in plan.stages if stage.configured).largest_micro_batch
    capped = resolve_batch_split(recipe.train.global_batch_size, "auto", 8, largest)
    assert 1 <= capped.micro_batch < uncapped.micro_batch  # 24 GB does not hold d24's share of 56
    assert cli_main([*submit, "--gpu-memory", "24GB", *overrides]) == 0
    err = capsys.readouterr().err
    assert f"batch split: {capped.describe()}" in err

    assert cli_main([*submit, "--gpu-memory", "1GB", *overrides]) == 2
    assert "not even one sample per pass fits a 1GB GPU (--gpu-memory)" in capsys.readouterr().err
    assert cli_main([*submit, "--gpu-memory", "24", *overrides]) == 2
    assert "--gpu-memory (launch.gpu_memory): '24' needs a unit, e.g. 24GB" in capsys.readouterr().err
