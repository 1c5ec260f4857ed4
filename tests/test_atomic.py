"""Atomic writes: a failed write leaves the old file and no temporary behind."""

import os
import stat
from pathlib import Path

import pytest

from mvar_dist.atomic import write_bytes, write_json, write_via_temp


def test_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    write_bytes(target, b"step_1\n")
    write_json(target, {"step": 2})
    assert target.read_text() == '{\n "step": 2\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def half_write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_via_temp(target, half_write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask_like_any_other_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bytes(tmp_path / "latest", b"step_00000002\n")
        write_json(tmp_path / "manifest.json", {"a": 1})
        write_via_temp(tmp_path / "model.safetensors", lambda tmp: tmp.write_bytes(b"x"))
        (tmp_path / "plain").write_bytes(b"x")  # what open() gives: the user's expectation
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("latest", "manifest.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_writer_that_recreates_the_file_still_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        def recreate(tmp: Path) -> None:  # as safetensors' save_file does: a new, private file
            tmp.unlink()
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)

        write_via_temp(tmp_path / "model.safetensors", recreate)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
