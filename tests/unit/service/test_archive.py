"""service.archive: entry files, quota with oldest-first deletion, failures counted not raised, queue and close."""

import errno
import json
import os
import threading

import cv2
import numpy as np
import pytest

from service import archive as archive_mod
from service.archive import MASK_BGR, RejectArchive, entry_stem, part_overlay, render_overlay
from service.records import Verdict
from service.roi import extract
from service.sim.synth import Pose, render_part

H, W = 400, 600
T0 = 1_790_000_000.0  # a fixed unix time so names are predictable


def frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((H, W), 90, np.uint8)
    img[100:300, 150:450] = rng.integers(120, 200, size=(200, 300), dtype=np.uint8)
    return img


def maps():
    yy, xx = np.mgrid[0:H, 0:W]
    sal = np.exp(-(((yy - 200) / 40.0) ** 2 + ((xx - 300) / 60.0) ** 2)).astype(np.float32)
    mask = sal > 0.5
    return sal, mask


def reject(part: int = 1234, frame_id: int = 56) -> Verdict:
    return Verdict(part_id=part, frame_id=frame_id, reject_dirt=True, reject_scratch=True, score_dirt=0.91,
                   reason="dirt on slice(s) [2]", extra={"slices": [{"class": "dirt", "p": np.float32(0.91)}]})


def files(root):
    return sorted(p.name for p in root.iterdir())


def test_write_creates_frame_overlay_and_sidecar(tmp_path):
    """A rejected part gives <stem>.png (the exact frame), <stem>_overlay.png (cropped around the slice outlines,
    downscaled) and <stem>.json (with the crop)."""
    arch = RejectArchive(tmp_path, 10**8, overlay_max_side=300, start=False)
    sal, mask = maps()
    outline = np.array([[150, 100], [450, 100], [450, 300], [150, 300]])
    assert arch.write(frame(), reject(), saliency=sal, mask=mask, outlines=[outline], meta={"model": "abc"},
                      timestamp=T0)
    stem = entry_stem(reject(), T0)
    assert stem.endswith("_p1234_f56_reject-dirt-scratch") and stem.startswith("20260921T")
    assert files(tmp_path) == [stem + ".json", stem + ".png", stem + "_overlay.png"]
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / (stem + ".png")), cv2.IMREAD_UNCHANGED), frame())
    overlay = cv2.imread(str(tmp_path / (stem + "_overlay.png")))
    assert overlay.shape == (225, 300, 3)  # the 300x200 outline + 0.25 x 200 px on every side, 401x301 -> 300 wide
    side = json.loads((tmp_path / (stem + ".json")).read_text())
    assert side["label"] == "reject" and side["defects"] == ["dirt", "scratch"] and side["part_id"] == 1234
    assert side["verdict"]["score_dirt"] == 0.91 and side["verdict"]["extra"]["slices"][0]["p"] == pytest.approx(0.91)
    assert side["files"] == {"frame": stem + ".png", "overlay": stem + "_overlay.png"} and side["meta"]["model"] == "abc"
    assert side["overlay_box"] == [100, 50, 501, 351] and side["frame_shape"] == [H, W]
    st = arch.stats()
    assert st["written"] == 1 and st["entries"] == 1 and st["used_bytes"] == sum(p.stat().st_size
                                                                                  for p in tmp_path.iterdir())


def test_overlay_colours_saliency_and_draws_mask_contours():
    """Zero saliency stays gray, high saliency is coloured, and the mask's outline is drawn in magenta."""
    sal, mask = maps()
    out = render_overlay(frame(), sal, mask, max_side=W)
    assert out.shape == (H, W, 3)
    corner = out[:40, :40].reshape(-1, 3)
    assert (corner[:, 0] == corner[:, 1]).all() and (corner[:, 1] == corner[:, 2]).all()
    centre = out[200, 300].astype(int)
    assert centre[2] - centre[0] > 50  # JET at 1.0 is red
    assert (out == np.array(MASK_BGR, np.uint8)).all(axis=2).sum() > 100
    with pytest.raises(ValueError, match="frame coordinates"):
        render_overlay(frame(), sal[:10], None)
    small = render_overlay(np.zeros((2048, 2448), np.uint8), None, np.zeros((2048, 2448), bool), max_side=1224)
    assert small.shape == (1024, 1224, 3)


def test_labels_filter_what_is_archived(tmp_path):
    """Accepted parts are skipped by default; not_inspected ones are archived; the set is configurable."""
    arch = RejectArchive(tmp_path, 10**8, start=False)
    assert not arch.submit(frame(), Verdict(part_id=1, accept=True))
    assert arch.submit(frame(), Verdict.make_not_inspected(2, "7 of 8 slices inspected"))
    assert arch.stats()["skipped"] == 1 and arch.stats()["queued"] == 1
    assert arch.close()
    assert [n for n in files(tmp_path) if n.endswith(".json")][0].endswith("_p2_f0_not_inspected.json")
    assert RejectArchive(tmp_path, 10**8, start=False).stats()["entries"] == 1  # 3 files, one entry on re-scan
    only_accept = RejectArchive(tmp_path / "acc", 10**8, labels=["accept"], start=False)
    assert only_accept.wants(Verdict(part_id=1, accept=True)) and not only_accept.wants(reject())


def test_quota_deletes_oldest_entries_first(tmp_path):
    """Over the quota, whole entries are deleted oldest first (by time in the name), also ones from earlier runs."""
    probe = RejectArchive(tmp_path / "probe", 10**8, start=False)
    assert probe.write(frame(), reject(), timestamp=T0)
    size = probe.stats()["used_bytes"]

    root = tmp_path / "arch"
    arch = RejectArchive(root, int(size * 2.5), start=False)
    for i in range(3):
        assert arch.write(frame(), reject(part=i), timestamp=T0 + i)
    # 3 entries do not fit in 2.5: part 0 went first
    assert [s.split("_")[1] for s in arch.entries()] == ["p1", "p2"]
    assert arch.stats()["deleted"] == 1 and arch.stats()["used_bytes"] <= arch.quota_bytes
    (root / "notes.txt").write_text("not ours")

    again = RejectArchive(root, int(size * 2.5), start=False)  # a restart indexes what is on disk
    assert again.stats()["entries"] == 2
    assert again.write(frame(), reject(part=9), timestamp=T0 + 10)
    assert [s.split("_")[1] for s in again.entries()] == ["p2", "p9"]
    assert not any("_p0_" in n or "_p1_" in n for n in files(root))
    assert "notes.txt" in files(root)
    assert len(files(root)) == 2 * 3 + 1


def test_entry_larger_than_quota_is_refused(tmp_path):
    """An entry that alone exceeds the quota is not written (False, counted) and deletes nothing."""
    arch = RejectArchive(tmp_path, 1000, start=False)
    assert not arch.write(frame(), reject(), timestamp=T0)
    assert arch.stats()["write_errors"] == 1 and files(tmp_path) == []


def test_read_only_directory_is_counted_not_raised(tmp_path, monkeypatch):
    """Writing into a read-only directory returns False, counts a write error and leaves nothing behind."""
    ro = tmp_path / "ro"
    ro.mkdir()
    arch = RejectArchive(ro, 10**8, start=False)
    ro.chmod(0o555)
    try:
        probe_ok = os.access(ro, os.W_OK)
        if probe_ok:  # running as root: permissions do not stop us, so make open() fail as a read-only fs would
            def ro_open(*a, **k):
                raise OSError(errno.EROFS, "Read-only file system", str(a[0]))
            monkeypatch.setattr(archive_mod, "open", ro_open, raising=False)
        assert arch.write(frame(), reject(), timestamp=T0) is False
    finally:
        ro.chmod(0o755)
    assert arch.stats()["write_errors"] == 1 and arch.stats()["written"] == 0
    assert files(ro) == []


def test_disk_full_midway_removes_partial_files(tmp_path, monkeypatch):
    """ENOSPC on the second file of an entry is counted, returns False and removes the first file too."""
    arch = RejectArchive(tmp_path, 10**8, start=False)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(archive_mod.os, "replace", replace)
    assert arch.write(frame(), reject(), timestamp=T0) is False
    assert files(tmp_path) == [] and arch.stats()["write_errors"] == 1 and arch.stats()["entries"] == 0


def test_unusable_root_and_bad_input_never_raise(tmp_path):
    """A root that cannot be created and a frame that is no image are logged and counted, not raised."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    arch = RejectArchive(blocker / "archive", 10**8, start=False)
    assert arch.write(frame(), reject()) is False
    assert arch.write(None, reject()) is False
    assert arch.submit(None, reject()) is False
    assert arch.stats()["write_errors"] == 3


def test_overlay_failure_still_archives_frame_and_sidecar(tmp_path):
    """A saliency of the wrong size loses only the overlay; the frame and the sidecar (saying why) are written."""
    arch = RejectArchive(tmp_path, 10**8, start=False)
    assert arch.write(frame(), reject(), saliency=np.zeros((10, 10), np.float32), timestamp=T0)
    names = files(tmp_path)
    assert len(names) == 2 and not any("overlay" in n for n in names)
    side = json.loads((tmp_path / [n for n in names if n.endswith(".json")][0]).read_text())
    assert "frame coordinates" in side["overlay_error"] and "overlay" not in side["files"]


def test_full_queue_drops_are_counted_and_close_flushes(tmp_path):
    """With the writer not running, submits beyond the queue size are dropped (counted); close() writes the rest."""
    arch = RejectArchive(tmp_path, 10**8, queue_size=2, start=False)
    results = [arch.submit(frame(i), reject(part=i)) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert arch.stats()["dropped"] == 3 and arch.stats()["pending"] == 2
    assert arch.close()
    st = arch.stats()
    assert st["written"] == 2 and st["pending"] == 0 and st["entries"] == 2
    assert not arch.submit(frame(), reject()) and arch.stats()["dropped"] == 4


def test_background_writer_does_not_block_and_close_flushes(tmp_path, monkeypatch):
    """submit() returns while the writer is busy; close() waits until every queued part is on disk."""
    gate = threading.Event()
    real_write = RejectArchive._write

    def slow_write(self, *a, **k):
        gate.wait(10)
        return real_write(self, *a, **k)

    monkeypatch.setattr(RejectArchive, "_write", slow_write)
    arch = RejectArchive(tmp_path, 10**8, queue_size=8)
    img = frame()
    assert all(arch.submit(img, reject(part=i)) for i in range(4))
    img[:] = 0  # submit copied the frame: the caller may reuse its buffer
    assert arch.stats()["written"] == 0
    assert not arch.flush(timeout=0.05)
    gate.set()
    assert arch.close(timeout=20)
    assert arch.stats()["written"] == 4
    pngs = [n for n in files(tmp_path) if n.endswith("f56_reject-dirt-scratch.png")]
    assert len(pngs) == 4
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / pngs[0]), cv2.IMREAD_UNCHANGED), frame())


def test_close_out_of_time_drops_the_queue_and_never_leaves_the_writer_running(tmp_path, monkeypatch):
    """close() that runs out of time drops what is still queued (counted) and returns with the writer stopped."""
    arch = RejectArchive(tmp_path, 10**8, queue_size=16)
    started, release = threading.Event(), threading.Event()
    real_write = arch.write

    def slow_write(*args, **kwargs):
        started.set()
        release.wait(5.0)  # the encode in progress when close() gives up
        return real_write(*args, **kwargs)

    monkeypatch.setattr(arch, "write", slow_write)
    for i in range(6):
        assert arch.submit(frame(i), reject(part=i), timestamp=T0 + i)
    assert started.wait(5.0)
    threading.Timer(0.3, release.set).start()  # the current write finishes within close()'s grace
    assert arch.close(timeout=0.1, grace=5.0) is False
    st = arch.stats()
    assert not arch._thread.is_alive()
    assert st["pending"] == 0 and st["written"] == 1 and st["dropped"] == 5, st


class _Pred:
    """The part of a Prediction the overlay reads."""

    def __init__(self, saliency: np.ndarray) -> None:
        self.saliency = saliency


@pytest.fixture(scope="module")
def inspected():
    """A synthetic 2448x2048 frame with a rotated valve, its SliceBatch, a saliency hot spot and a mask on slice 5."""
    img, _, _ = render_part(np.random.default_rng([9, 1]), "dirt", pose=Pose(1180.4, 1010.7, 772.0, 386.0, 3.2))
    batch = extract(img)
    sal = np.zeros((8, 192, 192), np.float32)
    sal[5, 40:150, 40:150] = 1.0
    masks = np.zeros((8, 192, 192), bool)
    masks[5, 70:120, 70:120] = True
    return img, {"batch": batch, "pred": _Pred(sal), "masks": masks}


def test_part_overlay_is_cropped_to_the_valve_roi(inspected):
    """The overlay of an inspected part shows the valve's box (not the whole frame), with the hot slice coloured
    and its mask outlined where the slice lies; the full frame stays untouched."""
    img, extras = inspected
    before = img.copy()
    out, box = part_overlay(img, reject(), extras, max_side=4096)
    x0, y0, x1, y1 = box
    assert box == extras["batch"].bounding_box(archive_mod.ROI_MARGIN)
    assert out.shape == (y1 - y0, x1 - x0, 3) and out.shape[1] < img.shape[1] / 2
    np.testing.assert_array_equal(img, before)
    centre = extras["batch"].slice_polygons()[5].mean(axis=0) - (x0, y0)
    b, g, r = out[int(centre[1]), int(centre[0])].astype(int)
    assert r - b > 50 or g - b > 50  # JET, not gray
    assert (out == np.array(MASK_BGR, np.uint8)).all(axis=2).sum() > 50
    whole, none = part_overlay(img, Verdict.make_no_part(1, "no_valve"), None, max_side=1224)
    assert none is None and whole.shape == (1024, 1224, 3)


def test_archive_draws_the_roi_overlay_from_the_inspection_records(tmp_path, inspected):
    """submit(..., extras=...) keeps the full frame as it is and writes the ROI-cropped overlay, drawn on the
    writer's thread from the batch, prediction and masks."""
    img, extras = inspected
    with RejectArchive(tmp_path, 10**9, overlay_max_side=4096) as arch:
        assert arch.submit(img, reject(), extras=extras, copy=False, timestamp=T0)
    stem = entry_stem(reject(), T0)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / (stem + ".png")), cv2.IMREAD_UNCHANGED), img)
    side = json.loads((tmp_path / (stem + ".json")).read_text())
    x0, y0, x1, y1 = side["overlay_box"]
    assert cv2.imread(str(tmp_path / (stem + "_overlay.png"))).shape == (y1 - y0, x1 - x0, 3)


def test_accept_every_keeps_a_sample_of_accepted_parts(tmp_path):
    """accept_every = 3 archives the 3rd, 6th, ... accepted part (marked kept: accept_every) beside the saved
    verdicts; 0 keeps none."""
    with RejectArchive(tmp_path, 10**9, accept_every=3) as arch:
        assert arch.wants(Verdict(part_id=0, accept=True))
        queued = [arch.submit(frame(), Verdict(part_id=i, frame_id=i, accept=True), timestamp=T0 + i)
                  for i in range(1, 8)]
        assert arch.submit(frame(), reject(99), timestamp=T0 + 99)
    assert queued == [False, False, True, False, False, True, False]
    sides = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert [(s["part_id"], s["label"], s["meta"]["kept"]) for s in sides] == [
        (3, "accept", "accept_every"), (6, "accept", "accept_every"), (99, "reject", "save")]
    none = RejectArchive(tmp_path / "none", 10**9, start=False)
    assert not none.wants(Verdict(part_id=1, accept=True))
    with pytest.raises(ValueError, match="accept_every"):
        RejectArchive(tmp_path, 10**9, accept_every=-1, start=False)
