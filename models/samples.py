"""A dataset's index, no pixels: :class:`Sample` (an image file, its label, mask and group), :class:`SampleSet`
(where it came from, its class names, its samples), and the class order every loader uses.

Class order: the names in :data:`models.ira_cnn.DEFAULT_CLASSES` (good, dirt, scratch, ec) keep
that order, any other names follow sorted. Evaluation maps the data's class names onto the
model's classes by name (:func:`remap_classes`).

The loaders that make these (the formats) are in models.data (the registry and ``folders``) and
models.real_data (KolektorSDD, Magnetic-tile); both import this module, neither imports the other
back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from models.errors import DataError
from models.ira_cnn import DEFAULT_CLASSES


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
