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


def write_via_temp(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    write_via_temp(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())
