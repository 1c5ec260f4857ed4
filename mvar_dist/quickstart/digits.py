"""The quickstart's data and its quality judge: scikit-learn's handwritten digits.

1,797 labelled 8x8 images (pixel values 0..16, 10 classes) ship inside scikit-learn, so the
quickstart needs no download. They are split train/val deterministically, upscaled to the
tokenizer's image size and written as a class-per-folder PNG image folder, which the ordinary
data_prep code shards. The judge is a classifier fitted on the real 8x8 training digits: it
scores generated images by how often it recognises the class they were generated for, and
its feature vectors give a Frechet distance (FID) between generated and real digits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mvar_dist.atomic import current_umask
from mvar_dist.evaluation.statistics import feature_statistics, frechet_distance

logger = logging.getLogger(__name__)

DIGITS_SIDE = 8
DIGITS_MAX_VALUE = 16.0  # sklearn's digits are counts of 0..16 pixels on in a 4x4 block
NUM_CLASSES = 10
SPLITS = ("train", "val")
_FOLDER_RECORD = "digits.json"


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 8, 8) float in 0..16 and labels (N,) int, for each split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def load_digits_split(val_size: int = 300, seed: int = 0) -> DigitsSplit:
    """sklearn's digits split train/val, stratified by class; the same seed gives the same split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    if not NUM_CLASSES <= val_size <= len(digits.target) - NUM_CLASSES:
        raise ValueError(f"val_size must be in {NUM_CLASSES}..{len(digits.target) - NUM_CLASSES}, got {val_size}")
    train_x, val_x, train_y, val_y = train_test_split(
        digits.images, digits.target, test_size=val_size, stratify=digits.target, random_state=seed
    )
    return DigitsSplit(train_x.astype(np.float32), train_y.astype(np.int64), val_x.astype(np.float32), val_y.astype(np.int64))


def upscale_digits(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 8, 8) digits in 0..16 -> (N, image_size, image_size) uint8 grey levels, bicubic.

    Bicubic gives smooth strokes (nearest would give blocky 2x2 pixels that are trivially easy
    to tokenize); area-downsampling back to 8x8 recovers the digit closely enough for the judge.
    """
    if images.ndim != 3 or images.shape[1:] != (DIGITS_SIDE, DIGITS_SIDE):
        raise ValueError(f"expected digits of shape (N, 8, 8), got {images.shape}")
    if image_size < DIGITS_SIDE:
        raise ValueError(f"image_size must be >= {DIGITS_SIDE}, got {image_size}")
    grey = torch.from_numpy(np.asarray(images, dtype=np.float32) * (255.0 / DIGITS_MAX_VALUE))[:, None]
    if image_size != DIGITS_SIDE:
        grey = F.interpolate(grey, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return grey[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def grey_to_model_images(grey: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 3, H, W) float in [-1, 1]: grey replicated, mapped as data_prep maps
    pixels (x / 255 * 2 - 1), so these are the very inputs the shards were tokenized from."""
    x = torch.from_numpy(np.ascontiguousarray(grey)).float().div(255).mul(2).sub(1)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


# ---- the image folder ----

def write_digits_image_folder(
    root: str | Path, image_size: int = 16, val_size: int = 300, seed: int = 0, overwrite: bool = False
) -> dict[str, dict[str, int]]:
    """Write ``root/{train,val}/{0..9}/NNNNN.png`` (grey PNGs, image_size pixels square).

    Returns the image count per split and class. The folder is built under a temporary name and
    renamed into place, so an interrupted run never leaves a half-written ``root``. An existing
    ``root`` written with the same settings is kept as is; one with other settings is an error
    unless ``overwrite``.
    """
    root = Path(root)
    settings = {"image_size": int(image_size), "val_size": int(val_size), "seed": int(seed)}
    if root.exists():
        record = _read_record(root)
        if record is not None and record["settings"] == settings:
            logger.info("digits image folder %s already written with %s; reusing it", root, settings)
            return record["counts"]
        if not overwrite:
            raise FileExistsError(
                f"{root} exists and was not written by write_digits_image_folder with {settings}; "
                f"remove it or pass overwrite=True"
            )
    data = load_digits_split(val_size=val_size, seed=seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the folder is for the user's group too
    try:
        counts = {}
        for split in SPLITS:
            images, labels = data.split(split)
            counts[split] = _write_split(staging / split, upscale_digits(images, image_size), labels)
        (staging / _FOLDER_RECORD).write_text(json.dumps({"settings": settings, "counts": counts}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote digits image folder %s: %s", root, {s: sum(c.values()) for s, c in counts.items()})
    return counts


def _write_split(directory: Path, grey: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    counts = {str(c): 0 for c in range(NUM_CLASSES)}
    for c in counts:
        (directory / c).mkdir(parents=True)
    for image, label in zip(grey, labels):
        name = str(int(label))
        Image.fromarray(image, mode="L").save(directory / name / f"{counts[name]:05d}.png")
        counts[name] += 1
    return counts


def _read_record(root: Path) -> dict | None:
    try:
        return json.loads((root / _FOLDER_RECORD).read_text())
    except (OSError, ValueError):
        return None


def read_image_folder(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-per-folder split written above -> images (N, 3, H, W) in [-1, 1], labels (N,)."""
    directory = Path(directory)
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{directory} has no class folders; write it with write_digits_image_folder")
    greys, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((directory / name).glob("*.png")):
            with Image.open(file) as image:
                greys.append(np.asarray(image.convert("L")))
            labels.append(index)
    return grey_to_model_images(np.stack(greys)), torch.tensor(labels, dtype=torch.long)


# ---- the judge ----

class DigitJudge:
    """An SVM fitted on real 8x8 training digits; recognises digits in images of any size."""

    FEATURE_DIM = NUM_CLASSES * (NUM_CLASSES - 1) // 2  # 45 one-vs-one decision values

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray) -> None:
        from sklearn.svm import SVC

        # "ovo" only sets what decision_function returns (the 45 pairwise values, see features);
        # predict is libsvm's vote over those same pairwise decisions either way
        self.classifier = SVC(decision_function_shape="ovo")
        self.classifier.fit(np.asarray(train_images, dtype=np.float32).reshape(len(train_labels), -1), train_labels)

    @staticmethod
    def to_digit_features(images: torch.Tensor) -> np.ndarray:
        """Images (B, C, H, W) in [0, 1] -> (B, 64) in 0..16: channel mean, area pooling to 8x8."""
        if images.dim() != 4 or images.shape[-1] % DIGITS_SIDE or images.shape[-2] % DIGITS_SIDE:
            raise ValueError(f"expected images (B, C, H, W) with H, W multiples of 8, got {tuple(images.shape)}")
        images = images.detach().float().cpu()
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(
                f"the judge expects images in [0, 1] (what generate returns), got values in "
                f"[{float(images.min()):.3f}, {float(images.max()):.3f}]; map [-1, 1] images with (x + 1) / 2"
            )
        pooled = F.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), DIGITS_SIDE)
        return (pooled.flatten(1) * DIGITS_MAX_VALUE).numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(self.to_digit_features(images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Images (B, C, H, W) in [0, 1] -> (B, 45) float64: the judge's representation for the FID.

        The judge has no learned hidden layer of modest width to take, as a network's
        penultimate activations would be. An RBF SVM is a two-layer machine: its hidden units are
        the kernel values against its support vectors (667 of them on the default split: more
        dimensions than the 300 validation digits, so their covariance would be singular, and the
        kernel width is a private attribute), and its next layer is the 45 one-vs-one decision values
        (``decision_function`` with ``decision_function_shape="ovo"``), whose signs the final
        vote counts. Those 45 values are the last real-valued layer before the discrete output,
        trained to separate the classes: the analogue of a classifier's penultimate activations.
        (The 64 pooled pixels it reads are its input, not a representation it learned; measured
        against the real-vs-real floor, 200 real digits of only the classes 0-4 are about 4x the
        floor from the validation digits in pixels, about 20x in these decision values.)
        """
        return np.asarray(self.classifier.decision_function(self.to_digit_features(images)), dtype=np.float64)

    def accuracy(self, images: torch.Tensor, intended_labels: torch.Tensor | np.ndarray) -> float:
        """Fraction of ``images`` recognised as their intended class."""
        labels = np.asarray(torch.as_tensor(intended_labels).cpu())
        if labels.shape != (images.shape[0],):
            raise ValueError(f"need one intended label per image: {images.shape[0]} images, labels of shape {labels.shape}")
        return float((self.predict(images) == labels).mean())


@lru_cache(maxsize=4)
def default_judge(val_size: int = 300, seed: int = 0) -> DigitJudge:
    """The judge fitted on the training split of :func:`load_digits_split` (cached)."""
    data = load_digits_split(val_size=val_size, seed=seed)
    return DigitJudge(data.train_images, data.train_labels)


def judge_accuracy(images: torch.Tensor, intended_labels: torch.Tensor | np.ndarray, judge: DigitJudge | None = None) -> float:
    """How often the judge recognises ``images`` (B, C, H, W) in [0, 1] as ``intended_labels``."""
    return (judge or default_judge()).accuracy(images, intended_labels)


def real_val_accuracy(image_size: int = 16, judge: DigitJudge | None = None, val_size: int = 300, seed: int = 0) -> float:
    """The judge on real validation digits after the quickstart's own path: upscaled to
    ``image_size``, stored as uint8 grey, then pooled back to 8x8 - the bar generated samples meet."""
    data = load_digits_split(val_size=val_size, seed=seed)
    images = (grey_to_model_images(upscale_digits(data.val_images, image_size)) + 1) / 2
    return judge_accuracy(images, data.val_labels, judge or default_judge(val_size, seed))


# ---- the FID in the judge's feature space ----


def real_digit_images(split: str = "val", image_size: int = 16, val_size: int = 300, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Real digits of ``split`` after the quickstart's own path (upscaled to ``image_size``,
    stored as uint8 grey): images (N, 3, H, W) in [0, 1], labels (N,)."""
    images, labels = load_digits_split(val_size=val_size, seed=seed).split(split)
    return (grey_to_model_images(upscale_digits(images, image_size)) + 1) / 2, labels


def judge_fid(images: torch.Tensor, reference: torch.Tensor, judge: DigitJudge | None = None) -> float:
    """Frechet distance between ``images`` and ``reference`` (both (B, C, H, W) in [0, 1]) in the
    judge's feature space (:meth:`DigitJudge.features`), by the project's ``frechet_distance``."""
    judge = judge or default_judge()
    return frechet_distance(feature_statistics(judge.features(images)), feature_statistics(judge.features(reference)))


def generated_fid(images: torch.Tensor, image_size: int = 16, judge: DigitJudge | None = None,
                  val_size: int = 300, seed: int = 0) -> float:
    """The FID of generated ``images`` (B, C, H, W) in [0, 1] against the real validation digits."""
    reference, _ = real_digit_images("val", image_size, val_size, seed)
    return judge_fid(images, reference, judge or default_judge(val_size, seed))


def real_fid_floor(per_class: int, image_size: int = 16, judge: DigitJudge | None = None, draws: int = 10,
                   val_size: int = 300, seed: int = 0) -> float:
    """The FID of real digits against the real validation digits at the generated samples' size:
    ``per_class`` training digits of every class (all of a class if it has fewer), drawn without
    replacement, against the validation digits; the mean over ``draws`` seeded draws.

    Two samples of one distribution are at a positive FID that shrinks as the samples grow (the
    covariances are estimates), so this, not 0, is what "indistinguishable from real digits"
    reads as at this sample size. The training digits are the ones the judge was fitted on, and
    the ones the generator learned from."""
    if per_class < 1 or draws < 1:
        raise ValueError(f"per_class and draws must be >= 1, got {per_class} and {draws}")
    judge = judge or default_judge(val_size, seed)
    train, labels = real_digit_images("train", image_size, val_size, seed)
    val, _ = real_digit_images("val", image_size, val_size, seed)
    train_features, val_statistics = judge.features(train), feature_statistics(judge.features(val))
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(draws):
        chosen = np.concatenate([
            rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())), replace=False)
            for c in range(NUM_CLASSES)
        ])
        distances.append(frechet_distance(feature_statistics(train_features[chosen]), val_statistics))
    return float(np.mean(distances))
