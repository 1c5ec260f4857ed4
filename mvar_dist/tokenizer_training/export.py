"""A tokenizer run's checkpoint -> a tokenizer others can load (``mvar-dist export`` on a run
whose config says ``kind: tokenizer``):

- ``tokenizer.safetensors``: the weights with the architecture in the file's metadata, so
  ``mvar-dist prep --tokenizer`` and :func:`mvar_dist.tokenizer.load_tokenizer` need nothing else;
- ``vae.pth``: the released ``vae_ch160v4096z32.pth`` layout (our keys in the released order,
  plus ``quantize.ema_vocab_hit_SV``), which the released VAR/MVAR code loads strictly. VAR's
  buffer averages each scale's code hits per forward pass over all ranks (counts, which its usage
  report compares with a threshold in counts), so our average hit rates are written as the
  counts they stand for: rate x images per forward (micro batch x ranks) x the scale's tokens;
- ``config.json``: the architecture, the tokenizer's identity hash, a training summary and
  ``files_sha256``, each file's sha256 as written, which loading checks
  (:mod:`mvar_dist.tokenizer.export_files`, the reader).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mvar_dist.atomic import write_json, write_via_temp
from mvar_dist.config import TOKENIZER, TokenizerExperiment, experiment_from_dict
from mvar_dist.run_dir import RunDir
from mvar_dist.run_state import read_rank_state
from mvar_dist.runtime.zero_checkpoint import consolidate
from mvar_dist.state_files import file_sha256
from mvar_dist.tokenizer import MultiScaleVQVAE
from mvar_dist.tokenizer.export_files import CONFIG, FILES_SHA256, FORMAT, RELEASED, SAFETENSORS
from mvar_dist.tokenizer_training.codebook import CODEBOOK

logger = logging.getLogger(__name__)

USAGE_KEY = "quantize.ema_vocab_hit_SV"


def usage_as_counts(rates: torch.Tensor, patch_nums: tuple[int, ...], images_per_forward: int) -> torch.Tensor:
    """Average hit rates (S, V), each row summing to 1, as VAR's average hits per forward pass."""
    tokens = torch.tensor([images_per_forward * pn * pn for pn in patch_nums], dtype=torch.float64)
    return (rates.double() * tokens[:, None]).float()


def released_state_dict(model: MultiScaleVQVAE, usage: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our state dict with the usage buffer where the released file has it (before quant_resi)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("quantize.") and USAGE_KEY not in out:
            out[USAGE_KEY] = usage.float().contiguous()
        out[key] = value.detach().cpu().contiguous()
    return out


def export_tokenizer_run(run_dir: str | Path, out_dir: str | Path, tag: str = "latest") -> dict[str, Path]:
    """Write the three files of the module docstring into ``out_dir`` from checkpoint ``tag`` of a
    tokenizer run; returns their paths."""
    run = RunDir(Path(run_dir))
    tag = run.resolve_tag(tag)
    point = run.read_resume_point(tag)
    config: TokenizerExperiment = experiment_from_dict(point.run_state.config, TOKENIZER)  # type: ignore[assignment]
    model = MultiScaleVQVAE(**config.tokenizer.architecture())
    state = consolidate(run.checkpoints, tag)
    model.load_state_dict(state, strict=True)
    rank_state = read_rank_state(run.rank_file(tag, 0))
    images_per_forward = config.train.batch_split(point.run_state.world_size).micro_batch * point.run_state.world_size
    usage = usage_as_counts(rank_state.task[CODEBOOK]["ema"], tuple(config.tokenizer.patch_nums), images_per_forward)
    training = {"run_dir": str(run.path.resolve()), "checkpoint_tag": tag, "steps": point.step,
                "mlflow_run_id": point.run_state.mlflow_run_id}
    paths = write_tokenizer_export(out_dir, model, config.tokenizer.architecture(), usage, training)
    logger.info("exported tokenizer %s to %s", run.tag_dir(tag), out_dir)
    return paths


def write_tokenizer_export(out_dir: str | Path, model: MultiScaleVQVAE, architecture: dict[str, Any],
                           usage: torch.Tensor, training: dict[str, Any]) -> dict[str, Path]:
    """Write ``model`` (built with ``architecture``) as a tokenizer export into ``out_dir``, with
    ``usage`` as the released file's code-usage buffer and ``training`` as config.json's summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)  # an interrupted re-export must not look complete
    paths = {"safetensors": model.save(out / SAFETENSORS), "released": out / RELEASED, "config": out / CONFIG}
    released = released_state_dict(model, usage)
    write_via_temp(paths["released"], lambda tmp: torch.save(released, tmp))
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "architecture": architecture,
        "identity": model.identity(),
        "files": {"safetensors": SAFETENSORS, "released": RELEASED},
        # hashed as they lie on disk: loading checks the bytes it reads against these
        FILES_SHA256: {path.name: file_sha256(path) for path in (paths["safetensors"], paths["released"])},
        "training": training,
    }
    write_json(paths["config"], metadata, indent=2)  # last: its presence marks a complete export
    return paths
