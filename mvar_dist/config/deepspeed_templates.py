"""Where ``deepspeed.template`` points: a template of configs/deepspeed/ (with the precision
suffix rule) or a JSON file. It lives in the config layer so that a bad name is refused by
:func:`mvar_dist.config.validate` before any rank starts; :mod:`mvar_dist.runtime.deepspeed_engine`
fills the template in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mvar_dist
from mvar_dist.config.loading import ConfigError

# configs/deepspeed/ sits at the repository top level (editable installs, checkouts); a regular
# install carries a copy inside the package as mvar_dist/configs (see pyproject.toml).
_PACKAGE = Path(mvar_dist.__file__).resolve().parent
_TEMPLATE_CANDIDATES = (_PACKAGE / "configs" / "deepspeed", _PACKAGE.parent / "configs" / "deepspeed")
TEMPLATE_DIR = next((p for p in _TEMPLATE_CANDIDATES if p.is_dir()), _TEMPLATE_CANDIDATES[-1])


def resolve_template(name: str, precision: str) -> Path:
    """``zero2`` + ``bf16`` -> configs/deepspeed/zero2_bf16.json if it exists, else zero2.json."""
    as_path = Path(name)
    if as_path.suffix == ".json":
        if not as_path.is_file():
            raise ConfigError(f"deepspeed.template: file {as_path} does not exist")
        return as_path
    for candidate in (TEMPLATE_DIR / f"{name}_{precision}.json", TEMPLATE_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
    raise ConfigError(f"deepspeed.template: no template {name!r} in {TEMPLATE_DIR}; known: {known}")


def read_template(name: str, precision: str) -> dict[str, Any]:
    """The template's JSON object; ConfigError naming the file when it is not one."""
    path = resolve_template(name, precision)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.template: {path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"deepspeed.template: {path} must hold a JSON object, got {type(content).__name__}")
    return content
