"""Typed configs from YAML/TOML: ``key=value`` overrides, and a builder that checks the name
and type of every field of a dataclass tree, naming the dotted key of any problem."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from mvar_dist.config.yaml_input import load_yaml, shown


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field to fix."""


def read_config_file(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping a YAML or TOML config file holds, with ``key=value`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    # a syntax error is one line, file:line:column (1-based) and the problem, as compilers write it
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else load_yaml(text)
    except tomllib.TOMLDecodeError as err:  # "<problem> (at line L, column C)" or "(at end of document)"
        problem, sep, where = str(err).rpartition(" (at line ")
        if sep:
            line, _, column = where.rstrip(")").partition(", column ")
        else:
            problem = str(err).replace(" (at end of document)", "")
            line, column = str(text.count("\n") + 1), str(len(text) - text.rfind("\n"))
        raise ConfigError(f"{path}:{line}:{column}: cannot parse TOML: {problem}") from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: cannot parse YAML: {err.problem or err.context}") from err
    except yaml.YAMLError as err:  # a ReaderError: a character YAML does not allow, at an offset into text
        offset = int(getattr(err, "position", 0))
        line, column = text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
        character = getattr(err, "character", None)
        code = f"#x{character:04x}" if isinstance(character, int) else repr(character)
        problem = f"unacceptable character {code}: {getattr(err, 'reason', err)}"
        raise ConfigError(f"{path}:{line}:{column}: cannot parse YAML: {problem}") from err
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """``train.total_steps=20`` style overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shown(item)} must look like section.key=value")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shown(item)}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = load_yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {shown(item)}: cannot parse the value as YAML: {problem}") from None


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types of every field."""
    label = where or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a mapping of fields, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {_dotted(where, close[0])!r}?" if close else ""
        raise ConfigError(
            f"unknown key {shown(_dotted(where, key))}{hint} (valid keys here: {', '.join(names)})"
        )
    kwargs = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{label}: {err}") from None


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {shown(value)}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {shown(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries, got {shown(list(value))}")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {shown(value)}")
        return dict(value)
    return value


def plain(value: Any) -> Any:
    """Tuples to lists, recursively, so a config dict round-trips through YAML/JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
