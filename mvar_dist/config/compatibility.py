"""Which keys of an experiment define a run: the hash a checkpoint records, and the keys a resumed
run changed. Shared by the transformer's and the tokenizer's experiments, each with its own list
of keys that may change on resume (a section name covers all its fields)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train": {"total_steps": 5}}`` -> ``{"train.total_steps": 5}``: sections are opened, the
    values inside them (lists, nested tables of a field) are kept whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update({f"{key}.{field}": inner for field, inner in value.items()})
        else:
            out[key] = value
    return out


def fixed_part(config_dict: Mapping[str, Any], resumable: Sequence[str]) -> dict[str, Any]:
    """The flattened keys outside ``resumable``: what a resumed run must share with its checkpoint."""
    return {k: v for k, v in flatten(config_dict).items()
            if not any(k == key or k.startswith(key + ".") for key in resumable)}


def config_hash(config_dict: Mapping[str, Any], resumable: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(fixed_part(config_dict, resumable), sort_keys=True).encode()).hexdigest()


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any], resumable: Sequence[str]) -> list[str]:
    """Dotted keys outside ``resumable`` whose values differ; give both with defaults filled in."""
    a, b = fixed_part(saved, resumable), fixed_part(current, resumable)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
