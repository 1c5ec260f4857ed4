"""Memory sizes as users write them (``80GB``, ``24GiB``, ``512M``): ``launch.gpu_memory`` and the
flags of ``mvar-dist plan`` and ``submit``. Binary units throughout: an "80 GB" GPU has 80 GiB,
so GB and GiB mean the same here."""

from __future__ import annotations

import re

GIB = 2**30
_UNITS = {"b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """``80GB``, ``24GiB``, ``512M``, ``1.5TB`` (a trailing ``/s`` is allowed, for bandwidths) ->
    bytes; ValueError saying how to write it."""
    match = _SIZE.match(str(text).lower().removesuffix("/s"))
    if match is None or _UNITS.get(match.group(2), 0) == 0:
        if match is not None and match.group(2) == "":
            raise ValueError(f"{text!r} needs a unit, e.g. {str(text).strip()}GB")
        raise ValueError(f"{text!r} is not a size; write e.g. 80GB, 24GiB or 512MB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return int(value)
