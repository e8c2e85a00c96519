"""Datasets on disk -> samples -> tensors: the formats, the ``folders`` format, augmentation, splits.

Formats (:data:`FORMATS`, one explicit table): ``folders`` (below) and the public datasets of
models.real_data (``kolektorsdd``, ``magnetic-tile`` and their ``-train`` / ``-test`` parts);
:func:`register_format` adds another loader under a name. ``load_samples(root, name)`` reads a
dataset's index (models.samples: Sample, SampleSet, the class order); the pixels are read by
models.images (read_image, read_mask and the input policy, letterbox).

The ``folders`` format::

    ROOT/<class>/<image>.png|.jpg|.jpeg|.bmp|.tif|.tiff     one subfolder per class
    ROOT/<class>/<image>_mask.png                          optional mask beside its image

A file whose name ends in ``_mask.png`` is never an image. A mask belongs to the image with the
same stem (``a.jpg`` -> ``a_mask.png``); any non-zero pixel is foreground. Masks are never used
to train: they only score segmentation in evaluation. Hidden entries (``.name``) are ignored and
so are files directly under ROOT.

Groups (for grouped splits): the part of an image's stem before the first ``__`` when there is
one (``frame0007__s3.png`` -> ``frame0007``, so all slices of one camera frame stay on one side
of a split, whatever their class), else ``<class>/<stem>`` (every image its own group).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from models import real_data
from models.errors import DataError
from models.images import read_image
from models.samples import Sample, SampleSet, order_classes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"


# ---------------------------------------------------------------------------------------------
# formats


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return (path.is_file() and not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            and not name.endswith(MASK_SUFFIX))


def mask_for(image: Path) -> Path | None:
    m = image.with_name(image.stem + MASK_SUFFIX)
    return m if m.is_file() else None


def group_of(class_name: str, stem: str) -> str:
    return stem.split("__", 1)[0] if "__" in stem else f"{class_name}/{stem}"


def load_folders(root: Path) -> SampleSet:
    """ROOT/<class>/<image> with optional ``<stem>_mask.png`` beside each image."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{root} has no class subfolders: the 'folders' format is {root}/<class>/<image>.png "
            "(e.g. good/, dirt/, scratch/, ec/)")
    files: dict[str, list[Path]] = {}
    for d in class_dirs:
        images = sorted(p for p in d.iterdir() if is_image_file(p))
        if not images:
            raise DataError(
                f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}; *{MASK_SUFFIX} are masks): "
                "add images or remove the folder")
        files[d.name] = images
    classes = order_classes(list(files))
    samples = [Sample(path=p, label=classes.index(name), mask=mask_for(p), group=group_of(name, p.stem))
               for name in classes for p in files[name]]
    return SampleSet(root=root, format="folders", classes=classes, samples=tuple(samples))


Loader = Callable[[Path], SampleSet]

#: every dataset format by name: ``load_samples(root, name)`` calls ``FORMATS[name](root)``;
#: models.real_data's table holds the public datasets' formats
FORMATS: dict[str, Loader] = {"folders": load_folders, **real_data.FORMATS}


def register_format(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``load_samples(root, name)`` use this loader (``root`` -> SampleSet); a plug-in's."""

    def deco(fn: Loader) -> Loader:
        FORMATS[name] = fn
        return fn

    return deco


def load_samples(root: str | Path, fmt: str = "folders") -> SampleSet:
    """Read a dataset's index (file names, labels, masks; no pixels) in the given format."""
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}: choose one of {', '.join(sorted(FORMATS))}")
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist: check --data")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: --data takes the dataset's root folder")
    return FORMATS[fmt](root)


# ---------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random flips and a small brightness/contrast jitter.

    Per image: horizontal flip with p=0.5, vertical flip with p=0.5, with ``rot90`` a transpose with p=0.5 (so
    the eight symmetries of the square, every 90-degree rotation included, come equally often: for textures with
    no preferred direction; off by default, a valve's slices have one), then
    ``x' = (x - mean(x)) * c + mean(x) + b`` with ``c ~ U(1 - contrast, 1 + contrast)`` and
    ``b ~ U(-brightness, brightness)`` gray levels, rounded and clipped to 0..255.
    """

    hflip: bool = True
    vflip: bool = True
    brightness: float = 10.0
    contrast: float = 0.1
    rot90: bool = False

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            img = img[::-1, :]
        if self.rot90 and rng.random() < 0.5:  # drawn only when on: the draws of a run without it are unchanged
            img = img.T
        if self.brightness > 0 or self.contrast > 0:
            c = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            f = img.astype(np.float32)
            mean = float(f.mean())
            img = np.clip(np.rint((f - mean) * c + mean + b), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)

    def to_dict(self) -> dict:
        return {"hflip": self.hflip, "vflip": self.vflip, "brightness": self.brightness,
                "contrast": self.contrast,
                "rot90": self.rot90}


class ImageDataset(Dataset):
    """Samples -> (uint8 tensor (1, S, S), label).

    Args:
        samples: the images.
        size: S, the model's input side (see :func:`to_input_size`).
        augment: training augmentation, or None.
        seed: with :meth:`set_epoch`, seeds the augmentation: image i in epoch e always gets the
            same random draw (from ``(seed, epoch, i)``), whatever the worker count or a resume.
        preload: decode every image once, now (errors surface before training starts); else
            read lazily in ``__getitem__``.
    """

    def __init__(self, samples: Sequence[Sample], size: int, augment: Augment | None = None,
                 seed: int = 0, preload: bool = True) -> None:
        self.samples = list(samples)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.images: list[np.ndarray] | None = None
        if preload:
            self.images = [read_image(s.path, size) for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        img = self.images[i] if self.images is not None else read_image(s.path, self.size)
        if self.augment is not None:
            img = self.augment(img, np.random.default_rng([self.seed, self.epoch, i]))
        return torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0), s.label


# ---------------------------------------------------------------------------------------------
# splits


def stratified_split(labels: Sequence[int], fraction: float, seed: int,
                     groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Indices (kept, held_out): about ``fraction`` of each class held out, seeded.

    Per class, ``round(fraction * n)`` samples are held out, but at least one when fraction > 0
    and the class has two or more samples, and never all of them. With ``groups`` whole groups go
    to one side: each group counts for the rarest class (in the whole data) among its samples (ties:
    the lower label) and groups are drawn until that class's quota is reached, so the fractions are
    approximate.
    Returns two sorted index lists.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must be in [0, 1), not {fraction}")
    labels = [int(v) for v in labels]
    if groups is None:
        groups = [str(i) for i in range(len(labels))]
    if len(groups) != len(labels):
        raise ValueError("labels and groups differ in length")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    frequency = Counter(labels)
    for g in sorted(members):
        # a group counts for the rarest class it holds (ties: the lower label): a part with a few defect
        # slices among many good ones is a defect group, so defect groups are spread over both sides
        present = {labels[i] for i in members[g]}
        by_class[min(present, key=lambda k: (frequency[k], k))].append(g)
    rng = random.Random(seed)
    held: list[int] = []
    for cls in sorted(by_class):
        gs = by_class[cls]
        rng.shuffle(gs)
        n = sum(len(members[g]) for g in gs)
        target = round(fraction * n)
        if fraction > 0 and n >= 2:
            target = max(1, target)
        taken = 0
        for g in gs[:-1]:  # the last group always stays on the kept side
            if taken >= target:
                break
            held.extend(members[g])
            taken += len(members[g])
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held_set)


def split_samples(data: SampleSet, fraction: float, seed: int, grouped: bool = True
                  ) -> tuple[list[Sample], list[Sample]]:
    """(kept, held_out) samples: train/val or train/test by ``fraction``, stratified by class."""
    groups = [s.group for s in data.samples] if grouped else None
    keep, held = stratified_split(data.labels, fraction, seed, groups)
    return [data.samples[i] for i in keep], [data.samples[i] for i in held]

