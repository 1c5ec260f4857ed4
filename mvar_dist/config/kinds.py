"""The kinds of experiment, and the one place that tells them apart.

An experiment file (or the config a checkpoint recorded) is a ``tokenizer`` experiment when its
top level says ``kind: tokenizer`` (``mvar-dist train-tokenizer``); anything else is a
``transformer`` experiment (``mvar-dist train``; ``kind: transformer`` may be written but need
not be, so every file and checkpoint written before kinds existed keeps its meaning). Each kind
declares here, once, its config class, its validation, what it reads before a job may queue,
and which keys a resumed run may change. Every command loads experiments through
:func:`load_experiment` and asks :func:`kind_of` instead of looking at keys itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mvar_dist.config.compatibility import changed_keys, config_hash
from mvar_dist.config.experiment import RESUMABLE_CHANGES, ExperimentConfig
from mvar_dist.config.loading import ConfigError, build, read_config_file
from mvar_dist.config.tokenizer_experiment import TOKENIZER_RESUMABLE_CHANGES, TokenizerExperiment
from mvar_dist.config.validation import check_manifests, validate, validate_tokenizer

Experiment = ExperimentConfig | TokenizerExperiment


def _nothing_to_read(config: Any) -> None:
    """Image folders and shards are checked by the validation itself."""


@dataclass(frozen=True)
class ExperimentKind:
    name: str
    config_class: type
    command: str  # the mvar-dist command that trains it
    resumable_changes: tuple[str, ...]  # dotted keys (or whole sections) a resumed run may change
    validate: Callable[[Any, int], None]  # (config, world size): before any rank starts
    check_inputs: Callable[[Any], None]  # the files a job will read, before it may queue (not --dry-run)


TRANSFORMER = ExperimentKind("transformer", ExperimentConfig, "train", RESUMABLE_CHANGES, validate, check_manifests)
TOKENIZER = ExperimentKind("tokenizer", TokenizerExperiment, "train-tokenizer", TOKENIZER_RESUMABLE_CHANGES,
                           validate_tokenizer, _nothing_to_read)
KINDS: dict[str, ExperimentKind] = {kind.name: kind for kind in (TRANSFORMER, TOKENIZER)}


def kind_named_by(raw: Mapping[str, Any]) -> ExperimentKind:
    """The kind a config mapping's top-level ``kind`` key names (none: transformer)."""
    name = raw.get("kind", TRANSFORMER.name)
    if name not in KINDS:
        raise ConfigError(f"kind must be one of {sorted(KINDS)}, got {name!r}")
    return KINDS[name]


def kind_of(config: Experiment) -> ExperimentKind:
    for kind in KINDS.values():
        if isinstance(config, kind.config_class):
            return kind
    raise TypeError(f"{type(config).__name__} is not an experiment config")


def experiment_from_dict(raw: Mapping[str, Any], expect: ExperimentKind | None = None) -> Experiment:
    """Build the experiment a mapping describes (types and names checked); ``expect`` refuses
    another kind, naming the command that runs it."""
    kind = kind_named_by(raw)
    if expect is not None and kind is not expect:
        raise ConfigError(f"this is a {kind.name} experiment (kind: {kind.name}): run it with mvar-dist {kind.command}")
    fields = dict(raw)
    if kind is TRANSFORMER:
        fields.pop("kind", None)  # implied: the transformer's config has no kind field
    return build(kind.config_class, fields, "")


def load_experiment(path: str | Path, overrides: Sequence[str] = (), expect: ExperimentKind | None = None) -> Experiment:
    """Read a YAML or TOML experiment file, apply ``key=value`` overrides, build it; every error
    names the file."""
    raw = read_config_file(path, overrides)
    try:
        return experiment_from_dict(raw, expect)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A transformer experiment file (``mvar-dist train``)."""
    return load_experiment(path, overrides, TRANSFORMER)  # type: ignore[return-value]


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """A transformer experiment from a mapping (a run's saved config, a test's dict)."""
    return experiment_from_dict(raw, TRANSFORMER)  # type: ignore[return-value]


def validate_experiment(config: Experiment, world_size: int) -> None:
    """Every check of the experiment for ``world_size`` ranks; ConfigError naming field and value."""
    kind_of(config).validate(config, world_size)


def experiment_hash(config: Experiment) -> str:
    """Hash of everything a resumed run must share with its checkpoint."""
    return config_hash(config.to_dict(), kind_of(config).resumable_changes)


def resume_conflicts(saved: Mapping[str, Any], config: Experiment) -> list[str]:
    """Dotted keys outside the kind's resumable changes whose values differ between a checkpoint's
    config and ``config`` (``["kind"]`` for another kind). A key that did not exist when ``saved``
    was written counts as its default: a field added later must not strand earlier checkpoints."""
    kind = kind_of(config)
    try:
        if kind_named_by(saved) is not kind:
            return ["kind"]
        saved = experiment_from_dict(saved).to_dict()
    except ConfigError:  # a key this version does not know: compare what is there
        pass
    return changed_keys(saved, config.to_dict(), kind.resumable_changes)


# The transformer's names of earlier versions, kept for scripts and notebooks.
def compatibility_hash(config_dict: Mapping[str, Any]) -> str:
    return experiment_hash(config_from_dict(config_dict))


def incompatible_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return resume_conflicts(saved, config_from_dict(current))
