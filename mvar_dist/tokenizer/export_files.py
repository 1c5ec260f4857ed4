"""A tokenizer export directory (written by ``mvar-dist export`` of a tokenizer run,
:mod:`mvar_dist.tokenizer_training.export`), read back: which file a directory stands for, and
whether a file is the one the export wrote. Kept in the tokenizer package, apart from the writer,
so that loading a tokenizer never imports the training code.

``config.json`` records ``files_sha256``: file name -> sha256 of the file's bytes as written. This
is not the identity's ``weights_sha256`` (a hash over the state dict's tensors, which the shard
manifests compare): a file hash is checked before anything in the file is parsed, so a zeroed or
swapped file is refused naming it, instead of loading or failing somewhere further on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mvar_dist.state_files import verify_file_sha256

logger = logging.getLogger(__name__)

FORMAT = "mvar-dist-tokenizer-export/1"
CONFIG = "config.json"
SAFETENSORS = "tokenizer.safetensors"
RELEASED = "vae.pth"
FILES_SHA256 = "files_sha256"


def read_export_config(directory: str | Path) -> dict[str, Any] | None:
    """config.json of the tokenizer export in ``directory``; None where there is none (a folder
    the released ``.pth`` was put in, a model export, a config.json of something else)."""
    config = Path(directory) / CONFIG
    if not config.is_file():
        return None
    try:
        metadata = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        # it may be anyone's config.json: say why nothing is checked rather than refuse the file
        logger.warning("cannot read %s (%s): the tokenizer beside it is not checked against it", config, error)
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("format") == FORMAT else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The file to load for ``path``: a tokenizer export directory stands for its
    ``tokenizer.safetensors`` (which records its architecture); any other path is returned as is.
    FileNotFoundError for a directory that is no tokenizer export."""
    path = Path(path)
    if not path.is_dir():
        return path
    metadata = read_export_config(path)
    if metadata is None:
        raise FileNotFoundError(
            f"{path} is a directory but not a tokenizer export (no {CONFIG} of format {FORMAT!r} in it); "
            "pass the tokenizer file (.pth or .safetensors)"
        )
    return path / str((metadata.get("files") or {}).get("safetensors", SAFETENSORS))


def verify_checkpoint(path: str | Path) -> None:
    """:class:`~mvar_dist.state_files.ChecksumMismatch` naming ``path`` unless it has the sha256
    that the tokenizer export's config.json beside it records. A file beside no export, or one
    the export records no hash for (exports written before the hashes were recorded, a file
    copied in), is not checked."""
    path = Path(path)
    real = path.resolve()  # a link into an export is checked against that export
    metadata = read_export_config(real.parent)
    if metadata is None:
        logger.debug("%s is not in a tokenizer export directory: no recorded sha256 to check", path)
        return
    expected = (metadata.get(FILES_SHA256) or {}).get(real.name)
    if expected is None:
        logger.info("%s records no sha256 for %s (an export written before they were recorded): not checked",
                    real.parent / CONFIG, real.name)
        return
    verify_file_sha256(path, str(expected), real.parent / CONFIG)
