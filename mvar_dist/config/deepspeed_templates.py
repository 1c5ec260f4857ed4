"""Where ``deepspeed.template`` points: a template of configs/deepspeed/ (with the precision
suffix rule) or a JSON file. It lives in the config layer so that a bad name is refused by
:func:`mvar_dist.config.validate` before any rank starts; :mod:`mvar_dist.runtime.deepspeed_engine`
fills the template in."""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

import mvar_dist
from mvar_dist.config.loading import ConfigError

# configs/deepspeed/ sits at the repository top level (editable installs, checkouts); a regular
# install carries a copy inside the package as mvar_dist/configs (see pyproject.toml).
logger = logging.getLogger(__name__)

# DeepSpeed fields the experiment fills in (mvar_dist.runtime.deepspeed_engine.deepspeed_json),
# whatever a template says, and the experiment field that decides each
EXPERIMENT_SETS = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size", "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "deepspeed.precision", "fp16.enabled": "deepspeed.precision", "optimizer": "optim",
    "scheduler": "optim.lr_schedule",
}

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
    _check_stage(content, path)
    overridden = sorted(key for key in EXPERIMENT_SETS if _has(content, key))
    if overridden and path.parent != TEMPLATE_DIR:
        logger.warning("deepspeed.template %s: the experiment sets these fields instead: %s", path,
                       ", ".join(f"{key} ({EXPERIMENT_SETS[key]})" for key in overridden))
    return content


def _check_stage(content: dict[str, Any], path: Path) -> None:
    """Stage 0 (plain data parallel) trains, but keeps no ZeRO checkpoint that export, resize or
    the memory accounting read: refuse it before a job runs to its end."""
    zero = content.get("zero_optimization")
    if not isinstance(zero, dict):
        close = difflib.get_close_matches("zero_optimization", [k for k in content if isinstance(k, str)], n=1)
        what = "no 'zero_optimization' section" + (f" (did you mean it for {close[0]!r}?)" if close else "")
    elif zero.get("stage") in (1, 2, 3):
        return
    else:
        what = f"ZeRO stage {zero.get('stage')!r}"
    raise ConfigError(f"deepspeed.template: {path} has {what}; mvar-dist trains with ZeRO stage 1, 2 or 3 "
                      '(e.g. "zero_optimization": {"stage": 2})')


def _has(content: dict[str, Any], dotted: str) -> bool:
    section, _, field = dotted.partition(".")
    if not field:
        return section in content
    return isinstance(content.get(section), dict) and field in content[section]
