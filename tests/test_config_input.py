"""Config files are input from users and from other people's repositories: a duplicated key, a
YAML alias bomb, a huge value or a misspelled free-form option must each end in one short line
naming the file, the line and the key, before any rank starts and within a few MB of memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from mvar_dist.config import ConfigError, load_config, validate_experiment

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_duplicate_section_is_refused_naming_both_lines(tmp_path):
    text = TINY.read_text() + "train:\n  global_batch_size: 256\n"
    first = 1 + TINY.read_text().splitlines().index("train:")
    last = text.count("\n") - 1
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value) == (f"{tmp_path / 'experiment.yaml'}:{last}:1: cannot parse YAML: key 'train' appears twice "
                              f"in one mapping (lines {first} and {last}); keep one")


def test_duplicate_nested_key_is_refused(tmp_path):
    path = write(tmp_path, "train:\n  total_steps: 4\n  global_batch_size: 8\n  total_steps: 6\n")
    with pytest.raises(ConfigError, match=r"experiment.yaml:4:3: .*key 'total_steps' appears twice .*lines 2 and 4"):
        load_config(path)


def test_duplicate_key_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match=r"override 'tokenizer.options=.*': .*key 'ch' appears twice in one mapping \(line 1\)"):
        load_config(TINY, ["tokenizer.options={ch: 32, ch: 64}"])


def alias_bomb(levels: int = 30) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, levels)]
    return "\n".join(lines)


def test_alias_bomb_is_refused_in_little_memory(tmp_path):
    bomb = "\n".join("    " + line for line in alias_bomb().splitlines())
    path = write(tmp_path, TINY.read_text().replace("tokenizer:\n", f"tokenizer:\n  bomb:\n{bomb}\n", 1))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "YAML aliases are not accepted" in str(err.value) and len(str(err.value)) < 300
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_an_alias_is_refused_naming_where(tmp_path):
    path = write(tmp_path, "run:\n  dir: &here runs/x\ncheckpoint:\n  every_steps: 2\ndata:\n  train_manifest: *here\n")
    with pytest.raises(ConfigError, match=r"experiment.yaml:6:19: cannot parse YAML: YAML aliases are not accepted \(\*here\)"):
        load_config(path)


def test_long_values_are_cut_in_messages(tmp_path):
    path = write(tmp_path, TINY.read_text() + "debug:\n  nonsense: " + "x" * 100_000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nonsense" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.depth=" + "7" * 50_000 + "x"])
    assert "model.depth" in str(err.value) and len(str(err.value)) < 400 and "characters" in str(err.value)


def test_unknown_tokenizer_option_is_refused_before_any_rank_starts():
    config = load_config(TINY, ["tokenizer.checkpoint=null", "tokenizer.options={ch: 32, chanels: 8}"])
    with pytest.raises(ConfigError, match=r"tokenizer.options: unknown option 'chanels' of the vqvae tokenizer.*"):
        validate_experiment(config, 2)
    config = load_config(TINY, ["tokenizer.checkpoint=null", "tokenizer.options={ch: 0}"])
    with pytest.raises(ConfigError, match=r"tokenizer.options: tokenizer config: ch must be >= 1, got 0"):
        validate_experiment(config, 2)


@pytest.mark.parametrize("template, message", [
    ({"zero_optimisation": {"stage": 2}}, r"no 'zero_optimization' section \(did you mean it for 'zero_optimisation'\?\)"),
    ({"zero_optimization": {"stage": 0}}, r"ZeRO stage 0"),
    ({"zero_optimization": {"stage": "2"}}, r"ZeRO stage '2'"),
])
def test_own_deepspeed_json_at_stage_0_is_refused_before_launch(tmp_path, template, message):
    import json

    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    config = load_config(TINY, ["tokenizer.checkpoint=null", f"deepspeed.template={path}"])
    with pytest.raises(ConfigError, match=rf"deepspeed.template: {path} .*{message}.*stage 1, 2 or 3"):
        validate_experiment(config, 2)


def test_fields_the_experiment_sets_are_named_once(tmp_path, caplog):
    import json
    import logging

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64, "gradient_clipping": 1.0,
                                "optimizer": {"type": "Adam"}, "bf16": {"enabled": True}}))
    config = load_config(TINY, ["tokenizer.checkpoint=null", f"deepspeed.template={path}"])
    with caplog.at_level(logging.WARNING):
        validate_experiment(config, 2)
    warnings = [r.getMessage() for r in caplog.records if "deepspeed.template" in r.getMessage()]
    assert warnings == [f"deepspeed.template {path}: the experiment sets these fields instead: bf16.enabled "
                        f"(deepspeed.precision), gradient_clipping (optim.grad_clip), optimizer (optim), "
                        f"train_batch_size (train.global_batch_size)"]


@pytest.fixture
def small_mount(tmp_path):
    """A tmpfs of 256 KiB (read-write or read-only), or a skip where this machine cannot mount."""
    import subprocess

    mounted = []

    def make(options: str) -> Path:
        target = tmp_path / f"mount{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=256k", "tmpfs", str(target)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def tiny_for(run_dir: Path) -> object:
    return load_config(TINY, ["tokenizer.checkpoint=null", f"run.dir={run_dir}"])


def test_run_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    from mvar_dist.cli import main as cli_main

    afile = tmp_path / "afile"
    afile.write_text("")
    for run_dir, message in ((afile, f"run.dir: {afile} is a file, not a directory"),
                             (afile / "run", f"run.dir: {afile} is a file: {afile / 'run'} cannot be created under it")):
        with pytest.raises(ConfigError, match=f"^{message}"):
            validate_experiment(tiny_for(run_dir), 2)
    (tmp_path / "run" ).mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match=r"run.dir: .*run/checkpoints is a file, not a directory"):
        validate_experiment(tiny_for(tmp_path / "run"), 2)
    code = cli_main(["train", "--config", str(TINY), "tokenizer.checkpoint=null", f"run.dir={afile}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a file, not a directory" in err


def test_read_only_run_dir_is_refused_before_any_rank_starts(small_mount):
    read_only = small_mount("ro")
    with pytest.raises(ConfigError, match=rf"run.dir: cannot write in {read_only} \(read-only file system or no permission\)"):
        validate_experiment(tiny_for(read_only / "run"), 2)


def test_too_little_space_for_one_checkpoint_is_refused(small_mount):
    small = small_mount("rw")
    # tiny_cpu's model: about 0.1 M parameters, 16 bytes each in a checkpoint: more than 256 KiB
    with pytest.raises(ConfigError, match=r"run.dir: .* free on the file system of .*, one checkpoint needs about .*"):
        validate_experiment(tiny_for(small / "run"), 2)
