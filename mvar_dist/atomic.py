"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Everything users keep (shards, manifests, checkpoint pointers, exports, run records) goes
through here: write to a private temporary name in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which would race with threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_sibling(path: str | Path) -> Path:
    """A new, empty file beside ``path`` (same file system, so the final rename is atomic),
    with the permissions ``open()`` would give it: mkstemp makes private (0600) files, which
    would hide manifests and checkpoints from the user's group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp_name)


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary siblings of ``path`` that a killed writer left behind (the names
    :func:`temporary_sibling` makes, and the ``<name>.tmp`` of earlier versions); returns them.
    Only for paths this process owns: another live writer's temporary file would go too."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [*path.parent.glob(f".{glob_escape(path.name)}.*.tmp"), path.with_name(path.name + ".tmp")]
    removed = [p for p in found if p.is_file()]
    for leftover in removed:
        leftover.unlink(missing_ok=True)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries (what a rename changed), to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Make the finished temporary file ``tmp`` durable and move it to ``path`` in one step;
    the directory is synced too, so the new name survives a crash of the machine."""
    # a writer that recreates the file (safetensors does) leaves it private: the umask decides
    os.chmod(tmp, 0o666 & ~current_umask())
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def write_via_temp(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``."""
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    write_via_temp(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())
