"""The kolektorsdd and magnetic-tile formats on the real files, their seeded grouped splits, split
folders, the run-overlap check and the letterbox input policy."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

import models.real_data as rd
from models.data import FORMATS, load_samples
from models.errors import DataError
from models.images import letterbox, letterbox_geometry, read_mask, to_input_size, unletterbox
from tests.helpers import REPO_ROOT

DATASETS = Path(os.environ.get("VALVE_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
KOLEKTOR = DATASETS / "kolektorsdd"
MTILE = DATASETS / "magnetic-tile"
SEEDS = range(25)

needs_data = pytest.mark.skipif(not (KOLEKTOR.is_dir() and MTILE.is_dir()),
                                reason=f"the public datasets are not at {DATASETS} (set VALVE_DATASETS)")


@pytest.fixture(scope="module")
def kolektor():
    return load_samples(KOLEKTOR, "kolektorsdd")


@pytest.fixture(scope="module")
def mtile():
    return load_samples(MTILE, "magnetic-tile")


def _rel(data, samples):
    return [data.relpath(s) for s in samples]


def _fake_kolektor(root: Path, folders=("kos01", "kos02", "kos26"), parts=4) -> Path:
    """A tiny KolektorSDD-like tree: PartK.jpg + PartK_label.png, Part0 defective in every folder."""
    for f in folders:
        d = root / f
        d.mkdir(parents=True)
        for k in range(parts):
            cv2.imwrite(str(d / f"Part{k}.jpg"), np.full((40, 16), 100, np.uint8))
            m = np.zeros((40, 16), np.uint8)
            if k == 0:
                m[10:20, 4:8] = 255
            cv2.imwrite(str(d / f"Part{k}_label.png"), m)
    return root


# ---------------------------------------------------------------------------------------------
# formats on the real files


def test_formats_are_registered():
    """models.data's format table lists the two datasets and their -train / -test parts."""
    for name in ("kolektorsdd", "magnetic-tile"):
        for suffix in ("", "-train", "-test"):
            assert name + suffix in FORMATS


@needs_data
def test_kolektorsdd_counts_labels_masks_and_groups(kolektor):
    """KolektorSDD has 399 images, 52 defective (non-empty label mask), every image a mask, 48 groups."""
    assert kolektor.classes == ("good", "defect")
    assert len(kolektor) == 399
    assert kolektor.counts() == rd.EXPECTED_COUNTS["kolektorsdd"] == {"good": 347, "defect": 52}
    assert all(s.mask is not None and s.mask.name == s.path.stem + "_label.png" for s in kolektor.samples)
    for s in kolektor.samples[::40]:
        assert read_mask(s.mask).any() == (s.label == 1)
    groups = Counter(s.group for s in kolektor.samples)
    assert len(groups) == 48
    assert groups["kos01+kos26"] == 16 and groups["kos27+kos34"] == 16
    assert not any(g in groups for g in ("kos01", "kos26", "kos27", "kos34"))


@needs_data
def test_magnetic_tile_counts_classes_and_empty_uneven_masks(mtile):
    """Magnetic-tile has the README's per-class counts; the 4 MT_Uneven images with empty masks get no mask."""
    assert mtile.classes == ("good", "blowhole", "break", "crack", "fray", "uneven")
    assert len(mtile) == 1344
    assert mtile.counts() == rd.EXPECTED_COUNTS["magnetic-tile"]
    no_mask = sorted(s.path.name for s in mtile.samples if s.mask is None)
    assert no_mask == ["exp3_num_45042.jpg", "exp4_num_124690.jpg", "exp4_num_352527.jpg", "exp4_num_45057.jpg"]
    assert all(mtile.classes[s.label] == "uneven" for s in mtile.samples if s.mask is None)
    assert len({s.group for s in mtile.samples}) == 1344  # every image its own group


def test_wrong_root_errors_name_the_expected_layout(tmp_path):
    """A folder without the dataset's layout is refused with a message naming the layout."""
    (tmp_path / "good").mkdir()
    with pytest.raises(DataError, match="kosNN"):
        load_samples(tmp_path, "kolektorsdd")
    with pytest.raises(DataError, match="MT_Blowhole"):
        load_samples(tmp_path, "magnetic-tile")
    (tmp_path / "MT_Free").mkdir()
    with pytest.raises(DataError, match="missing MT_Blowhole"):
        load_samples(tmp_path, "magnetic-tile")


def test_missing_kolektor_label_is_an_error(tmp_path):
    """A KolektorSDD image without its PartK_label.png is refused, naming the file."""
    root = _fake_kolektor(tmp_path / "k")
    (root / "kos02" / "Part1_label.png").unlink()
    with pytest.raises(DataError, match="Part1_label.png"):
        load_samples(root, "kolektorsdd")


# ---------------------------------------------------------------------------------------------
# splits


@needs_data
@pytest.mark.parametrize("name", ["kolektorsdd", "magnetic-tile"])
def test_splits_are_disjoint_grouped_stratified_for_every_seed(name, kolektor, mtile):
    """For every seed: train and test partition the data, no group straddles, each class is near 40 % train."""
    data = kolektor if name == "kolektorsdd" else mtile
    for seed in SEEDS:
        train, test = rd.paper_split(data, seed)
        a, b = set(_rel(data, train)), set(_rel(data, test))
        assert not a & b and len(a | b) == len(data)
        assert not {s.group for s in train} & {s.group for s in test}
        tr = data.counts(train)
        for cls, n in data.counts().items():
            target = int(np.floor(0.4 * n + 0.5))
            assert abs(tr[cls] - target) <= (2 if name == "kolektorsdd" else 0), (seed, cls, tr[cls], target)
        if name == "kolektorsdd":  # the identical parts stay together
            sides = {s.path.parent.name: s in train for s in data.samples}
            assert sides["kos01"] == sides["kos26"] and sides["kos27"] == sides["kos34"]


@needs_data
def test_split_is_deterministic_and_independent_of_sample_order(kolektor):
    """The same seed gives the same files, whatever the order of the samples; another seed gives others."""
    train, test = rd.paper_split(kolektor, 3)
    again, _ = rd.paper_split(kolektor, 3)
    assert _rel(kolektor, train) == _rel(kolektor, again)
    shuffled = list(kolektor.samples)
    random.Random(0).shuffle(shuffled)
    train_s, _ = rd.paper_split(kolektor.subset(shuffled), 3)
    assert set(_rel(kolektor, train_s)) == set(_rel(kolektor, train))
    other, _ = rd.paper_split(kolektor, 4)
    assert set(_rel(kolektor, other)) != set(_rel(kolektor, train))


@needs_data
def test_train_and_test_formats_are_the_default_split(kolektor):
    """`kolektorsdd-train` / `-test` on the dataset root are the seed-0, ratio-0.4 split, with the full classes."""
    train, test = rd.paper_split(kolektor, rd.DEFAULT_SPLIT_SEED, rd.DEFAULT_TRAIN_RATIO)
    tr = load_samples(KOLEKTOR, "kolektorsdd-train")
    te = load_samples(KOLEKTOR, "kolektorsdd-test")
    assert tr.format == "kolektorsdd-train" and te.classes == ("good", "defect")
    assert _rel(tr, tr.samples) == _rel(kolektor, train)
    assert _rel(te, te.samples) == _rel(kolektor, test)
    assert tr.root == KOLEKTOR  # relative paths in split.json / predictions.csv are kosNN/PartK.jpg


@needs_data
def test_split_folder_selects_seed_and_ratio_for_train_and_evaluate(tmp_path, mtile, capsys):
    """A split folder written by `split --out` makes -train and -test load exactly that seed's files."""
    out = tmp_path / "mt-s7"
    assert rd.main(["split", "--dataset", "magnetic-tile", "--data", str(MTILE), "--split-seed", "7",
                    "--train-ratio", "0.5", "--out", str(out)]) == 0
    expected = sum(int(np.floor(0.5 * n + 0.5)) for n in mtile.counts().values())
    assert f"train {expected:5d} images" in capsys.readouterr().out
    manifest = json.loads((out / rd.MANIFEST_NAME).read_text())
    train, test = rd.paper_split(mtile, 7, 0.5)
    assert manifest["train"] == _rel(mtile, train) and manifest["test"] == _rel(mtile, test)
    assert _rel(mtile, load_samples(out, "magnetic-tile-train").samples) == manifest["train"]
    assert _rel(mtile, load_samples(out, "magnetic-tile-test").samples) == manifest["test"]
    with pytest.raises(DataError, match="split of 'magnetic-tile'"):
        load_samples(out, "kolektorsdd-test")
    manifest["train"], manifest["test"] = manifest["train"][1:], [manifest["train"][0], *manifest["test"]]
    (out / rd.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists other files"):
        load_samples(out, "magnetic-tile-test")


def test_split_out_inside_the_dataset_is_refused(tmp_path, capsys):
    """`split --out` never writes into the (read-only) dataset folder."""
    root = _fake_kolektor(tmp_path / "k", folders=("kos01", "kos02", "kos03", "kos04", "kos05"))
    assert rd.main(["split", "--dataset", "kolektorsdd", "--data", str(root), "--out", str(root / "s")]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert not (root / "s").exists()


def test_bad_ratio_and_empty_class_side_are_errors(tmp_path):
    """A ratio outside (0, 1), or one that leaves a class without images on a side, is refused."""
    data = load_samples(_fake_kolektor(tmp_path / "k"), "kolektorsdd")
    with pytest.raises(DataError, match="between 0 and 1"):
        rd.paper_split(data, 0, 1.0)
    with pytest.raises(DataError, match="leaves no image of class"):
        rd.paper_split(data, 0, 0.05)


@needs_data
def test_check_run_finds_groups_a_run_trained_on(tmp_path, kolektor, capsys):
    """check-run passes a run trained on the train part, and flags one that saw kos26 when kos01 is in test."""
    seed = next(k for k in SEEDS if any(s.group == "kos01+kos26" for s in rd.paper_split(kolektor, k)[1]))
    train, _ = rd.paper_split(kolektor, seed)
    split_dir = tmp_path / "split"
    assert rd.main(["split", "--dataset", "kolektorsdd", "--data", str(KOLEKTOR), "--split-seed", str(seed),
                    "--out", str(split_dir)]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"train": _rel(kolektor, train), "val": []}))
    args = ["check-run", "--run", str(run), "--format", "kolektorsdd-test", "--data", str(split_dir)]
    assert rd.main(args) == 0
    (run / "split.json").write_text(json.dumps({"train": _rel(kolektor, train), "val": ["kos26/Part3.jpg"]}))
    capsys.readouterr()
    assert rd.main(args) == 1
    assert "trained or validated on 1 group(s) of this test set: kos01+kos26" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# input policy


def test_letterbox_keeps_aspect_pads_with_zero_and_maps_back():
    """A tall image keeps its aspect, centred on 0 padding; unletterbox returns to the original frame."""
    img = np.full((1263, 500), 200, np.uint8)
    box = letterbox_geometry(1263, 500, 96)
    assert (box.inner_height, box.inner_width, box.top, box.left) == (96, 38, 0, 29)
    out = letterbox(img, 96)
    assert out.shape == (96, 96) and out.dtype == np.uint8
    assert (out[box.valid()] == 200).all() and (out[~box.valid()] == 0).all()
    back = unletterbox(out, 1263, 500)
    assert back.shape == (1263, 500) and (back == 200).all()


def test_letterbox_of_square_is_the_plain_resize_policy():
    """For square images the letterbox equals the plain resize policy (to_input_size); S x S comes back as is."""
    img = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    np.testing.assert_array_equal(letterbox(img, 96), to_input_size(img, 96))
    small = img[:96, :96]
    assert letterbox(small, 96) is small


def test_letterbox_round_trip_of_a_blob_mask():
    """A compact mask on a tall frame comes back from letterbox -> unletterbox (nearest) with IoU > 0.9."""
    m = np.zeros((1263, 500), np.uint8)
    cv2.circle(m, (300, 800), 90, 1, -1)
    lb = letterbox(m > 0, 192, mask=True)
    assert lb.dtype == bool and lb.shape == (192, 192)
    back = unletterbox(lb, 1263, 500, mask=True)
    assert back.shape == (1263, 500) and back.dtype == bool
    assert (back & (m > 0)).sum() / (back | (m > 0)).sum() > 0.9


@needs_data
def test_letterbox_round_trip_of_real_masks(kolektor, mtile):
    """Real masks round-trip exactly at scale 1 and keep foreground at 192 (every KolektorSDD defect)."""
    for data in (kolektor, mtile):
        for s in [s for s in data.samples if s.label != 0 and s.mask is not None][:6]:
            m = read_mask(s.mask)
            side = max(m.shape)
            np.testing.assert_array_equal(unletterbox(letterbox(m, side, mask=True), *m.shape, mask=True), m)
            img = cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE)
            assert img.shape == m.shape and letterbox(img, 192).shape == (192, 192)
    for s in kolektor.samples:
        if s.label == 1:
            assert letterbox(read_mask(s.mask), 192, mask=True).any(), s.path
