"""The experiment config of ``mvar-dist train`` and ``submit``: typed sections (the source of
truth), YAML/TOML loading with ``key=value`` overrides, and validation before any rank starts.
Field reference: docs/config.md."""

from mvar_dist.config.experiment import (
    RESUMABLE_CHANGES,
    ExperimentConfig,
    compatibility_hash,
    config_from_dict,
    incompatible_keys,
    load_config,
    save_resolved,
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
from mvar_dist.config.validation import LaunchError, validate, validate_launch

__all__ = [
    "RESUMABLE_CHANGES", "CheckpointConfig", "ConfigError", "DebugConfig", "DeepSpeedSection", "ExperimentConfig",
    "LaunchConfig", "LaunchError", "OptimConfig", "RunConfig", "SampleConfig", "TokenizerSection", "TrackingConfig",
    "TrainConfig", "apply_overrides", "build", "compatibility_hash", "config_from_dict", "incompatible_keys",
    "load_config", "save_resolved", "validate", "validate_launch",
]
