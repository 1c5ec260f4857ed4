"""What every ``mvar-dist`` command shares (docs/troubleshooting.md#exit-codes): a user error exits 2
with one line ``mvar-dist <command>: <message>`` on stderr and no traceback; ``--help`` exits 0,
with whole sentences, no RST markup and the default of every option that has one; a syntax error
in a config file is one line naming the file, line and column."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvar_dist.cli import COMMANDS
from mvar_dist.cli import main as cli_main
from mvar_dist.quickstart.experiment import DEFAULT_STEPS

REPO = Path(__file__).resolve().parent.parent
BAD_YAML = "model:\n  depth: 16\n  bad: x: y\n"  # line 3, column 9: a second ':' in a plain value

# command -> (argv with {tmp} for a scratch directory, a fragment of the message); nothing here
# trains, submits or reads a model: each fails on the input before any work
USER_ERRORS: dict[str, tuple[list[str], str]] = {
    "train": (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml does not exist"),
    "train-tokenizer": (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml does not exist"),
    "submit": (["--config", "{tmp}/missing.yaml", "--dry-run"], "{tmp}/missing.yaml does not exist"),
    "submit-prep": (["--array-tasks", "0", "--dry-run", "--", "--out", "{tmp}/codes", "--split", "train"],
                    "--array-tasks must be >= 1, got 0"),
    "status": (["{tmp}/nowhere"], "{tmp}/nowhere is not a run directory"),
    "plan": (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml does not exist"),
    "jobs": (["{tmp}/nowhere"], "{tmp}/nowhere is not a run directory"),
    "prep": (["{tmp}/nowhere", "--out", "{tmp}/codes", "--split", "train", "--tokenizer", "{tmp}/vae.pth"],
             "{tmp}/nowhere does not exist"),
    "verify-shards": (["{tmp}/nowhere"], "no manifest.json at {tmp}/nowhere"),
    "export": (["{tmp}/nowhere", "--out", "{tmp}/out"], "{tmp}/nowhere is not a run directory"),
    "sample": (["--model", "{tmp}/nowhere", "--out", "{tmp}/grid.png"], "{tmp}/nowhere is not an mvar-dist export"),
    "import-released": (["{tmp}/var_d16.pth", "--tokenizer", "{tmp}/vae.pth", "--out", "{tmp}/out"],
                        "released checkpoint {tmp}/var_d16.pth does not exist"),
    "evaluate": (["--samples", "{tmp}/samples.npz", "--ref", "{tmp}/ref.npz", "--inception", "{tmp}/inception.pth",
                  "--out", "{tmp}/eval.json"], "{tmp}/inception.pth"),
    "quickstart": (["--steps", "0", "--out", "{tmp}/quickstart"], "--steps must be >= 1, got 0"),
    "compare": (["--experiment", "exp", "--run-dir", "{tmp}/nowhere", "--no-plots"], "no MLflow database"),
}

# command -> (option, what its help must say): defaults that a user needs to know
DEFAULTS: dict[str, list[tuple[str, str]]] = {
    "train": [("--nproc", "by default this process is one rank"), ("--nnodes", "(default: 1)"),
              ("--master-port", "29500")],
    "train-tokenizer": [("--nproc", "by default this process is one rank"), ("--nnodes", "(default: 1)"),
                        ("--master-port", "29500")],
    "submit": [("--nodes", "(default: launch.nodes of the experiment)"),
               ("--time", "(default: launch.time of the experiment)")],
    "submit-prep": [("--array-parallelism", "(default: 256)"), ("--time", "(default: 240)"),
                    ("--cluster", "(default: slurm)"), ("--job-name", "(default: mvar-dist-prep)")],
    "status": [],
    "jobs": [],
    "plan": [("--gpu-memory", "(default: 80GB)"), ("--reserve", "(default: 10%)"), ("--write-bandwidth", "(default: 1GB/s)"),
             ("--nodes", "(default: launch.nodes of the experiment)")],
    "prep": [("--shard-size", "(default: 1000)"), ("--batch-size", "(default: 64)"), ("--device", "(default: auto)"),
             ("--vocab-size", "else 4096)"), ("--task-id", "(default: $SLURM_ARRAY_TASK_ID, else 0)")],
    "verify-shards": [],
    "export": [("--dtype", "(default: fp32)"), ("--format", "(default: safetensors)"), ("--tag", "(default: latest")],
    "sample": [("--precision", "(default: fp32)"), ("--batch-size", "(default: 64)"), ("--seed", "(default: 0)"),
               ("--device", "(default: auto)"), ("--padding", "(default: 2)"), ("--num", "(default: 50000)")],
    "import-released": [("--dtype", "(default: fp32)"), ("--format", "(default: safetensors)"),
                        ("--mode", "default: from the file name"), ("--depth", "default: from the file name")],
    "evaluate": [("--device", "(default: auto)"), ("--feature-batch-size", "(default: 100)"), ("--resize", "(default: tf)"),
                 ("--seed", "(default: 0)"), ("--batch-size", "(default: 64)"), ("--num", "(default: 50000)"),
                 ("--inception", "$MVAR_DIST_INCEPTION")],
    "quickstart": [("--steps", f"(default: {DEFAULT_STEPS})"), ("--nproc", "(default: 2)"), ("--mode", "(default: mvar)"),
                   ("--out", "(default: runs/quickstart)")],
    "compare": [("--run-dir", "(default: .)"), ("--runs", "(default: every run of the experiment)")],
}


def run_cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "mvar_dist", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def assert_one_line(result: subprocess.CompletedProcess, command: str, fragment: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mvar-dist {command}: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.returncode == 2, (result.returncode, result.stderr)


def test_every_command_is_covered():
    assert set(USER_ERRORS) == set(COMMANDS) == set(DEFAULTS)


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_a_user_error_exits_2_with_one_line(command, tmp_path):
    argv, fragment = USER_ERRORS[command]
    result = run_cli(tmp_path, command, *(arg.format(tmp=tmp_path) for arg in argv))
    shown = "status" if command == "jobs" else command  # jobs is status under another name
    assert_one_line(result, shown, fragment.format(tmp=tmp_path))


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text(BAD_YAML)
    result = run_cli(tmp_path, "train", "--config", str(config))
    assert_one_line(result, "train", f"{config}:3:9: cannot parse YAML: mapping values are not allowed here")
    assert "<unicode string>" not in result.stderr


def test_a_toml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    from mvar_dist.config import ConfigError
    from mvar_dist.config.loading import read_config_file

    config = tmp_path / "broken.toml"
    config.write_text('[model]\ndepth = "16\n')
    with pytest.raises(ConfigError) as raised:
        read_config_file(config)
    assert str(raised.value) == f"{config}:2:12: cannot parse TOML: Illegal character '\\n'"


def test_export_says_what_a_run_directory_lacks(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"mvar-dist export: {tmp_path} is not a run directory (no config.yaml or checkpoints/ in it)\n"
    assert not (tmp_path / "out").exists()


def help_of(command: str, monkeypatch, capsys) -> tuple[str, argparse.ArgumentParser]:
    """The --help text (unwrapped: one line per option) and the parser that printed it."""
    parsers: list[argparse.ArgumentParser] = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_known_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out, parsers[0]


def option_help(text: str, option: str) -> str:
    """The help of one option: its line, and the next one when argparse put the help below."""
    lines = text.splitlines() + [""]
    for i, line in enumerate(lines):
        if line.startswith((f"  {option} ", f"  {option},")):
            below = lines[i + 1].startswith("    ")  # options start 2 spaces in, help below them further
            return " ".join(lines[i:i + 2] if below else lines[i:i + 1])
    raise AssertionError(f"{option} not in the help:\n{text}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_complete(command, monkeypatch, capsys):
    text, parser = help_of(command, monkeypatch, capsys)
    assert text.startswith("usage: mvar-dist ")
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    for noise in ("default: None", "default: False", "default: []", "default: {}"):
        assert noise not in text
    for part in (parser.description, parser.epilog):  # whole sentences, none cut short
        if part:
            assert part.strip().endswith("."), part
    for action in parser._actions:  # every option with a default that means something shows it
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == [] or default == {}
        if action.option_strings and not unset:
            assert "default" in option_help(text, action.option_strings[-1]), (command, action.option_strings)
    for option, shown in DEFAULTS[command]:
        assert shown in option_help(text, option), (command, option, option_help(text, option))


def test_top_level_help_and_an_unknown_command(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert cli_main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("mvar-dist: unknown command 'nope'")
