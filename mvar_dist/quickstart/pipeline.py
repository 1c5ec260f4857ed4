"""The quickstart chain (``mvar-dist quickstart``): the whole system end to end on CPU, on
scikit-learn's digits.

Stages (each logs its wall and CPU time; all outputs under ``--out``, see
:class:`~mvar_dist.quickstart.experiment.QuickstartPaths`):

1. digits: the train/val digits as a class-per-folder PNG image folder (:mod:`mvar_dist.quickstart.digits`)
2. tokenizer: the pixel-patch tokenizer fitted on the training images and saved with the run
3. shards: WebDataset code shards + manifest of the training split (``mvar_dist.data_prep``)
4. verify: checksums, counts and code ranges of the shards against the manifest
5. train: ``mvar-dist train --nproc 2``: DeepSpeed on 2 local CPU ranks (gloo), MLflow in sqlite
6. export: the ZeRO checkpoint -> model.safetensors + config.json
7. sample: a class-conditional grid, one row per class, and the judge's verdict on the samples
   (its accuracy, and the FID of the samples against real digits in the judge's feature space)

Re-running into the same ``--out`` reuses stages 1-4 (deterministic; each checks what it finds)
and resumes training from the run's checkpoint when its experiment is unchanged: a finished run
is not retrained, a larger ``--steps`` continues it. ``--fresh`` discards the run and retrains.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml

from mvar_dist.atomic import write_bytes, write_json
from mvar_dist.config import apply_overrides, config_from_dict, resume_conflicts
from mvar_dist.data_prep.merge import merge_manifest
from mvar_dist.data_prep.shard import shard_dataset
from mvar_dist.data_prep.sources import list_class_folder
from mvar_dist.data_prep.verify import verify_manifest
from mvar_dist.launch.local import launch
from mvar_dist.quickstart.digits import (
    generated_fid,
    judge_accuracy,
    read_image_folder,
    real_fid_floor,
    real_val_accuracy,
    write_digits_image_folder,
)
from mvar_dist.quickstart.experiment import (
    DEFAULT_STEPS, IMAGE_SIZE, VAL_SIZE, Mode, QuickstartPaths, TokenizerKind, experiment,
)
from mvar_dist.quickstart.progress import TrainingProgress
from mvar_dist.quickstart.vqvae import prepare_vqvae_tokenizer
from mvar_dist.run_dir import RunDir
from mvar_dist.sampling.batches import resolve_settings, sample_batches
from mvar_dist.sampling.exported import load_exported
from mvar_dist.sampling.images import compose_grid, write_png
from mvar_dist.tokenizer import PatchResidualTokenizer, ResidualTokenizer, fit_tokenizer
from mvar_dist.training.export import export_run

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
SHARD_SIZE = 500
GRID_ZOOM = 4  # 16 px digits are too small to see; the grid repeats each pixel 4x4
# Threads per training rank and for this process's own torch work (tokenizer encode, sampling,
# judging): fixed, not derived from the machine or the caller's OMP_NUM_THREADS. CPU kernels split
# their reductions by thread, so results differ in the last bits between thread counts (a VQVAE's
# gradients: ~1e-7 on 18% of the elements between 1 and 2 threads, bitwise equal at the same count),
# and a few hundred training steps turn that into a different tokenizer and judged accuracy. With
# the count fixed, the same command gives the same figures on any machine with the same CPU kernels.
THREADS = 1


class QuickstartError(RuntimeError):
    """A stage failed; the message says which and what to do."""


@dataclass
class StageClock:
    """Wall and CPU seconds per stage; CPU includes finished child processes (the ranks)."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @staticmethod
    def cpu_seconds() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        logger.info("[%d/7 %s] %s", len(self.stages) + 1, name, what)
        wall, cpu = time.perf_counter(), self.cpu_seconds()
        yield
        wall, cpu = time.perf_counter() - wall, self.cpu_seconds() - cpu
        self.stages[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        logger.info("[%s] done in %.1f s (CPU %.1f s)", name, wall, cpu)

    def totals(self) -> dict[str, float]:
        return {key: round(sum(s[key] for s in self.stages.values()), 2) for key in ("wall_s", "cpu_s")}


# ----- stages 1-4: data -----


def prepare_tokenizer(paths: QuickstartPaths) -> PatchResidualTokenizer:
    """The saved tokenizer if present (fitting is deterministic), else fit it on the training digits."""
    if paths.tokenizer.is_file():
        logger.info("reusing %s", paths.tokenizer)
        return PatchResidualTokenizer.from_checkpoint(paths.tokenizer)
    images, _ = read_image_folder(paths.digits / "train")
    tokenizer = fit_tokenizer(images, seed=0)
    tokenizer.save(paths.tokenizer)
    return tokenizer


def prepare_shards(paths: QuickstartPaths, tokenizer: ResidualTokenizer) -> Path:
    """Shard the training split (complete shards are kept) and merge its manifest."""
    source = list_class_folder(paths.digits / "train")
    try:
        summary = shard_dataset(source, paths.shards, tokenizer, name="digits", split="train",
                                shard_size=SHARD_SIZE, batch_size=256, decode_threads=2)
    except ValueError as err:  # e.g. shards of another tokenizer already there
        raise QuickstartError(f"sharding into {paths.shards} failed: {err}; delete {paths.shards} and rerun") from None
    logger.info("%d shards written, %d already complete", len(summary.shards_written), len(summary.shards_skipped))
    return merge_manifest(paths.shards, "train")


def verify_shards(manifest: Path) -> dict[str, int]:
    report = verify_manifest(manifest)
    if not report.ok:
        raise QuickstartError(f"{manifest}: bad shards {report.bad_shards}; delete {manifest.parent} and rerun")
    logger.info("%s: %d shards, %d samples OK", manifest, report.shards_checked, report.samples_checked)
    return {"shards": report.shards_checked, "samples": report.samples_checked}


# ----- stage 5: training -----


def write_experiment(path: Path, raw: dict[str, Any]) -> None:
    config_from_dict(raw)  # fail here, not in two ranks, if overrides broke it
    write_bytes(path, yaml.safe_dump(raw, sort_keys=False).encode())


def finished_checkpoint_step(raw: dict[str, Any], steps: int) -> int | None:
    """The step of the run's checkpoint if it already reached ``steps``; raise if it is of another experiment."""
    point = RunDir(Path(raw["run"]["dir"])).read_latest()
    if point is None:
        return None
    changed = resume_conflicts(point.run_state.config, config_from_dict(raw))
    if changed:
        raise QuickstartError(
            f"{raw['run']['dir']} holds a checkpoint of a different experiment ({', '.join(changed)} changed); "
            f"rerun with --fresh to discard it"
        )
    if point.step >= steps:
        return point.step
    logger.info("resuming %s from step %d", raw["run"]["dir"], point.step)
    return None


def create_experiment(tracking_uri: str, name: str, artifacts: Path) -> None:
    """Create the MLflow experiment with its artifacts under ``--out``: MLflow's default is
    ./mlruns of whatever directory the command runs in."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def train(experiment_file: Path, nproc: int, command_name: str = "train") -> None:
    """The same path as ``mvar-dist train --config FILE --nproc N`` (or ``train-tokenizer``),
    with CPU-friendly thread counts."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # a fixed count, not cores / ranks (see THREADS): the results depend on it
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    command = [sys.executable, "-m", "mvar_dist", command_name, "--config", str(experiment_file)]
    code = launch(nproc, command, env=env)
    if code:
        raise QuickstartError(f"{command_name} exited with code {code}; see the rank logs above")


# ----- stages 6-7: export, sample, judge -----


def sample_and_judge(paths: QuickstartPaths, mode: Mode, per_class: int, grid_per_class: int, seed: int) -> dict[str, Any]:
    """Sample ``per_class`` images of every class; the grid shows the first ``grid_per_class``."""
    device = torch.device("cpu")
    model, tokenizer, metadata = load_exported(paths.model_dir(mode), paths.tokenizer, device)
    settings = resolve_settings(metadata.get("sample"), None, None, None)
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    images = np.concatenate(list(sample_batches(model, tokenizer, labels, 100, seed, settings, device)))

    shown = images.reshape(NUM_CLASSES, per_class, *images.shape[1:])[:, :grid_per_class]
    shown = shown.repeat(GRID_ZOOM, axis=2).repeat(GRID_ZOOM, axis=3)
    write_png(compose_grid(shown.reshape(-1, *shown.shape[2:]), rows=NUM_CLASSES), paths.grid(mode))

    # judged from the uint8 pixels the PNG holds, as a user would see them
    judged_images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    judged = judge_accuracy(judged_images, torch.tensor(labels))
    real = real_val_accuracy(IMAGE_SIZE)
    logger.info("judged accuracy of %d samples: %.1f%% (real validation digits: %.1f%%)", len(labels), 100 * judged, 100 * real)
    return {"judged_accuracy": judged, "real_val_accuracy": real, "judged_samples": len(labels),
            **judge_fids(judged_images, per_class), "sampling": settings.kwargs(), "training": metadata["training"]}


def judge_fids(images: torch.Tensor, per_class: int) -> dict[str, float | None]:
    """``judged_fid``: the FID of the samples against the 300 real validation digits in the
    judge's feature space; ``real_fid_floor``: that of ``per_class`` real training digits of each
    class against the same validation digits, the value of digits indistinguishable from real ones
    at this sample size. None (with a warning) where the statistics refuse them, which only a
    degenerate sample set can cause; the accuracy still stands."""
    fids: dict[str, float | None] = {}
    for key, compute in (("judged_fid", lambda: generated_fid(images, IMAGE_SIZE)),
                         ("real_fid_floor", lambda: real_fid_floor(per_class, IMAGE_SIZE))):
        try:
            fids[key] = compute()
        except ValueError as err:
            logger.warning("%s not computed: %s", key, err)
            fids[key] = None
    logger.info("FID in the judge's feature space: %s (real digits at this sample size: %s)",
                *(f"{v:.3f}" if v is not None else "n/a" for v in fids.values()))
    return fids


def log_quality(tracking_uri: str, run_id: str | None, step: int, quality: dict[str, Any]) -> None:
    """Put the judge's figures into the run's MLflow run, so `mvar-dist compare` shows them."""
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key in ("judged_accuracy", "real_val_accuracy", "judged_fid", "real_fid_floor"):
        if quality.get(key) is not None:
            client.log_metric(run_id, f"quality/{key}", quality[key], step=step)


# ----- the command -----


def run_quickstart(out: Path, mode: Mode = "mvar", steps: int = DEFAULT_STEPS, seed: int = 0, nproc: int = 2,
                   per_class: int = 20, grid_per_class: int = 10, fresh: bool = False,
                   overrides: Sequence[str] = (), tokenizer_kind: TokenizerKind = "patch") -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``out/summary.json``)."""
    with torch_threads(THREADS):
        return _run_quickstart(out, mode, steps, seed, nproc, per_class, grid_per_class, fresh, overrides,
                               tokenizer_kind)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """This process's torch intra-op threads set to ``count`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_quickstart(out: Path, mode: Mode, steps: int, seed: int, nproc: int, per_class: int, grid_per_class: int,
                    fresh: bool, overrides: Sequence[str], tokenizer_kind: TokenizerKind) -> dict[str, Any]:
    if steps < 1 or per_class < 1 or not 1 <= grid_per_class <= per_class:
        raise QuickstartError("--steps and --per-class must be >= 1 and --grid-per-class in 1..--per-class")
    paths = QuickstartPaths(Path(out), tokenizer_kind)
    paths.out.mkdir(parents=True, exist_ok=True)
    raw = experiment(paths, mode, steps, seed)
    apply_overrides(raw, overrides)
    clock = StageClock()
    with clock.stage("digits", f"sklearn digits -> {paths.digits}"):
        write_digits_image_folder(paths.digits, image_size=IMAGE_SIZE, val_size=VAL_SIZE, seed=0)
    if raw["tracking"]["uri"] == paths.tracking_uri:  # our own store, not an overridden server
        # before any run starts (the VQVAE's comes first): MLflow's default puts artifacts in ./mlruns
        create_experiment(paths.tracking_uri, raw["tracking"]["experiment"], paths.out / "mlartifacts")
    tokenizer_report: dict[str, Any] = {}
    if tokenizer_kind == "vqvae":
        with clock.stage("tokenizer", f"train a multi-scale VQVAE on {nproc} CPU ranks -> {paths.tokenizer}"):
            tokenizer, tokenizer_report = prepare_vqvae_tokenizer(paths, nproc, seed, train)
    else:
        with clock.stage("tokenizer", f"pixel-patch tokenizer -> {paths.tokenizer}"):
            tokenizer = prepare_tokenizer(paths)
    with clock.stage("shards", f"code shards -> {paths.shards}"):
        manifest = prepare_shards(paths, tokenizer)
    with clock.stage("verify", f"verify {manifest}"):
        verified = verify_shards(manifest)
    run_dir = Path(raw["run"]["dir"])
    with clock.stage("train", f"{mode.upper()} for {raw['train']['total_steps']} steps on {nproc} CPU ranks -> {run_dir}"):
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        done = finished_checkpoint_step(raw, int(raw["train"]["total_steps"]))
        if done is None:
            write_experiment(paths.experiment_file(mode), raw)
            with TrainingProgress(run_dir, int(raw["train"]["total_steps"])):
                train(paths.experiment_file(mode), nproc)
        else:
            logger.info("%s already trained to step %d; reusing it (--fresh retrains)", run_dir, done)
    with clock.stage("export", f"export -> {paths.model_dir(mode)}"):
        export_run(run_dir, paths.model_dir(mode))
    with clock.stage("sample", f"sample {per_class} per class and judge -> {paths.grid(mode)}"):
        quality = sample_and_judge(paths, mode, per_class, grid_per_class, seed)
    training = quality.pop("training")
    tracking_uri = raw["tracking"]["uri"]
    log_quality(tracking_uri, training["mlflow_run_id"], training["steps"], quality)
    summary = {
        "mode": mode, "steps": training["steps"], "seed": seed, "threads": THREADS, "torch": torch.__version__,
        "out": str(paths.out.resolve()),
        "digits": str(paths.digits.resolve()), "tokenizer": str(paths.tokenizer.resolve()),
        "shards": str(manifest.resolve()), "verified": verified, "run_dir": str(run_dir.resolve()),
        "mlflow": {
            "tracking_uri": tracking_uri, "experiment": raw["tracking"]["experiment"], "run_id": training["mlflow_run_id"],
            "ui_command": f"mlflow ui --backend-store-uri {tracking_uri}",
            "compare_command": f"mvar-dist compare --experiment {raw['tracking']['experiment']} --tracking-uri {tracking_uri}",
        },
        "model_dir": str(paths.model_dir(mode).resolve()), "grid": str(paths.grid(mode).resolve()),
        **quality,
        "final_train_loss": training["final_metrics"].get("train/loss"),
        "tokenizer_kind": tokenizer_kind, **({"tokenizer_quality": tokenizer_report} if tokenizer_report else {}),
        "stages": clock.stages, "total": clock.totals(),
    }
    write_json(paths.summary, summary)
    return summary
