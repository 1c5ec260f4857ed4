"""The experiment configs of ``mvar-dist train``, ``train-tokenizer`` and ``submit``: typed
sections (the source of truth), one loader for YAML/TOML files with ``key=value`` overrides, the
one place that decides an experiment's kind (:mod:`mvar_dist.config.kinds`), and validation
before any rank starts. Field reference: docs/config.md, docs/tokenizer_training.md."""

from mvar_dist.config.experiment import RESUMABLE_CHANGES, ExperimentConfig, save_resolved
from mvar_dist.config.kinds import (
    KINDS,
    TOKENIZER,
    TRANSFORMER,
    Experiment,
    ExperimentKind,
    compatibility_hash,
    config_from_dict,
    experiment_from_dict,
    experiment_hash,
    incompatible_keys,
    kind_named_by,
    kind_of,
    load_config,
    load_experiment,
    resume_conflicts,
    validate_experiment,
)
from mvar_dist.config.loading import ConfigError, apply_overrides, build
from mvar_dist.config.sections import (
    CheckpointConfig,
    DebugConfig,
    DeepSpeedSection,
    LaunchConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TokenizerSection,
    TrackingConfig,
    TrainConfig,
)
from mvar_dist.config.tokenizer_experiment import TOKENIZER_RESUMABLE_CHANGES, TokenizerExperiment
from mvar_dist.config.validation import LaunchError, validate, validate_launch, validate_tokenizer

__all__ = [
    "KINDS", "RESUMABLE_CHANGES", "TOKENIZER", "TOKENIZER_RESUMABLE_CHANGES", "TRANSFORMER", "CheckpointConfig", "ConfigError", "DebugConfig",
    "DeepSpeedSection", "Experiment", "ExperimentConfig", "ExperimentKind", "LaunchConfig", "LaunchError", "OptimConfig",
    "RunConfig", "SampleConfig", "TokenizerExperiment", "TokenizerSection", "TrackingConfig", "TrainConfig",
    "apply_overrides", "build", "compatibility_hash", "config_from_dict", "experiment_from_dict", "experiment_hash",
    "incompatible_keys", "kind_named_by", "kind_of", "load_config", "load_experiment", "resume_conflicts",
    "save_resolved", "validate", "validate_experiment", "validate_launch", "validate_tokenizer",
]
