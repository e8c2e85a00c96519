"""Public real datasets: the ``kolektorsdd`` and ``magnetic-tile`` formats and their seeded train/test
splits. Full guide: docs/real-data.md.

Formats (:data:`FORMATS`, which :data:`models.data.FORMATS` lists beside ``folders``; ``--data`` is the
dataset's root folder as it lies in ``../shared/datasets/``, read-only, nothing is written there):

    kolektorsdd            ROOT/kosNN/PartK.jpg + PartK_label.png. Classes good, defect:
                           defect = the label mask has a non-zero pixel. 399 images, 52 defect.
    magnetic-tile          ROOT/MT_<Class>/<name>.jpg + <name>.png. Classes good (MT_Free),
                           blowhole, break, crack, fray, uneven. 1344 images.
    <dataset>-train        the training part of the seeded split (below) of <dataset>
    <dataset>-test         its test part

Labels are image-level (all training ever sees); masks only score segmentation in evaluation.
A defect image whose mask is empty (4 in MT_Uneven) gets ``mask=None``: it is classified and
counted, but not scored for segmentation (an empty mask there is a labelling gap, not "no defect").

Groups (a group never straddles train and test): KolektorSDD groups by part folder ``kosNN``,
with ``kos01``+``kos26`` and ``kos27``+``kos34`` one group each (the same physical parts, identical
images). Magnetic-tile: every image its own group.

The split (:func:`paper_split`): the paper's train:test = 2:3, i.e. ``train_ratio`` 0.4, seed 0 by
default. Per class the training target is ``floor(train_ratio * n + 0.5)`` images. The groups are
sorted, shuffled with ``random.Random(seed)`` and, in that order, taken for training when that
brings the per-class counts closer to the targets (distance: sum over classes of
``|taken - target| / n``, exact fractions): first only groups that push no class past its target,
then, in a second pass, any group that still helps. The rest is test. With one image per group
that is exactly the target per class (Magnetic-tile); with KolektorSDD's folders (6-7 good +
1-2 defect each) it lands within 2 images of it (seeds 0-99 checked). Every class must have
images on both sides.

Choosing a split: ``<dataset>-train`` / ``<dataset>-test`` with ``--data`` the dataset root use the
default split (seed 0, ratio 0.4). For another seed or ratio, write a split folder once with
``python -m models.real_data split --dataset kolektorsdd --data ROOT --split-seed 1 --out DIR``
and pass ``--data DIR`` to both train and evaluate: DIR/split-manifest.json names the dataset,
seed, ratio and both file lists, and loading recomputes the split and refuses to go on if the
files or the rule changed. train and evaluate therefore agree exactly: same seed -> same files.
:func:`select_split` is the same split for any SampleSet, for ``--split/--split-seed/--train-ratio``
options (:func:`add_split_arguments`).

Pixels: models.images (read_image, read_mask and the input policy: letterbox to S x S, aspect kept,
for these non-square images as for every other).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import partial
from pathlib import Path

from models.errors import DataError
from models.images import INPUT_POLICY, imread_gray
from models.samples import Sample, SampleSet, order_classes

DEFAULT_SPLIT_SEED = 0
#: the paper's train:test = 2:3
DEFAULT_TRAIN_RATIO = 0.4
PARTS = ("train", "test")
MANIFEST_NAME = "split-manifest.json"
MANIFEST_FORMAT = "valve-inspect/real-split/1"

#: KolektorSDD folders that hold the same physical part (identical images): one group each
KOLEKTOR_SAME_PART = (("kos01", "kos26"), ("kos27", "kos34"))
KOLEKTOR_CLASSES = ("good", "defect")
#: Magnetic-tile folder -> class name
MAGNETIC_TILE_FOLDERS = {"MT_Free": "good", "MT_Blowhole": "blowhole", "MT_Break": "break",
                         "MT_Crack": "crack", "MT_Fray": "fray", "MT_Uneven": "uneven"}
#: per-class image counts of the published sets (../shared/datasets/README.md)
EXPECTED_COUNTS = {
    "kolektorsdd": {"good": 347, "defect": 52},
    "magnetic-tile": {"good": 952, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103},
}
SPLIT_RULE = ("per class, target floor(train_ratio * n + 0.5) training images; groups sorted, shuffled by "
              "random.Random(seed), and taken for training in that order when they bring the per-class counts "
              "closer to the targets (sum |taken - target| / n): first those that push no class past its "
              "target, then any that still help; the rest is test")


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _visible_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _mask_has_foreground(path: Path) -> bool:
    m = imread_gray(path)
    if m is None:
        raise DataError(f"cannot read mask {path}: the file is missing, empty or not an image; restore it "
                        "from the published dataset")
    return bool(m.any())


# ---------------------------------------------------------------------------------------------
# formats


def kolektor_group(folder: str) -> str:
    """``kosNN`` -> its group: the folder, or ``kos01+kos26`` / ``kos27+kos34`` for the same-part pairs."""
    for pair in KOLEKTOR_SAME_PART:
        if folder in pair:
            return "+".join(pair)
    return folder


def load_kolektorsdd(root: Path) -> SampleSet:
    """KolektorSDD (v1): ROOT/kosNN/PartK.jpg with PartK_label.png; defect = the label has a non-zero pixel."""
    root = Path(root)
    folders = [d for d in _visible_dirs(root) if re.fullmatch(r"kos\d+", d.name)]
    if not folders:
        raise DataError(f"{root} holds no kosNN folders: the 'kolektorsdd' format reads the KolektorSDD root "
                        "(kos01/ ... kos50/, each PartK.jpg + PartK_label.png), e.g. ../shared/datasets/kolektorsdd")
    samples = []
    for d in folders:
        images = sorted((p for p in d.iterdir() if re.fullmatch(r"Part\d+\.(jpg|png)", p.name, flags=re.I)),
                        key=lambda p: _natural_key(p.name))
        for img in images:
            mask = img.with_name(img.stem + "_label.png")
            if not mask.is_file():
                raise DataError(f"{img} has no label mask {mask.name} beside it: KolektorSDD needs one per image "
                                "(all zero = good); restore it from the published dataset")
            label = 1 if _mask_has_foreground(mask) else 0
            samples.append(Sample(path=img, label=label, mask=mask, group=kolektor_group(d.name)))
    if not samples:
        raise DataError(f"the kosNN folders in {root} hold no PartK.jpg images: check --data")
    return SampleSet(root=root, format="kolektorsdd", classes=KOLEKTOR_CLASSES, samples=tuple(samples))


def load_magnetic_tile(root: Path) -> SampleSet:
    """Magnetic-tile: ROOT/MT_<Class>/<name>.jpg with the mask <name>.png beside it; MT_Free = good.

    A defect image with an empty mask (4 in MT_Uneven) keeps its label but gets ``mask=None``.
    """
    root = Path(root)
    present = {d.name: d for d in _visible_dirs(root) if d.name.startswith("MT_")}
    missing = [n for n in MAGNETIC_TILE_FOLDERS if n not in present]
    unknown = sorted(set(present) - set(MAGNETIC_TILE_FOLDERS))
    if len(missing) == len(MAGNETIC_TILE_FOLDERS):
        raise DataError(f"{root} holds no MT_<Class> folders: the 'magnetic-tile' format reads the Magnetic-tile "
                        "root (MT_Blowhole/ MT_Break/ MT_Crack/ MT_Fray/ MT_Free/ MT_Uneven/), e.g. "
                        "../shared/datasets/magnetic-tile")
    if missing or unknown:
        raise DataError(f"{root} does not have the Magnetic-tile layout: missing {', '.join(missing) or '-'}, "
                        f"unknown {', '.join(unknown) or '-'}; it needs exactly "
                        f"{', '.join(MAGNETIC_TILE_FOLDERS)}")
    classes = order_classes(list(MAGNETIC_TILE_FOLDERS.values()))
    samples = []
    for folder, name in MAGNETIC_TILE_FOLDERS.items():
        d = present[folder]
        images = sorted((p for p in d.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith(".")),
                        key=lambda p: _natural_key(p.name))
        if not images:
            raise DataError(f"{d} holds no .jpg images: restore it from the published dataset")
        for img in images:
            mask: Path | None = img.with_suffix(".png")
            if not mask.is_file():
                raise DataError(f"{img} has no mask {mask.name} beside it: restore it from the published dataset")
            if name != "good" and not _mask_has_foreground(mask):
                mask = None  # a labelling gap: classified, not scored for segmentation
            samples.append(Sample(path=img, label=classes.index(name), mask=mask, group=f"{name}/{img.stem}"))
    samples.sort(key=lambda s: (s.label, _natural_key(s.path.name)))
    return SampleSet(root=root, format="magnetic-tile", classes=classes, samples=tuple(samples))


#: dataset name -> loader of the whole set
DATASETS: dict[str, Callable[[Path], SampleSet]] = {"kolektorsdd": load_kolektorsdd,
                                                   "magnetic-tile": load_magnetic_tile}


# ---------------------------------------------------------------------------------------------
# splits


def _target(train_ratio: float, n: int) -> int:
    return math.floor(train_ratio * n + 0.5)


def paper_split(data: SampleSet, seed: int = DEFAULT_SPLIT_SEED, train_ratio: float = DEFAULT_TRAIN_RATIO
                ) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of ``data``: grouped, stratified by class, seeded (module docstring).

    Deterministic: the same samples (in any order), seed and ratio give the same two lists, each in
    the data's order. Raises DataError when a class would end with no image on one side.
    """
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"--train-ratio must be between 0 and 1 (exclusive), not {train_ratio}: 0.4 is the "
                        "paper's 2:3")
    if seed < 0:
        raise DataError(f"--split-seed must be 0 or more, not {seed}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(data.samples):
        members[s.group or f"#{data.relpath(s)}"].append(i)
    n = Counter(s.label for s in data.samples)
    target = {c: _target(train_ratio, k) for c, k in n.items()}
    group_counts = {g: Counter(data.samples[i].label for i in idx) for g, idx in members.items()}

    def distance(taken: Counter) -> Fraction:
        return sum((Fraction(abs(taken[c] - target[c]), n[c]) for c in n), Fraction(0))

    order = sorted(members)
    random.Random(seed).shuffle(order)
    taken: Counter = Counter()
    train_groups = set()
    # pass 1: groups that overshoot no class's target; pass 2: any group that still brings us closer
    for overshoot in (False, True):
        for g in order:
            if g in train_groups:
                continue
            candidate = taken + group_counts[g]
            if not overshoot and any(candidate[c] > target[c] for c in candidate):
                continue
            if distance(candidate) < distance(taken):
                taken = candidate
                train_groups.add(g)
    train = [s for s in data.samples if (s.group or f"#{data.relpath(s)}") in train_groups]
    test = [s for s in data.samples if (s.group or f"#{data.relpath(s)}") not in train_groups]
    tr, te = Counter(s.label for s in train), Counter(s.label for s in test)
    empty = [f"{data.classes[c]} ({'train' if not tr[c] else 'test'})" for c in sorted(n) if not tr[c] or not te[c]]
    if empty:
        raise DataError(f"--train-ratio {train_ratio} leaves no image of class(es) {', '.join(empty)} on that side "
                        f"of the split of {data.root}: choose a ratio nearer 0.5 (the paper's is 0.4)")
    return train, test


def select_split(data: SampleSet, part: str, seed: int = DEFAULT_SPLIT_SEED,
                 train_ratio: float = DEFAULT_TRAIN_RATIO) -> SampleSet:
    """The ``train`` or ``test`` part of :func:`paper_split` as a SampleSet (``all``: ``data`` itself)."""
    if part == "all":
        return data
    if part not in PARTS:
        raise DataError(f"unknown split part {part!r}: choose train, test or all")
    train, test = paper_split(data, seed, train_ratio)
    return data.subset(train if part == "train" else test)


def split_manifest(data: SampleSet, dataset: str, seed: int = DEFAULT_SPLIT_SEED,
                   train_ratio: float = DEFAULT_TRAIN_RATIO) -> dict:
    """The split written to DIR/split-manifest.json: dataset, seed, ratio, rule, counts, groups, files."""
    train, test = paper_split(data, seed, train_ratio)
    return {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "data": str(Path(data.root).resolve()),
        "split_seed": seed,
        "train_ratio": train_ratio,
        "rule": SPLIT_RULE,
        "input_policy": INPUT_POLICY,
        "classes": list(data.classes),
        "counts": {"train": data.counts(train), "test": data.counts(test)},
        "groups": {"train": sorted({s.group for s in train}, key=_natural_key),
                   "test": sorted({s.group for s in test}, key=_natural_key)},
        "train": [data.relpath(s) for s in train],
        "test": [data.relpath(s) for s in test],
    }


def read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the split manifest {path} ({exc}): write it again with "
                        "'python -m models.real_data split'") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a split manifest ({MANIFEST_FORMAT}): write it with "
                        "'python -m models.real_data split'")
    return m


def load_part(dataset: str, part: str, root: Path) -> SampleSet:
    """The ``<dataset>-train`` / ``<dataset>-test`` formats: ``root`` is the dataset (default split) or a
    split folder holding split-manifest.json (its seed and ratio, checked against its file lists)."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        m = read_manifest(manifest_path)
        if m.get("dataset") != dataset:
            raise DataError(f"{manifest_path} is a split of {m.get('dataset')!r}, not {dataset!r}: use "
                            f"--format {m.get('dataset')}-{part}, or the split folder of {dataset}")
        data_root = Path(m["data"])
        if not data_root.is_absolute():
            data_root = (root / data_root).resolve()
        if not data_root.is_dir():
            raise DataError(f"{manifest_path} points at the dataset {data_root}, which is not a folder: move the "
                            "dataset back or write the split again with 'python -m models.real_data split'")
        full = DATASETS[dataset](data_root)
        seed, ratio = int(m["split_seed"]), float(m["train_ratio"])
        fresh = split_manifest(full, dataset, seed, ratio)
        if (fresh["train"], fresh["test"]) != (m.get("train"), m.get("test")):
            raise DataError(f"the split recomputed from {data_root} (seed {seed}, train ratio {ratio}) lists other "
                            f"files than {manifest_path}: the dataset or the split rule changed. Restore the "
                            "dataset, or write a new split folder (and retrain: old runs used the old split)")
    else:
        full = DATASETS[dataset](root)
        seed, ratio = DEFAULT_SPLIT_SEED, DEFAULT_TRAIN_RATIO
    chosen = select_split(full, part, seed, ratio)
    return SampleSet(root=full.root, format=f"{dataset}-{part}", classes=full.classes, samples=chosen.samples)


#: the formats of this module by name: each dataset, and its ``-train`` / ``-test`` parts (models.data.FORMATS
#: lists them beside ``folders``)
FORMATS: dict[str, Callable[[Path], SampleSet]] = {
    **DATASETS, **{f"{name}-{part}": partial(load_part, name, part) for name in DATASETS for part in PARTS}}


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--split {train,test,all}``, ``--split-seed S``, ``--train-ratio R`` (for :func:`select_split`)."""
    parser.add_argument("--split", choices=("train", "test", "all"), default="all",
                        help="which part of the seeded train/test split to use (default all)")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help=f"seed of the train/test split (default {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--train-ratio", type=float, default=DEFAULT_TRAIN_RATIO,
                        help=f"training share per class (default {DEFAULT_TRAIN_RATIO}: the paper's 2:3)")


def run_overlap(run_dir: Path, dataset: str, test: SampleSet) -> list[str]:
    """The groups of ``test`` that the run in ``run_dir`` trained or validated on; [] when there are none.

    The run's images are its split.json (train and val, paths relative to the dataset root); they are
    mapped to groups through the whole dataset, so ``kos26`` in training and ``kos01`` in test count.
    """
    path = Path(run_dir) / "split.json"
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}): pass a run directory written by 'valve-model train'") from None
    seen = set(split.get("train", [])) | set(split.get("val", []))
    full = DATASETS[dataset](test.root)
    trained = {s.group for s in full.samples if full.relpath(s) in seen}
    return sorted(trained & {s.group for s in test.samples}, key=_natural_key)


# ---------------------------------------------------------------------------------------------
# command line: python -m models.real_data split|check-run


def _summary(m: dict) -> str:
    lines = [f"{m['dataset']} at {m['data']}: split seed {m['split_seed']}, train ratio {m['train_ratio']}"]
    for part in PARTS:
        c = m["counts"][part]
        lines.append(f"  {part:5s} {sum(c.values()):5d} images in {len(m['groups'][part]):4d} groups: "
                     + ", ".join(f"{k} {v}" for k, v in c.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.real_data",
                                description="Train/test splits of the public datasets (docs/real-data.md).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="show a split; with --out write a split folder for --data of train/evaluate")
    s.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    s.add_argument("--data", required=True, help="the dataset root, e.g. ../shared/datasets/kolektorsdd")
    s.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help=f"default {DEFAULT_SPLIT_SEED}")
    s.add_argument("--train-ratio", type=float, default=DEFAULT_TRAIN_RATIO,
                   help=f"training share per class (default {DEFAULT_TRAIN_RATIO}: the paper's 2:3)")
    s.add_argument("--out", help="split folder to write (DIR/split-manifest.json); never inside the dataset")
    c = sub.add_parser("check-run", help="check that a run never trained on images (groups) of a test set")
    c.add_argument("--run", required=True, help="run directory written by 'valve-model train'")
    c.add_argument("--format", required=True, choices=[f"{d}-test" for d in DATASETS])
    c.add_argument("--data", required=True, help="the dataset root or split folder given to evaluate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "split":
            data = DATASETS[args.dataset](Path(args.data))
            m = split_manifest(data, args.dataset, args.split_seed, args.train_ratio)
            print(_summary(m))
            if args.out:
                out = Path(args.out)
                if out.resolve().is_relative_to(Path(m["data"])):
                    raise DataError(f"--out {out} is inside the dataset {m['data']}: the datasets are read-only; "
                                    "write the split folder elsewhere (e.g. splits/)")
                path = out / MANIFEST_NAME
                if path.is_file() and read_manifest(path) != m:
                    raise DataError(f"{path} already holds another split: choose another --out (runs trained "
                                    "on that split depend on it)")
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(m, indent=2) + "\n")
                print(f"wrote {path}: pass --data {out} with --format {args.dataset}-train / -test")
            return 0
        dataset = args.format.rsplit("-", 1)[0]
        test = load_part(dataset, "test", Path(args.data))
        overlap = run_overlap(Path(args.run), dataset, test)
        if overlap:
            print(f"{args.run} trained or validated on {len(overlap)} group(s) of this test set: "
                  + ", ".join(overlap[:10]) + (" ..." if len(overlap) > 10 else "")
                  + ". Evaluate it on the test part of the split it was trained on", file=sys.stderr)
            return 1
        print(f"{args.run}: no training or validation group in the test set ({len(test)} images)")
        return 0
    except DataError as exc:
        print(f"python -m models.real_data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
