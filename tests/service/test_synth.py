"""service.sim.synth: synthetic frames, their manifest, and agreement with what service.roi cuts."""

import json
import time

import cv2
import numpy as np
import pytest

from service.roi import extract
from service.sim import synth
from service.sim.synth import CLASSES, SynthParams, class_sequence, parse_mix, render_part, write_dataset

MIX = "good=1,dirt=1,scratch=1,ec=1"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rows = write_dataset(out, 8, seed=21, mix=MIX)
    return out, rows


def _read(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_layout_frames_masks_manifest(dataset):
    """The folder holds frames/ (only the PNG frames, sorted = part order), masks/ and manifest.jsonl."""
    out, rows = dataset
    frames = sorted(p.name for p in (out / "frames").iterdir())
    assert frames == [f"part_{i:06d}.png" for i in range(8)]
    assert [r["file"] for r in rows] == [f"frames/{n}" for n in frames]
    assert [r["part"] for r in rows] == list(range(8))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    assert sorted(r["class"] for r in rows) == sorted(CLASSES * 2)
    for r in rows:
        assert r["seed"] == 21 and len(r["slice_labels"]) == 8
        assert (r["mask"] is not None) == (r["class"] in ("dirt", "scratch"))
        if r["mask"]:
            assert r["mask"] == f"masks/{r['file'].split('/')[1]}"


def test_frames_are_mono8_camera_size_and_masks_binary(dataset):
    """Every frame is a 2448 wide x 2048 high uint8 image; every mask is a full-frame 0/255 image."""
    out, rows = dataset
    for r in rows:
        frame = _read(out / r["file"])
        assert frame.shape == (2048, 2448) and frame.dtype == np.uint8
        assert frame.min() < 30 and frame.max() == 255  # dark background, overexposed specular band
        if r["mask"]:
            mask = _read(out / r["mask"])
            assert mask.shape == frame.shape and set(np.unique(mask).tolist()) <= {0, 255}
            assert (mask > 0).sum() > 0


def test_slices_agree_with_the_manifest(dataset):
    """Slicing each frame with service.roi agrees with the manifest: bbox, rotation, and per-slice labels
    that follow the mask's coverage of each slice (EC: all 8 slices, good: none)."""
    out, rows = dataset
    for r in rows:
        frame = _read(out / r["file"])
        batch = extract(frame)
        rect = batch.rect
        assert abs(rect.angle_deg - r["angle_deg"]) < 0.3
        assert abs(rect.cx - r["rect"]["cx"]) < 1.5 and abs(rect.cy - r["rect"]["cy"]) < 1.5
        corners = batch.rect.corners()
        x0, y0 = corners.min(axis=0)
        x1, y1 = corners.max(axis=0)
        bx, by, bw, bh = r["bbox"]
        assert abs(x0 - bx) < 4 and abs(y0 - by) < 4 and abs(x1 - (bx + bw)) < 4 and abs(y1 - (by + bh)) < 4
        if r["class"] == "ec":
            assert r["slice_labels"] == ["ec"] * 8
        elif r["class"] == "good":
            assert r["slice_labels"] == ["good"] * 8
        else:
            mask = _read(out / r["mask"]) > 0
            # the mask pushed through the ROI's affine by hand, independently of SliceBatch's helpers
            roi_mask = cv2.warpAffine(mask.astype(np.uint8) * 255, batch.roi_to_frame_affine, (768, 384),
                                      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) >= 128
            cover = [int(roi_mask[(k // 4) * 192:(k // 4 + 1) * 192, (k % 4) * 192:(k % 4 + 1) * 192].sum())
                     for k in range(8)]
            assert cover == r["slice_defect_px"]
            assert r["slice_labels"] == [r["class"] if c >= r["min_defect_px"] else "good" for c in cover]
            assert r["class"] in r["slice_labels"]
            assert roi_mask.sum() >= 0.97 * mask.sum()  # the defect lies on the valve, inside the ROI


def test_same_seed_gives_byte_identical_pngs(dataset, tmp_path):
    """Rendering the same seed again gives byte-identical frames, masks and manifest; another seed differs."""
    out, rows = dataset
    again = tmp_path / "again"
    assert write_dataset(again, 8, seed=21, mix=MIX) == rows
    assert (again / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    for r in rows:
        assert (again / r["file"]).read_bytes() == (out / r["file"]).read_bytes()
        if r["mask"]:
            assert (again / r["mask"]).read_bytes() == (out / r["mask"]).read_bytes()
    other = render_part(np.random.default_rng([22, 0, 0]), rows[0]["class"])[0]
    assert not np.array_equal(other, _read(out / rows[0]["file"]))


def test_defects_are_visible_but_subtle(dataset):
    """Dirt is darker than the surface around it; scratches differ only a little from their surroundings."""
    out, rows = dataset
    for r in rows:
        if r["class"] not in ("dirt", "scratch"):
            continue
        frame = _read(out / r["file"]).astype(np.float32)
        mask = _read(out / r["mask"]) > 0
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask
        inside, around = frame[mask].mean(), frame[ring].mean()
        if r["class"] == "dirt":
            assert inside < around - 5, (inside, around)
        else:
            assert 1.5 < abs(inside - around) < 0.35 * around, (inside, around)


def test_render_part_is_fast_and_returns_info():
    """A part renders well under a second, with its class, bbox and rotation in the info."""
    rng = np.random.default_rng(5)
    times = []
    for cls in CLASSES:
        t0 = time.perf_counter()
        frame, mask, info = render_part(rng, cls)
        times.append(time.perf_counter() - t0)
        assert info["class"] == cls and len(info["bbox"]) == 4 and abs(info["angle_deg"]) <= 4.0
        assert frame.shape == mask.shape == (2048, 2448)
        json.dumps(info)
    assert sorted(times)[1] < 1.0, times


def test_small_frames_and_unknown_classes_are_refused():
    """A frame too small for the valve or an unknown class is a ValueError that names the fix."""
    with pytest.raises(ValueError, match="at least"):
        SynthParams(width=640, height=480)
    with pytest.raises(ValueError, match="unknown class"):
        render_part(np.random.default_rng(0), "rust")
    frame, _, _ = render_part(np.random.default_rng(0), "good", SynthParams(width=1024, height=1040))
    assert frame.shape == (1040, 1024)


def test_mix_parsing_and_exact_class_counts():
    """--mix is parsed and normalised; each class gets round(parts * weight) parts in a seeded order."""
    mix = parse_mix("good=0.4,dirt=0.2,scratch=0.2,ec=0.2")
    assert mix == pytest.approx({"good": 0.4, "dirt": 0.2, "scratch": 0.2, "ec": 0.2})
    seq = class_sequence(10, 3, mix)
    assert {c: seq.count(c) for c in CLASSES} == {"good": 4, "dirt": 2, "scratch": 2, "ec": 2}
    assert class_sequence(10, 3, mix) == seq and class_sequence(10, 4, mix) != seq
    assert set(class_sequence(5, 0, parse_mix("dirt=1"))) == {"dirt"}
    for bad, msg in [("good=0.5,rust=0.5", "unknown class"), ("good", "class=weight"), ("good=x", "not a number"),
                     ("good=0", "at least one")]:
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)


def test_cli_writes_a_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    """`valve-inspect synth` writes the dataset, prints the counts, and exits 2 on an occupied folder or bad mix."""
    from service.cli import main as cli

    out = tmp_path / "ds"
    assert cli(["synth", "--out", str(out), "--parts", "2", "--seed", "1", "--mix", "ec=1", "--quiet"]) == 0
    assert "ec=2" in capsys.readouterr().out
    assert len(list((out / "frames").iterdir())) == 2
    assert synth.main(["--out", str(out), "--parts", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert synth.main(["--out", str(out), "--parts", "1", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["part_000000.png"]
    assert synth.main(["--out", str(tmp_path / "x"), "--parts", "1", "--mix", "rust=1"]) == 2
