"""valve-model build-dataset: frames -> the 'folders' dataset, with and without a manifest."""

import json
import shutil

import cv2
import numpy as np
import pytest

from models.build_dataset import main
from service.roi import extract
from service.sim.synth import Pose, render_part, write_dataset


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames")
    rows = write_dataset(out, 6, seed=8, mix="good=1,dirt=1,scratch=1,ec=1")
    return out, rows


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []


def test_labelled_frames_become_class_folders_with_masks(frames, tmp_path, capsys):
    """With a manifest, each slice lands in its label's folder as the ROI cut it, dirt/scratch slices with a
    0/255 mask, and the counts per class are printed."""
    src, rows = frames
    out = tmp_path / "ds"
    assert main(["--frames", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = {c: sum(lab == c for r in rows for lab in r["slice_labels"]) for c in ("good", "dirt", "scratch", "ec")}
    for cls, n in expected.items():
        files = [f for f in _pngs(out / cls) if not f.endswith("_mask.png")]
        assert len(files) == n, cls
        if n:
            assert f"{cls}={n}" in printed
    for r in rows:
        stem = r["file"].split("/")[1][:-4]
        batch = extract(cv2.imread(str(src / r["file"]), cv2.IMREAD_UNCHANGED))
        for k, label in enumerate(r["slice_labels"]):
            sl = cv2.imread(str(out / label / f"{stem}__s{k}.png"), cv2.IMREAD_UNCHANGED)
            assert sl.shape == (192, 192) and sl.dtype == np.uint8
            np.testing.assert_array_equal(sl, batch.slices[k, 0])
            mask_path = out / label / f"{stem}__s{k}_mask.png"
            assert mask_path.exists() == (label in ("dirt", "scratch"))
            if mask_path.exists():
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                assert set(np.unique(mask).tolist()) <= {0, 255}
                assert (mask > 0).sum() == r["slice_defect_px"][k]
    index = [json.loads(x) for x in (out / "slices.jsonl").read_text().splitlines()]
    assert len(index) == 8 * len(rows) and {i["seed"] for i in index} == {8}
    assert (out / "skipped.jsonl").read_text() == ""


def test_unlabelled_frames_and_rejected_frames_are_reported_not_fatal(frames, tmp_path, capsys):
    """Without a manifest the slices go to unlabelled/; blank, clipped, non-Mono8 and unreadable frames are
    listed in skipped.jsonl with a reason instead of crashing."""
    src, rows = frames
    plain = tmp_path / "plain"
    plain.mkdir()
    for r in rows[:2]:
        shutil.copy(src / r["file"], plain / r["file"].split("/")[1])
    cv2.imwrite(str(plain / "blank.png"), np.full((2048, 2448), 10, np.uint8))
    clipped, _, _ = render_part(np.random.default_rng(1), "good", pose=Pose(150.0, 1000.0, 770.0, 385.0, 0.0))
    cv2.imwrite(str(plain / "clipped.png"), clipped)
    cv2.imwrite(str(plain / "colour.png"), np.zeros((64, 64, 3), np.uint8))
    (plain / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "ds"
    assert main(["--frames", str(plain), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(_pngs(out / "unlabelled")) == 16 and "unlabelled=16" in printed
    skipped = {json.loads(x)["file"].split("/")[-1]: json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()}
    assert {k: v["reason"] for k, v in skipped.items()} == {
        "blank.png": "no_valve", "clipped.png": "valve_clipped", "colour.png": "not_mono8", "broken.png": "unreadable"}
    assert all(v["message"] for v in skipped.values())
    assert "skipped 4 frames" in printed


def test_all_frames_skipped_exits_1_and_bad_folders_exit_2(tmp_path, capsys):
    """Only rejected frames: exit 1 with skipped.jsonl written; a missing or empty folder, or an occupied --out: exit 2."""
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "blank.png"), np.zeros((2048, 2448), np.uint8))
    out = tmp_path / "out"
    assert main(["--frames", str(src), "--out", str(out)]) == 1
    assert json.loads((out / "skipped.jsonl").read_text())["reason"] == "no_valve"
    assert main(["--frames", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--frames", str(tmp_path / "empty"), "--out", str(tmp_path / "o3")]) == 2
    assert "no frames" in capsys.readouterr().err
    assert main(["--frames", str(src), "--out", str(out), "--overwrite"]) == 1


def test_other_roi_threshold_keeps_labels_consistent_with_masks(frames, tmp_path):
    """Under another --roi-threshold the dirt/scratch labels are recomputed from the masks, so every written
    defect slice's mask still covers at least min_defect_px pixels and the output can be rebuilt with --overwrite."""
    src, rows = frames
    out = tmp_path / "ds"
    assert main(["--frames", str(src), "--out", str(out), "--roi-threshold", "28"]) == 0
    assert main(["--frames", str(src), "--out", str(out), "--roi-threshold", "28"]) == 2
    assert main(["--frames", str(src), "--out", str(out), "--roi-threshold", "55", "--overwrite"]) == 0
    min_px = rows[0]["min_defect_px"]
    for cls in ("dirt", "scratch"):
        for name in _pngs(out / cls):
            if name.endswith("_mask.png"):
                assert (cv2.imread(str(out / cls / name), cv2.IMREAD_UNCHANGED) > 0).sum() >= min_px
    index = [json.loads(x) for x in (out / "slices.jsonl").read_text().splitlines()]
    for i in index:
        if i["defect_px"] is not None and i["label"] == "good":
            assert i["defect_px"] < min_px


def test_output_loads_as_folders_dataset_grouped_by_frame(frames, tmp_path):
    """models.data reads the output as the 'folders' format: the 4 classes, masks attached to dirt/scratch
    slices, and all 8 slices of a frame in one group (so a grouped split cannot leak a part)."""
    data = pytest.importorskip("models.data")
    src, rows = frames
    out = tmp_path / "ds"
    assert main(["--frames", str(src), "--out", str(out)]) == 0
    samples = data.load_samples(out)
    assert samples.classes == ("good", "dirt", "scratch", "ec")
    assert len(samples.samples) == 8 * len(rows)
    for s in samples.samples:
        assert s.group == s.path.name.split("__")[0]
        assert (s.mask is not None) == (samples.classes[s.label] in ("dirt", "scratch"))
    assert {s.group for s in samples.samples} == {r["file"].split("/")[1][:-4] for r in rows}
