"""The experiment of ``mvar-dist train`` (MVAR or VAR): one typed tree of sections, and which keys
a resumed run may change. Files are loaded by :mod:`mvar_dist.config.kinds`, the one loader of
every kind of experiment.

One file describes an experiment completely; the DeepSpeed JSON is derived from it (see
:mod:`mvar_dist.runtime.deepspeed_engine`), so batch sizes, precision and clipping exist in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mvar_dist.atomic import write_bytes
from mvar_dist.config.loading import plain
from mvar_dist.config.sections import (
    CheckpointConfig,
    DebugConfig,
    DeepSpeedSection,
    EvalConfig,
    LaunchConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TokenizerSection,
    TrackingConfig,
    TrainConfig,
)
from mvar_dist.data.config import DataConfig
from mvar_dist.model.config import MVARConfig


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: MVARConfig = field(default_factory=MVARConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # FID during training
    debug: DebugConfig = field(default_factory=DebugConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # SLURM resources (mvar-dist submit)

    @property
    def peak_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.train.global_batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


# Keys that may change between a checkpoint and its resumption; everything else defines the run.
# File locations may move (a new cluster): the data loader checks the shards' sample count and
# seed, the manifest check the tokenizer's weights, and init_from is not read on resume. How
# damaged shards are treated (bad_data, max_bad_fraction) may change after a run stopped on them.
RESUMABLE_CHANGES: tuple[str, ...] = (
    # the lr is computed from the step count and the schedule's keys before every step
    "run.dir", "train.total_steps", "optim.warmup_steps", "train.log_every", "train.max_consecutive_nonfinite", "train.init_from",
    "train.hang_timeout_s",
    "train.val_every_steps", "train.val_max_batches",
    # how the same math is computed: activations recomputed or not, blocks compiled or not
    "train.activation_checkpointing", "train.activation_checkpointing_every", "train.compile",
    # how the global batch is split over the ranks (the cluster's, not the recipe's)
    "train.micro_batch_size", "train.max_micro_batch_size", "data.resize",
    "checkpoint", "tracking", "sample", "eval", "debug", "launch", "data.num_workers", "data.prefetch_windows",
    "data.train_manifest", "data.val_manifest", "data.shard_url_template", "tokenizer.checkpoint",
    "data.bad_data", "data.max_bad_fraction",
)


def save_resolved(config: Any, path: Path) -> None:
    """Write the fully resolved config (every default spelled out) atomically."""
    write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
