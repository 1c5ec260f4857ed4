"""Atomic writes: a failed write leaves the old file and no temporary behind."""

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
