"""The quickstart's embedded settings: where each stage writes, and the experiment it trains.

The experiment is built here in code, so an installed package runs the quickstart from any
directory with no file at hand; ``configs/quickstart.yaml`` is this same experiment written out
for ``runs/quickstart`` (a test keeps the two equal) so that users can read it and re-run the
training stage alone with ``mvar-dist train --config configs/quickstart.yaml --nproc 2``.

Sizing (measured on a 2-core CPU, see docs/quickstart.md): a depth-4, width-128 MVAR
(1.3M parameters) on 16x16 digits tokenized as 155 codes reaches >= 90% judged accuracy
after ~240 optimizer steps of 64 images at lr 2e-3; guidance 1 with top-p 0.95 judged best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["mvar", "var"]

IMAGE_SIZE = 16  # the patch tokenizer's default: 8x8 grid of 2x2 pixel patches
VAL_SIZE = 300
DEFAULT_STEPS = 300
TOKENIZER_STEPS = 200  # --tokenizer vqvae: optimizer steps of the VQVAE (64 digits each)
EXPERIMENT = "quickstart"
TokenizerKind = Literal["patch", "vqvae"]
VQVAE_Z_CHANNELS = 16


@dataclass(frozen=True)
class QuickstartPaths:
    """Every file the quickstart writes, under one output directory. With the trained VQVAE
    tokenizer (``--tokenizer vqvae``) the tokenizer's, the shards' and the transformer's files
    carry a ``_vqvae`` suffix, so both chains live side by side in one directory."""

    out: Path
    tokenizer_kind: TokenizerKind = "patch"

    @property
    def suffix(self) -> str:
        return "" if self.tokenizer_kind == "patch" else "_vqvae"

    @property
    def digits(self) -> Path:
        return self.out / "digits"

    @property
    def tokenizer(self) -> Path:
        if self.tokenizer_kind == "patch":
            return self.out / "tokenizer.safetensors"
        return self.out / "tokenizer_vqvae" / "tokenizer.safetensors"

    @property
    def tokenizer_run(self) -> Path:
        """The VQVAE's training run (``--tokenizer vqvae``)."""
        return self.out / "runs" / "tokenizer"

    @property
    def tokenizer_experiment_file(self) -> Path:
        return self.out / "tokenizer.yaml"

    @property
    def shards(self) -> Path:
        return self.out / f"shards{self.suffix}"

    @property
    def train_manifest(self) -> Path:
        return self.shards / "train" / "manifest.json"

    @property
    def mlflow_db(self) -> Path:
        return self.out / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db.resolve()}"

    def run_dir(self, mode: Mode) -> Path:
        return self.out / "runs" / f"{mode}{self.suffix}"

    def experiment_file(self, mode: Mode) -> Path:
        return self.out / f"{mode}{self.suffix}.yaml"

    def model_dir(self, mode: Mode) -> Path:
        return self.out / "model" / f"{mode}{self.suffix}"

    def grid(self, mode: Mode) -> Path:
        return self.out / f"samples_{mode}{self.suffix}.png"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"


def experiment(paths: QuickstartPaths, mode: Mode = "mvar", steps: int = DEFAULT_STEPS, seed: int = 0,
               absolute: bool = True) -> dict[str, Any]:
    """The ``mvar-dist train`` experiment of the quickstart, as the dict a YAML file would hold.

    ``absolute`` resolves the paths (the ranks may run from another directory); the copy in
    configs/ keeps them relative to the repository root.
    """
    def where(path: Path) -> str:
        return str(path.resolve() if absolute else path)

    # MVAR and VAR share every setting but the attention, so `mvar-dist compare` contrasts them
    return {
        "run": {"dir": where(paths.run_dir(mode)), "seed": seed},
        "model": {
            "mode": mode, "depth": 4, "embed_dim": 128, "num_heads": 4, "num_classes": 10,
            "vocab_size": 256, "z_channels": 12 if paths.tokenizer_kind == "patch" else VQVAE_Z_CHANNELS,
            "patch_nums": [1, 2, 3, 4, 5, 6, 8], "refine_step": 6, "kernel_size": 5, "attention_backend": "torch",
        },
        "tokenizer": {"kind": paths.tokenizer_kind, "checkpoint": where(paths.tokenizer)},
        # mirrored digits are not digits; one worker: the 2 cores are busy with the 2 ranks
        "data": {"train_manifest": where(paths.train_manifest), "num_workers": 0, "hflip": False,
                 "shuffle_window": 512, "seed": seed},
        "train": {"schedule": "all", "total_steps": steps, "global_batch_size": 64, "micro_batch_size": 32,
                  "log_every": 1},
        "optim": {"lr": 2.0e-3, "warmup_steps": min(50, steps // 5), "weight_decay": 0.05},
        # DeepSpeed's bf16 keeps bf16 weights, which CPUs compute no faster than fp32
        "deepspeed": {"template": "zero2", "precision": "fp32"},
        # one checkpoint at the end (the run is minutes long); a rerun resumes from it
        "checkpoint": {"every_steps": max(steps, 1), "keep_last": 1},
        "tracking": {"uri": f"sqlite:///{where(paths.mlflow_db)}", "experiment": EXPERIMENT},
        "sample": {"cfg": 1.0, "top_k": 0, "top_p": 0.95},
    }


def tokenizer_experiment(paths: QuickstartPaths, steps: int = TOKENIZER_STEPS, seed: int = 0) -> dict[str, Any]:
    """The ``mvar-dist train-tokenizer`` experiment of ``--tokenizer vqvae``: a small multi-scale
    VQVAE (8x8 latents of 16 channels, 256 codes, the patch tokenizer's 7 scales) trained on the
    training digits with L1 + L2 + VQ losses and dead-code restarts; validated on the val digits."""
    return {
        "kind": "tokenizer",
        "run": {"dir": str(paths.tokenizer_run.resolve()), "seed": seed},
        "tokenizer": {"vocab_size": 256, "z_channels": VQVAE_Z_CHANNELS, "ch": 32, "ch_mult": [1, 2],
                      "num_res_blocks": 1, "patch_nums": [1, 2, 3, 4, 5, 6, 8]},
        "data": {"train": str((paths.digits / "train").resolve()), "val": str((paths.digits / "val").resolve()),
                 "image_size": IMAGE_SIZE, "resize_ratio": 1.0, "crop": "center", "hflip": False, "num_workers": 0,
                 "seed": seed},
        "loss": {"l1": 1.0, "l2": 1.0, "vq": 1.0},
        "codebook": {"restart_dead_every": 20},
        "train": {"total_steps": steps, "global_batch_size": 64, "micro_batch_size": 32, "val_every_steps": 50},
        "optim": {"lr": 2.0e-3, "warmup_steps": min(10, steps // 5)},
        "deepspeed": {"template": "zero1", "precision": "fp32"},
        "checkpoint": {"every_steps": max(steps, 1), "keep_last": 1},
        "tracking": {"uri": paths.tracking_uri, "experiment": EXPERIMENT},
    }
