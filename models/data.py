"""Datasets on disk -> samples -> tensors: formats, class order, resizing, augmentation, splits.

The ``folders`` format (the only one so far; others plug in through :func:`register_format`)::

    ROOT/<class>/<image>.png|.jpg|.jpeg|.bmp|.tif|.tiff     one subfolder per class
    ROOT/<class>/<image>_mask.png                          optional mask beside its image

A file whose name ends in ``_mask.png`` is never an image. A mask belongs to the image with the
same stem (``a.jpg`` -> ``a_mask.png``); any non-zero pixel is foreground. Masks are never used
to train: they only score segmentation in evaluation. Hidden entries (``.name``) are ignored and
so are files directly under ROOT.

Groups (for grouped splits): the part of an image's stem before the first ``__`` when there is
one (``frame0007__s3.png`` -> ``frame0007``, so all slices of one camera frame stay on one side
of a split, whatever their class), else ``<class>/<stem>`` (every image its own group).

Class order: the names in :data:`models.ira_cnn.DEFAULT_CLASSES` (good, dirt, scratch, ec) keep
that order, any other names follow sorted. Evaluation maps the data's class names onto the
model's classes by name (:func:`remap_classes`).

Resizing: every image is brought to the model's square input S x S by :func:`to_input_size`, the
single place that decides it. Today that is a plain resize with ``cv2.INTER_AREA`` (the aspect
ratio is not kept; the valve slices are square already) and ``cv2.INTER_NEAREST`` for masks.
A letterbox policy for non-square datasets belongs there.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from models.ira_cnn import DEFAULT_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"


class DataError(ValueError):
    """A problem with the user's data (missing folder, empty class, unreadable file, ...)."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Args:
        path: the image file.
        label: index into the owning :class:`SampleSet`'s ``classes``.
        mask: the ground-truth defect mask file, or None.
        group: samples with the same group stay on the same side of a split.
    """

    path: Path
    label: int
    mask: Path | None = None
    group: str = ""


@dataclass(frozen=True)
class SampleSet:
    """A loaded dataset: where it came from, its class names (label order) and its samples."""

    root: Path
    format: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def counts(self, samples: Sequence[Sample] | None = None) -> dict[str, int]:
        """Images per class name (every class listed, zeros included)."""
        c = Counter(s.label for s in (self.samples if samples is None else samples))
        return {name: int(c.get(i, 0)) for i, name in enumerate(self.classes)}

    def subset(self, samples: Sequence[Sample]) -> SampleSet:
        return replace(self, samples=tuple(samples))

    def relpath(self, sample: Sample) -> str:
        for path, root in ((sample.path, self.root), (sample.path.resolve(), Path(self.root).resolve())):
            try:  # the second try: one of them was reached through a symbolic link
                return path.relative_to(root).as_posix()
            except ValueError:
                pass
        return str(sample.path)


# ---------------------------------------------------------------------------------------------
# class order and mapping


def order_classes(names: Sequence[str]) -> tuple[str, ...]:
    """DEFAULT_CLASSES names first in that order, every other name after them, sorted."""
    names = set(names)
    known = [c for c in DEFAULT_CLASSES if c in names]
    return tuple(known + sorted(names - set(known)))


def remap_classes(data: SampleSet, classes: Sequence[str]) -> SampleSet:
    """Relabel ``data`` so that labels index ``classes`` (e.g. a trained model's), by class name.

    The data may hold fewer classes than ``classes``; a class the target does not know is an error.
    """
    classes = tuple(classes)
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise DataError(
            f"the data at {data.root} has class(es) {', '.join(map(repr, unknown))} that the model does not "
            f"know (its classes: {', '.join(classes)}): remove or rename those folders, or use a model "
            "trained with those classes")
    index = [classes.index(c) for c in data.classes]
    samples = tuple(replace(s, label=index[s.label]) for s in data.samples)
    return SampleSet(root=data.root, format=data.format, classes=classes, samples=samples)


# ---------------------------------------------------------------------------------------------
# formats

Loader = Callable[[Path], SampleSet]
FORMATS: dict[str, Loader] = {}


def register_format(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``load_samples(root, name)`` use this loader (``root`` -> SampleSet)."""

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


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return (path.is_file() and not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            and not name.endswith(MASK_SUFFIX))


def mask_for(image: Path) -> Path | None:
    m = image.with_name(image.stem + MASK_SUFFIX)
    return m if m.is_file() else None


def group_of(class_name: str, stem: str) -> str:
    return stem.split("__", 1)[0] if "__" in stem else f"{class_name}/{stem}"


@register_format("folders")
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


# ---------------------------------------------------------------------------------------------
# pixels


#: how train, evaluate (and whoever feeds the exported graph) bring an image to S x S; recorded in runs
INPUT_POLICY = "letterbox"


def to_input_size(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """The input policy: (H, W) -> (size, size) by :func:`models.real_data.letterbox`: the long side
    becomes S (aspect kept), centred, padded with 0. Images use INTER_AREA, masks INTER_NEAREST.

    A square image is a plain resize; an image already size x size is returned as is.
    """
    if image.shape[:2] == (size, size):
        return image
    return models.real_data.letterbox(image, size, mask=mask)  # bound by the import at the end


def _imread_gray(path: Path) -> np.ndarray | None:
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)  # also works for non-ASCII paths, unlike imread
    except OSError:
        return None
    if buf.size == 0:
        return None
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def read_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file -> (size, size) uint8 gray (OpenCV, IMREAD_GRAYSCALE), resized by the policy."""
    img = _imread_gray(Path(path))
    if img is None:
        raise DataError(f"cannot read image {path}: the file is missing, empty or not an image; "
                        "replace or remove it")
    if img.dtype != np.uint8:  # IMREAD_GRAYSCALE gives 8 bits already; be safe for odd decoders
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img if size is None else to_input_size(img, size)


def read_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """A mask file -> (size, size) bool, foreground where the pixel is non-zero (INTER_NEAREST)."""
    m = _imread_gray(Path(path))
    if m is None:
        raise DataError(f"cannot read mask {path}: the file is missing, empty or not an image; "
                        "replace or remove it")
    m = m > 0
    if size is not None:
        m = to_input_size(m.astype(np.uint8), size, mask=True) > 0
    return m


# ---------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random flips and a small brightness/contrast jitter.

    Per image: horizontal flip with p=0.5, vertical flip with p=0.5, then
    ``x' = (x - mean(x)) * c + mean(x) + b`` with ``c ~ U(1 - contrast, 1 + contrast)`` and
    ``b ~ U(-brightness, brightness)`` gray levels, rounded and clipped to 0..255.
    """

    hflip: bool = True
    vflip: bool = True
    brightness: float = 10.0
    contrast: float = 0.1

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            img = img[::-1, :]
        if self.brightness > 0 or self.contrast > 0:
            c = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            f = img.astype(np.float32)
            mean = float(f.mean())
            img = np.clip(np.rint((f - mean) * c + mean + b), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)

    def to_dict(self) -> dict:
        return {"hflip": self.hflip, "vflip": self.vflip, "brightness": self.brightness,
                "contrast": self.contrast}


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


import models.real_data  # noqa: E402,F401  -- registers the kolektorsdd and magnetic-tile formats
