"""The sections of an experiment file that belong to no other package (``model`` is
:class:`mvar_dist.model.MVARConfig`, ``data`` is :class:`mvar_dist.data.DataConfig`).
Every field is documented in docs/config.md; a test keeps that reference complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mvar_dist.config.batch_split import BatchSplit, MicroBatch, resolve_batch_split


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: resolved config, checkpoints, logs
    seed: int = 0


@dataclass
class TokenizerSection:
    """The frozen tokenizer that turns codes into the transformer's teacher input."""

    kind: Literal["vqvae", "patch"] = "vqvae"  # VAR's VQVAE, or the quickstart pixel-patch tokenizer
    checkpoint: str | None = None  # .pth/.safetensors; the shards' manifest must name the same weights
    options: dict[str, Any] = field(default_factory=dict)  # architecture kwargs of the tokenizer class


@dataclass
class TrainConfig:
    schedule: Literal["paper", "all"] = "all"  # which scales each optimizer step covers (docs/training.md)
    ratio_k: int = 8  # paper schedule: steps on scales 0..refine_step-1 per refine-scale step
    total_steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # images per optimizer step, all ranks together
    # images per rank per forward pass; auto: the largest that divides the rank's share of the
    # global batch without exceeding max_micro_batch_size (docs/config.md, "Batch split")
    micro_batch_size: MicroBatch = 32
    max_micro_batch_size: int | None = None  # with auto: what one GPU holds for this model; None: no limit
    label_smoothing: float = 0.0
    init_from: str | None = None  # weights to start from (e.g. var_d16.pth for fine-tuning)
    max_consecutive_nonfinite: int = 10  # save and stop after this many non-finite steps in a row
    # a rank that makes no progress (a step, an evaluation, a save) for this long ends the job
    # (exit status 3; docs/training.md, "A hung rank"); 0: never
    hang_timeout_s: float = 1800.0
    log_every: int = 1  # metrics to the tracker every N steps
    val_every_steps: int = 0  # validation pass (data.val_manifest) every N steps and at the end; 0: off
    val_max_batches: int = 0  # per-rank batches of each validation pass; 0: the whole split
    # recompute block activations in backward instead of storing them: less memory, more time
    activation_checkpointing: Literal["none", "blocks", "every_n"] = "none"
    activation_checkpointing_every: int = 2  # every_n: one block in every this many is recomputed
    compile: bool = False  # torch.compile the transformer blocks (helps on GPUs; see docs/training.md)

    def batch_split(self, world_size: int) -> BatchSplit:
        """Micro batch and accumulation for ``world_size`` ranks; ConfigError if there is none."""
        return resolve_batch_split(self.global_batch_size, self.micro_batch_size, world_size, self.max_micro_batch_size)

    @property
    def recompute_every(self) -> int:
        """Recompute one block in every this many (0: none)."""
        return {"none": 0, "blocks": 1, "every_n": self.activation_checkpointing_every}[self.activation_checkpointing]


@dataclass
class OptimConfig:
    base_lr: float = 1e-4  # per 256 images; lr = base_lr * global_batch_size / 256 unless lr is set
    lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 2.0  # 0 disables
    warmup_steps: int = 0
    warmup_start: float = 0.005  # lr fraction at step 0
    final_lr_ratio: float = 0.01  # lr fraction at the last step
    lr_schedule: Literal["lin0", "constant"] = "lin0"

    @property
    def flat_fraction(self) -> float:
        """lin0 holds the peak lr for this fraction of the post-warmup steps (as VAR's lin0)."""
        return 0.05


@dataclass
class DeepSpeedSection:
    template: str = "zero2"  # configs/deepspeed/<template>[_<precision>].json, or a path to a JSON file
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    backend: str | None = None  # torch.distributed backend; None: nccl on CUDA, gloo otherwise


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite in run.dir
    experiment: str = "mvar-dist"
    timeout_s: float = 10.0  # every MLflow call gives up after this long; training never waits longer
    retry_interval_s: float = 60.0  # after a failed call, no call is tried for this long (queued metrics wait)


@dataclass
class SampleConfig:
    """Sampling settings published with the model (docs/semantics.md, section 5); used by sample/eval commands,
    and by the sample grids logged during training (``every_steps`` > 0)."""

    cfg: float = 1.5
    top_p: float = 0.96
    top_k: int = 900
    every_steps: int = 0  # training: log a sample grid every N steps and at the end; 0: off
    classes: tuple[int, ...] | None = None  # grid rows; None: the first min(model.num_classes, 8) classes
    per_class: int = 4  # grid columns
    seed: int = 0  # fixed, so that grids of different steps are comparable

    def grid_classes(self, num_classes: int) -> tuple[int, ...]:
        return self.classes if self.classes is not None else tuple(range(min(num_classes, 8)))


@dataclass
class EvalConfig:
    """FID during training (docs/evaluation.md): every ``fid_every_steps`` the ranks draw
    ``fid_samples`` images together (``sample`` section's cfg/top-k/top-p, a fixed seed) and
    score them against the reference batch's ``mu``/``sigma``; logged as ``eval/fid_<samples>``."""

    fid_every_steps: int = 0  # FID every N steps and at the end; 0: off
    fid_samples: int = 5000  # images per FID (classes in turn); the papers' FID-50k is mvar-dist evaluate's
    fid_reference: str | None = None  # reference batch .npz (mu/sigma used as they are)
    inception: str | None = None  # pt_inception-2015-12-05-6726825d.pth; None: $MVAR_DIST_INCEPTION
    fid_batch_size: int = 50  # images per generate call and Inception forward, per rank
    fid_seed: int = 0  # fixed, so that FIDs of different steps compare the same noise


@dataclass
class DebugConfig:
    """Testing hooks; leave unset in real runs."""

    kill_after_checkpoint_step: int | None = None  # SIGKILL every rank right after this checkpoint
    nonfinite_loss_steps: tuple[int, ...] = ()  # steps whose loss is replaced by NaN on rank 0
    stop_at_step: int | None = None  # rank 0 acts as if a stop signal arrived during this step
    hang_at_step: int | None = None  # rank hang_rank hangs at the start of this step (first session only) ...
    hang_rank: int = 1
    hang_how: Literal["stop", "read"] = "stop"  # ... stopped by SIGSTOP, or blocked in a read that never returns


@dataclass
class LaunchConfig:
    """The ``launch`` section: SLURM resources. CLI flags of ``mvar-dist submit`` override it."""

    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU
    tasks_per_node: int | None = None  # CPU ranks per node; None: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1
    mem: str | None = None  # per node, sbatch syntax ("64G"); None: the partition default
    time: int = 60  # minutes
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    max_requeues: int = 10  # preemptions + time limits this job may requeue itself after
    job_name: str = "mvar-dist"
    slurm_setup: list[str] = field(default_factory=list)  # shell lines before srun (modules, env)
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to save a checkpoint
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    # memory of one GPU ("80GB"): with train.micro_batch_size auto and no max_micro_batch_size,
    # submit caps the micro batch at the largest that mvar-dist plan finds fits
    gpu_memory: str | None = None

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node
