"""``mvar-dist evaluate``: FID, sFID, Inception Score, precision and recall of generated images
against a reference batch, as OpenAI's ADM evaluator computes them, with our Inception network
and the user's weights file (docs/evaluation.md).

Inputs: a samples ``.npz`` (``--samples``; what ``mvar-dist sample --npz`` writes) or an export
(``--model``: sampled here, batch by batch with the seeds ``sample`` uses, kept as an ``.npz``).
``--nproc N`` splits the work over N local ranks; under srun or torchrun every rank runs this
command without ``--nproc``. Rank 0 prints one table line and writes the JSON report; with
``--run`` (or for an export of a run that tracked to MLflow) the metrics go to that MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from mvar_dist.commands.reporting import HelpFormatter, reports

logger = logging.getLogger(__name__)

CACHE_ENV = "MVAR_DIST_CACHE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist evaluate", formatter_class=HelpFormatter,
        description="FID, sFID, Inception Score, precision and recall of samples against a reference batch,\n"
                    "as the ADM evaluator computes them (docs/evaluation.md).",
        epilog="examples:\n"
               "  mvar-dist evaluate --samples samples/mvar_d16.npz --ref VIRTUAL_imagenet256_labeled.npz \\\n"
               "      --inception pt_inception-2015-12-05-6726825d.pth --out eval/mvar_d16.json\n"
               "  mvar-dist evaluate --model exports/mvar_d16 --num 50000 --ref VIRTUAL_imagenet256_labeled.npz \\\n"
               "      --out eval/mvar_d16.json --nproc 8\n\n"
               "exit status: 0 evaluated; 2 a user error (a missing file, a file of the wrong kind, a flag).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="samples .npz (arr_0: uint8 N x H x W x 3)")
    source.add_argument("--model", type=Path, help="an export directory: sample it first (--num, --cfg, ...)")
    parser.add_argument("--ref", type=Path, required=True,
                        help="reference batch .npz (arr_0 images; mu/sigma/mu_s/sigma_s used as they are)")
    parser.add_argument("--inception", type=Path,
                        help="Inception weights, pt_inception-2015-12-05-6726825d.pth (default: $MVAR_DIST_INCEPTION); "
                             "nothing is downloaded")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--run", type=Path,
                        help="training run directory whose MLflow run gets the metrics (default with --model: the "
                             "run the export came from, when its directory is still there)")
    parser.add_argument("--step", type=int,
                        help="with --run: the step to log at (default: the export's training step, else the run's "
                             "latest checkpoint)")
    parser.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="spawn N local ranks; left out: one rank (or one of srun's / torchrun's)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK when present), 'cpu', 'cuda', ...")
    parser.add_argument("--feature-batch-size", type=int, default=100, help="images per Inception forward (--samples)")
    parser.add_argument("--resize", choices=("tf", "torch"), default="tf",
                        help="resize to 299 px as the TF graph does (tf) or as torch's bilinear does")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the reference batch's features are kept (default: $MVAR_DIST_CACHE, else "
                             "~/.cache/mvar-dist)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    sampling = parser.add_argument_group("with --model: sampling (as mvar-dist sample --npz)")
    sampling.add_argument("--npz", type=Path, help="where the samples are kept (default: --out with .npz)")
    sampling.add_argument("--num", type=int, help="number of images (default: 50000), equal per class")
    sampling.add_argument("--classes", help="class ids, e.g. 0-9 (default: every class of the model)")
    sampling.add_argument("--cfg", type=float, help="guidance scale (default: config.json's)")
    sampling.add_argument("--top-k", type=int, help="top-k (default: config.json's)")
    sampling.add_argument("--top-p", type=float, help="top-p (default: config.json's)")
    sampling.add_argument("--seed", type=int, default=0, help="base seed; batch b uses a seed derived from (seed, b)")
    sampling.add_argument("--batch-size", type=int, default=64, help="images per generate call (and Inception forward)")
    sampling.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the transformer")
    sampling.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: the one config.json names)")
    sampling.add_argument("--no-verify", action="store_true", help="skip the sha256 checks of the export's files")
    return parser


def check_inputs(args: argparse.Namespace) -> None:
    """What every rank would find missing, said once before any rank starts."""
    from mvar_dist.evaluation.inception import resolve_inception_path

    args.inception = resolve_inception_path(args.inception)
    for flag, path in (("--ref", args.ref), ("--samples", args.samples)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model} is not an export directory (no config.json)")
    if args.model is None and any(getattr(args, name) is not None for name in ("npz", "num", "classes", "cfg", "top_k", "top_p")):
        raise ValueError("--npz, --num, --classes, --cfg, --top-k and --top-p only apply with --model")
    if args.out.suffix != ".json":
        raise ValueError(f"--out {args.out}: the report is a .json file")
    if args.run is not None and not (args.run / "mlflow_run.json").is_file():
        raise FileNotFoundError(f"--run {args.run}: no mlflow_run.json (not a run directory that tracked to MLflow)")


def _ranks(args: argparse.Namespace):
    """This process's rank (from RANK/WORLD_SIZE, or srun's variables) and the process group."""
    import torch.distributed as dist

    from mvar_dist.evaluation.features import Ranks
    from mvar_dist.runtime.distributed import export_rank_env, read_rank_env

    if ("SLURM_PROCID" in os.environ and "RANK" not in os.environ and not os.environ.get("MASTER_ADDR")
            and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1):
        # one task of srun (a plain sbatch script): the job's first node hosts the rendezvous
        from mvar_dist.launch.job import first_host, master_port

        os.environ["MASTER_ADDR"] = first_host(os.environ.get("SLURM_JOB_NODELIST", ""))
        os.environ.setdefault("MASTER_PORT", str(master_port(os.environ.get("SLURM_JOB_ID", "0"),
                                                             int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))))
    rank_env = read_rank_env()
    if rank_env.world_size > 1:
        export_rank_env(rank_env)
        # gloo only meets the ranks at a barrier (the data moves through files); slow ranks
        # (sampling 50,000 images) must not time it out
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(hours=24))
    return Ranks(rank_env.rank, rank_env.world_size), rank_env.local_rank


def _device(name: str, local_rank: int):
    import torch

    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    from mvar_dist.commands.sample import resolve_device

    return resolve_device(name)


def _sampler(args: argparse.Namespace, device, identity: dict):
    from mvar_dist.commands.sample import labels_for
    from mvar_dist.evaluation.pipeline import Sampler
    from mvar_dist.model.pretrained import read_export_metadata
    from mvar_dist.sampling.batches import resolve_settings
    from mvar_dist.sampling.exported import load_exported

    metadata = read_export_metadata(args.model)
    labels, _ = labels_for(argparse.Namespace(classes=args.classes, per_class=None, npz=True, num=args.num),
                           int(metadata["model"]["num_classes"]))
    settings = resolve_settings(metadata.get("sample"), args.cfg, args.top_k, args.top_p)
    model, tokenizer, metadata = load_exported(args.model, args.tokenizer, device, verify=not args.no_verify)
    identity.update(model=str(args.model.resolve()), weights_sha256=metadata.get("weights_sha256"), num=len(labels),
                    classes=args.classes, seed=args.seed, batch_size=args.batch_size, precision=args.precision,
                    sampling=settings.kwargs())
    return Sampler(model, tokenizer, labels, args.batch_size, args.seed, settings, args.precision), metadata


def evaluate(args: argparse.Namespace) -> int:
    """One rank's evaluation; rank 0 prints the table line and logs to MLflow."""
    from mvar_dist.evaluation.image_batches import read_reference
    from mvar_dist.evaluation.inception import load_inception
    from mvar_dist.evaluation.pipeline import Evaluation, hash_file, run_evaluation

    ranks, local_rank = _ranks(args)
    device = _device(args.device, local_rank)
    identity: dict = {}
    sampler, metadata = (None, None)
    if args.model is not None:
        sampler, metadata = _sampler(args, device, identity)
        samples_npz = args.npz or args.out.with_suffix(".npz")
    else:
        samples_npz = args.samples
        stat = args.samples.stat()
        identity.update(samples_file=str(args.samples.resolve()), samples_size=stat.st_size, samples_mtime=stat.st_mtime)
    cache = args.cache_dir or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mvar-dist")
    evaluation = Evaluation(
        out=args.out, reference=read_reference(args.ref), reference_sha256=hash_file(args.ref, "reference batch"),
        network=load_inception(args.inception, device, resize=args.resize),
        inception_sha256=hash_file(args.inception, "Inception weights"), resize=args.resize, device=device,
        cache_dir=cache / "reference_features", feature_batch_size=args.feature_batch_size, samples_npz=samples_npz,
        sampler=sampler, identity=identity, progress=not args.no_progress,
    )
    report = run_evaluation(evaluation, ranks)
    if report is None:
        return 0
    print(report["table"])
    print(f"wrote {args.out}" + (f" and {samples_npz}" if sampler is not None else ""))
    _log_to_mlflow(args, report, metadata)
    return 0


def _log_to_mlflow(args: argparse.Namespace, report: dict, metadata: dict | None) -> None:
    from mvar_dist.evaluation.run_metrics import log_to_run, run_step

    run_dir, step = args.run, None
    if run_dir is None and metadata is not None:
        training = metadata.get("training") or {}
        recorded = Path(training["run_dir"]) if training.get("run_dir") else None
        if recorded is not None and (recorded / "mlflow_run.json").is_file():
            run_dir, step = recorded, int(training.get("steps") or 0)
    if run_dir is None:
        return
    if args.step is not None:
        step = args.step
    if step is None:
        step = int(metadata["training"]["steps"]) if metadata and metadata.get("training") else run_step(run_dir)
    tags = {"report": args.out.resolve(), "num_samples": report["num_samples"], "reference": args.ref.name}
    run_id = log_to_run(run_dir, report["metrics"], step, tags)
    print(f"logged to MLflow run {run_id} at step {step}")


@reports("evaluate", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.nproc < 0:
        parser.error(f"--nproc must be >= 1 (or left out for one rank), got {args.nproc}")
    for flag in ("feature_batch_size", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    check_inputs(args)
    if args.nproc:
        from mvar_dist.launch.local import launch

        rest = list(argv)
        index = next(i for i, a in enumerate(rest) if a == "--nproc" or a.startswith("--nproc="))
        del rest[index : index + (1 if "=" in rest[index] else 2)]
        return launch(args.nproc, [sys.executable, "-m", "mvar_dist", "evaluate", *rest])
    return evaluate(args)
