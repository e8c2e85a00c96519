"""valve-model build-dataset: frames -> the 'folders' dataset, with and without a manifest."""

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.build_dataset import main
from service.roi import extract
from service.sim.synth import Pose, render_part, write_dataset
from tests.helpers import REPO_ROOT
from tests.helpers.daemon_fixtures import (
    LinePlc,
    clean_env,
    daemon_config,
    running_daemon,
    wait_until,
)


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


def test_novel_slices_go_to_novel_and_training_refuses_them(tmp_path, capsys):
    """Novel parts' defect slices land in OUT/novel/ with their masks (never in a class folder), slices.jsonl
    carries the subtype, and valve-model train refuses the dataset while it holds novel/."""
    from models.errors import DataError
    from models.train import TrainConfig, train

    src = tmp_path / "frames"
    rows = write_dataset(src, 3, seed=12, mix="novel=1")
    out = tmp_path / "ds"
    assert main(["--frames", str(src), "--out", str(out)]) == 0
    assert f"novel slices in {out / 'novel'}" in capsys.readouterr().out
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["good", "novel"]
    for r in rows:
        stem = r["file"].split("/")[1][:-4]
        for k, label in enumerate(r["slice_labels"]):
            assert label in ("good", "novel") and (out / label / f"{stem}__s{k}.png").is_file()
            mask = out / "novel" / f"{stem}__s{k}_mask.png"
            assert mask.is_file() == (label == "novel")
            if label == "novel":
                assert (cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0).sum() == r["slice_defect_px"][k]
    index = [json.loads(x) for x in (out / "slices.jsonl").read_text().splitlines()]
    assert {i["subtype"] for i in index} == {"dent", "stain", "chip"} and {i["part_class"] for i in index} == {"novel"}
    assert sum(i["label"] == "novel" for i in index) == sum(r["slice_labels"].count("novel") for r in rows) >= 3
    with pytest.raises(DataError, match=r"'novel' folder: novel-defect slices .* never train a model; move .*novel"):
        train(TrainConfig(data=out, out=tmp_path / "run", epochs=1, input_size=48, threads=1))
    assert not (tmp_path / "run").exists()


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


# ------------------------------------------------------------------------------ the retraining loop


def _train_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "models.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=clean_env(OMP_NUM_THREADS="1"), timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _run_line(work: Path, frames: Path, model: str, archive: Path, parts: range) -> dict:
    """The daemon on the pylon emulator replaying ``frames`` and a real snap7 PLC (the test's LinePlc) for
    ``parts``, archiving rejects, NotInspected and every accepted part; returns its model_loaded event."""
    work.mkdir(parents=True, exist_ok=True)
    with LinePlc() as plc:
        plc.set_enable(True)
        cfg = daemon_config(work / "cfg.toml", images=frames, plc_port=plc.port, model=model, archive_dir=archive,
                            archive={"save": ["reject", "not_inspected"], "accept_every": 1})
        with running_daemon(cfg, work) as d:
            for pid in parts:
                assert plc.run_part(pid, timeout=15.0) is not None, f"no result for part {pid}\n{d.tail()}"
            # The archive writes on its own thread: wait for every part's entry before stopping.
            wait_until(lambda: len(list(archive.glob("*.json"))) >= len(parts), 30.0, step=0.1)
            loaded = d.wait_event("model_loaded", 1.0)
            d.terminate()
    return loaded


def test_retraining_loop_from_the_daemons_archive(tmp_path):
    """collect (the daemon archives rejects and accept_every accepted parts of synthetic frames replayed by the
    pylon emulator) -> build-dataset --archive (the daemon's verdicts as provisional labels, labels.csv) ->
    review (the engineer corrects labels to the ground truth, excludes one slice) -> --apply-labels -> train
    (1 epoch) -> evaluate -> export -> deploy (the daemon runs the new model) -> roll back (the old one again)."""
    rows = write_dataset(tmp_path / "line", 8, seed=31, mix="good=1,dirt=1,scratch=1,ec=1")
    by_pixels = {hashlib.sha256(cv2.imread(str(tmp_path / "line" / r["file"]), cv2.IMREAD_UNCHANGED).tobytes())
                 .hexdigest(): r for r in rows}
    archive = tmp_path / "archive"

    # 1. collect: 8 parts, one after the other, with the shipped model ("" in [model] path).
    before = _run_line(tmp_path / "collect", tmp_path / "line" / "frames", "", archive, range(1, 9))
    sides = [json.loads(p.read_text()) for p in sorted(archive.glob("*.json"))]
    assert len(sides) == 8 and {s["label"] for s in sides} <= {"accept", "reject", "not_inspected"}
    assert all(s["meta"]["kept"] == ("accept_every" if s["label"] == "accept" else "save") for s in sides)

    # 2. the dataset with provisional labels
    ds = tmp_path / "ds"
    assert main(["--archive", str(archive), "--out", str(ds)]) == 0
    with open(ds / "labels.csv", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    inspected = [s for s in sides if s["label"] in ("accept", "reject")]
    assert len(table) == 8 * 8 and inspected
    for r in table:
        assert (ds / r["file"]).is_file() and r["label"] == r["provisional"]
        side = next(s for s in sides if s["files"]["frame"] == r["entry"] + ".png")
        assert (int(r["part_id"]), r["verdict"]) == (side["part_id"], side["label"])
        if side["label"] == "reject":
            sl = side["verdict"]["extra"]["slices"][int(r["slice"])]
            assert r["provisional"] == (sl["class"] if sl["rejects"] else "good"), (r, sl)
        elif side["label"] == "accept":
            assert r["provisional"] == "good"
        else:
            assert r["provisional"] == "" and r["file"].startswith(".unlabelled/")

    # 3. review: the engineer sets each slice's label to what it really shows (here: the synthetic ground
    #    truth, found by the frame's pixels) and excludes one slice.
    changed = 0
    for r in table:
        frame = cv2.imread(str(archive / (r["entry"] + ".png")), cv2.IMREAD_UNCHANGED)
        truth = by_pixels[hashlib.sha256(frame.tobytes()).hexdigest()]["slice_labels"][int(r["slice"])]
        changed += r["label"] != truth
        r["label"] = truth
    table[0]["label"] = "exclude"
    with open(ds / "labels.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    assert main(["--apply-labels", str(ds)]) == 0
    with open(ds / "labels.csv", encoding="utf-8", newline="") as f:
        applied = list(csv.DictReader(f))
    assert applied[0]["file"].startswith(".excluded/") and (ds / applied[0]["file"]).is_file()
    for r in applied[1:]:
        assert r["file"] == f"{r['label']}/{Path(r['file']).name}" and (ds / r["file"]).is_file()
    assert main(["--apply-labels", str(ds)]) == 0  # idempotent
    print(f"review changed {changed} of {len(table)} provisional labels")

    # 4. train 1 epoch, evaluate, export (192 px: the runtime's contract)
    run = tmp_path / "run"
    _train_cli("train", "--data", str(ds), "--format", "folders", "--preset", "compact", "--epochs", "1",
               "--seed", "0", "--batch-size", "16", "--threads", "1", "--out", str(run))
    _train_cli("evaluate", "--run", str(run), "--data", str(ds), "--format", "folders", "--threads", "1",
               "--out", str(run / "report"))
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["classification"]["accuracy"] <= 1.0
    new_model = tmp_path / "models" / "r1" / "model.onnx"
    _train_cli("export", "--run", str(run), "--out", str(new_model))
    assert new_model.with_suffix(".json").is_file()

    # 5. deploy: the daemon loads the new model (same checks as on the line) and inspects with it
    deployed = _run_line(tmp_path / "deploy", tmp_path / "line" / "frames", str(new_model), tmp_path / "a2",
                         range(101, 103))
    assert deployed["sha256"] == hashlib.sha256(new_model.read_bytes()).hexdigest() != before["sha256"]
    # 6. roll back: the previous model again
    rolled = _run_line(tmp_path / "rollback", tmp_path / "line" / "frames", "", tmp_path / "a3", range(201, 202))
    assert rolled["sha256"] == before["sha256"]


def test_apply_labels_refuses_bad_labels_and_needs_a_labels_file(tmp_path, capsys):
    """--apply-labels without labels.csv, or with a label that is not a class name, exits 2 naming the line;
    --out is required with --archive."""
    assert main(["--apply-labels", str(tmp_path)]) == 2
    assert "labels.csv does not exist" in capsys.readouterr().err
    (tmp_path / "good").mkdir()
    cv2.imwrite(str(tmp_path / "good" / "a__s0.png"), np.zeros((192, 192), np.uint8))
    (tmp_path / "labels.csv").write_text("file,provisional,label\ngood/a__s0.png,good,Dirt spot\n")
    assert main(["--apply-labels", str(tmp_path)]) == 2
    assert "line 2 has 'Dirt spot'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--archive", str(tmp_path)])
    assert exc.value.code == 2 and "--out is required" in capsys.readouterr().err
    assert main(["--archive", str(tmp_path / "good"), "--out", str(tmp_path / "ds")]) == 2
    assert "no archive entries" in capsys.readouterr().err
