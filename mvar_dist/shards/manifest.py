"""A split's ``manifest.json``: what ``mvar-dist prep`` promises about its shards, read by the
loader, ``verify-shards`` and the trainer. Shard names in it are relative to the manifest's
directory. Format (``format_version`` 1)::

    {"format": "mvar-dist-codes", "format_version": 1, "name", "split",
     "num_samples", "num_shards", "shard_size",
     "shards": [{"name", "num_samples", "sha256", "bytes"}, ...],   # in shard-index order
     "classes": [class name of index 0, ...], "num_classes",
     "patch_nums", "num_tokens", "vocab_size", "image_size",
     "sample_format": {field: description}, "preprocessing": {...}, "tokenizer": identity(),
     "tool": {"name": "mvar-dist", "version"}, "order_seed", "listing_sha256",
     "num_images_listed", "skipped": [{"path", "reason", "shard"}, ...]}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mvar_dist.atomic import write_json
from mvar_dist.shards.format import CLS_FIELD, CODES_FIELD, META_FIELD

MANIFEST_NAME = "manifest.json"
FORMAT = "mvar-dist-codes"
FORMAT_VERSION = 1

SAMPLE_FORMAT = {
    CLS_FIELD: "class index, ASCII decimal",
    CODES_FIELD: (
        "uint16 little-endian, shape (2, num_tokens): row 0 the image, row 1 its horizontal flip; "
        "scales concatenated coarse to fine"
    ),
    META_FIELD: '{"path": source path relative to the dataset root, "size": [width, height] of the original}',
}


# Shard names are joined to the manifest's directory or put into data.shard_url_template, whose
# ``pipe:`` URLs run in a shell: a name must be a plain file name, nothing a path or a shell reads.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
PLAIN_NAME_RULE = "letters, digits, '.', '_' and '-', not starting with '.' or '-'"


def is_plain_name(name: object) -> bool:
    """True for a plain relative file name (see ``PLAIN_NAME_RULE``): no directory part, no '..',
    no absolute path, no shell syntax."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Manifest:
    location: str
    data: Mapping[str, Any]  # the manifest.json content (format above)
    shard_urls: tuple[str, ...]

    @property
    def shard_counts(self) -> tuple[int, ...]:
        return tuple(int(s["num_samples"]) for s in self.data["shards"])

    def __getattr__(self, name: str) -> Any:  # num_samples, patch_nums, vocab_size, tokenizer, ...
        if name.startswith("__") or name == "data":
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def _is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def load_manifest(location: str | Path, shard_url_template: str | None = None) -> Manifest:
    """Read a manifest from a path, a split directory, or a URL webdataset can open."""
    location = str(location)
    if not _is_url(location) and Path(location).is_dir():
        location = str(Path(location) / MANIFEST_NAME)
    if _is_url(location):
        import webdataset

        with webdataset.gopen(location, "rb") as stream:
            data = json.loads(stream.read())
    else:
        if not Path(location).is_file():
            raise FileNotFoundError(f"manifest {location} does not exist (run 'mvar-dist prep ... --merge' to write it)")
        data = json.loads(Path(location).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{location} is not an mvar-dist code manifest (format={data.get('format')!r})")
    names = _shard_names(location, data)
    if shard_url_template:
        if not is_plain_name(data.get("split")):  # it goes into the template too
            raise ValueError(
                f"manifest {location}: split {data.get('split')!r} is not a plain name ({PLAIN_NAME_RULE}); "
                "refusing to put it into data.shard_url_template"
            )
        urls = [shard_url_template.format(name=n, split=data["split"]) for n in names]
    elif location.startswith("pipe:"):
        raise ValueError(f"manifest {location} is read through a pipe: set data.shard_url_template to locate its shards")
    elif _is_url(location):
        urls = [location.rsplit("/", 1)[0] + "/" + n for n in names]
    else:
        urls = [str(Path(location).parent / n) for n in names]
    return Manifest(location, data, tuple(urls))


def _shard_names(location: str, data: Mapping[str, Any]) -> list[str]:
    """The shard names of a manifest; ValueError naming the first entry that is not a plain file name."""
    names = []
    for index, entry in enumerate(data["shards"]):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not is_plain_name(name):
            raise ValueError(
                f"manifest {location}: shards[{index}] has name {name!r}, which is not a plain file name "
                f"({PLAIN_NAME_RULE}); refusing it, since shard names are joined to the manifest's directory "
                "or put into data.shard_url_template (pipe: URLs run in a shell)"
            )
        names.append(name)
    return names


def check_same_classes(train: Manifest, val: Manifest) -> None:
    """Raise ValueError unless the train and validation manifests list the same classes in the same
    order: class indices are positions in that list, so a validation split prepared from a tree
    missing one class would shift every label after it."""
    ours, theirs = list(train.classes), list(val.classes)
    if ours == theirs:
        return
    common = min(len(ours), len(theirs))
    index = next((i for i in range(common) if ours[i] != theirs[i]), common)
    if index < common:
        difference = f"first difference at index {index}: train {ours[index]!r}, validation {theirs[index]!r}"
    else:
        longer, classes = ("train", ours) if len(ours) > len(theirs) else ("validation", theirs)
        difference = f"first difference at index {index}: only {longer} has a class there, {classes[index]!r}"
    raise ValueError(
        f"the class lists differ: train manifest {train.location} has {len(ours)} classes, validation manifest "
        f"{val.location} has {len(theirs)} classes; {difference}. Prepare the validation split with "
        "'mvar-dist prep ... --classes-from <train manifest>' so that its class indices match training's."
    )


def check_manifest_matches(
    manifest: Manifest | str | Path, patch_nums: Sequence[int], vocab_size: int, tokenizer_identity: Mapping[str, Any] | None
) -> Manifest:
    """Raise ValueError unless the shards were made for this model: same patch_nums, vocabulary
    and tokenizer (config and weights). ``tokenizer_identity`` None skips the tokenizer check."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    problems = []
    if list(manifest.patch_nums) != [int(p) for p in patch_nums]:
        problems.append(f"patch_nums: shards {tuple(manifest.patch_nums)}, model {tuple(patch_nums)}")
    if int(manifest.vocab_size) != int(vocab_size):
        problems.append(f"vocab_size: shards {manifest.vocab_size}, model {vocab_size}")
    ours = json.loads(json.dumps(tokenizer_identity)) if tokenizer_identity is not None else None
    if ours is not None and manifest.tokenizer != ours:
        theirs = manifest.tokenizer
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        details = ", ".join(f"{k}: shards {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in keys)
        problems.append(f"tokenizer differs ({details})")
    if problems:
        raise ValueError(
            f"the shards of {manifest.location} do not match the model config: " + "; ".join(problems)
            + ". Re-tokenize with 'mvar-dist prep' using this tokenizer, or point data.*_manifest at matching shards."
        )
    return manifest


def write_manifest(split_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(split_dir) / MANIFEST_NAME
    write_json(path, dict(manifest))
    return path


def manifest_classes(target: str | Path) -> tuple[str, ...]:
    """The class list of a manifest file, or of the manifest in a split directory."""
    target = Path(target)
    path = target / MANIFEST_NAME if target.is_dir() else target
    return tuple(json.loads(path.read_text())["classes"])


def find_manifests(target: str | Path) -> list[Path]:
    """A manifest file, a split directory holding manifest.json, or a prep output directory."""
    target = Path(target)
    if target.is_file():
        return [target]
    if (target / MANIFEST_NAME).is_file():
        return [target / MANIFEST_NAME]
    found = sorted(target.glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise FileNotFoundError(f"no manifest.json at {target} or in its sub-directories")
    return found
