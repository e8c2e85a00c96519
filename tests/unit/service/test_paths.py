"""Paths the other tests never forced: Otsu masks on worked examples (service.segment) and the daemon with
``pipeline.workers > 1`` (two workers inspecting at the same time, every PartId answered exactly once)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.app import _Job
from service.segment import masks_for, otsu_mask
from tests.helpers.daemon_doubles import FakeModel, frame, make_daemon, part_event

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------- segment


def three_level_map() -> np.ndarray:
    """10 x 10: 50 pixels at gray 0, 30 at gray 100, 20 at gray 255 (as saliency in [0, 1])."""
    u8 = np.array([0] * 50 + [100] * 30 + [255] * 20, dtype=np.uint8).reshape(10, 10)
    return u8.astype(np.float64) / 255.0


def test_otsu_mask_worked_example():
    """Otsu by hand on the three-level map. The two possible splits, between-class variance w0 w1 (mu0 - mu1)^2:

        {0} | {100, 255}:  w0 = 0.5, mu0 = 0;    w1 = 0.5, mu1 = (30*100 + 20*255) / 50 = 162
                           0.5 * 0.5 * 162^2 = 6561
        {0, 100} | {255}:  w0 = 0.8, mu0 = 30*100 / 80 = 37.5;  w1 = 0.2, mu1 = 255
                           0.8 * 0.2 * 217.5^2 = 7569   <- larger: the threshold is 100

    so the mask is the pixels above 100: exactly the 20 at 255. (The map's mean, 81, would also take the 30
    at gray 100: 50 pixels.)"""
    sal = three_level_map()
    mask = otsu_mask(sal)
    assert mask.dtype == bool and mask.shape == (10, 10)
    assert mask.sum() == 20
    assert np.array_equal(mask, np.rint(sal * 255) == 255)


def test_otsu_mask_two_levels_takes_the_bright_blob():
    """A bimodal map (a 4x4 blob at 0.8 on 0.2): any threshold between the modes separates them; the mask is
    exactly the blob."""
    sal = np.full((12, 12), 0.2)
    sal[3:7, 5:9] = 0.8
    assert np.array_equal(otsu_mask(sal), sal > 0.5)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_flat_map_gives_an_empty_mask(value):
    """No contrast, no foreground: a flat map (all zeros, as the model writes for a flat slice, or any other
    constant) gives an empty mask; OpenCV alone would put the threshold at 0 and mark every pixel of a
    non-zero flat map."""
    assert not otsu_mask(np.full((8, 8), value)).any()


def test_nan_counts_as_zero_and_shape_is_checked():
    sal = three_level_map()
    sal[0, 0] = np.nan  # one of the gray-0 pixels
    assert otsu_mask(sal).sum() == 20
    with pytest.raises(ValueError, match="one \\(H, W\\) map"):
        otsu_mask(np.zeros((2, 8, 8)))


def test_masks_for_segments_only_the_segmented_predicted_classes():
    """Per slice: Otsu where the predicted class is segmented (dirt, scratch), empty for good and ec."""
    sal = np.stack([three_level_map()] * 4)
    predicted = np.array([0, 1, 2, 3])  # good, dirt, scratch, ec
    masks = masks_for(sal, predicted, np.array([False, True, True, False]), method="otsu")
    assert masks.shape == (4, 10, 10) and masks.dtype == bool
    assert [int(m.sum()) for m in masks] == [0, 20, 20, 0]
    refined = masks_for(sal, predicted, np.array([False, True, True, False]),
                        slices=np.full((4, 1, 10, 10), 100, np.uint8))
    assert [int(m.sum()) for m in refined] == [0, 0, 0, 0]  # a flat slice has nothing that departs from it


# ------------------------------------------------------------------------------------------- workers > 1


class _TogetherModel(FakeModel):
    """The first two inferences wait for each other (a barrier): they can only finish if two workers run at
    once. Records which thread ran each inference."""

    def __init__(self, slice_classes=None) -> None:
        super().__init__(slice_classes)
        self.barrier = threading.Barrier(2)
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def run(self, slices):
        with self._lock:
            self.threads.append(threading.current_thread().name)
            first_two = len(self.threads) <= 2
        if first_two:
            self.barrier.wait(10)
        return super().run(slices)


def _run_workers(d, n: int) -> list[threading.Thread]:
    """Start the daemon's n workers as Daemon.start does (names inspect-0..n-1)."""
    threads = [threading.Thread(target=d._worker, args=(i,), name=f"inspect-{i}") for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _stop_workers(d, threads) -> None:
    for _ in threads:
        d._jobs.put(None, timeout=10.0)
    for t in threads:
        t.join(20.0)
        assert not t.is_alive()


def test_two_workers_inspect_at_once_and_every_part_gets_exactly_one_result(tmp_path, valve_image):
    """pipeline.workers = 2: both workers inspect (the first two inferences only finish together), and each
    of the 12 PartIds is published exactly once, with its own frame."""
    model = _TogetherModel(["dirt"] + ["good"] * 7)
    d = make_daemon(tmp_path, model=model, pipeline={"workers": 2, "queue_size": 16})
    assert d.settings.pipeline.workers == 2
    pids = list(range(301, 313))
    for i, pid in enumerate(pids):
        d._on_plc_event(part_event(pid))
        d._on_camera_event(frame(valve_image, pid, frame_id=1000 + i))
    threads = _run_workers(d, d.settings.pipeline.workers)
    _stop_workers(d, threads)
    by_part = d.plc.by_part()
    assert sorted(by_part) == pids
    assert all(len(v) == 1 for v in by_part.values()), by_part
    assert all(v[0].reject_dirt and v[0].frame_id == 1000 + pids.index(p) for p, v in by_part.items())
    assert set(model.threads[:2]) == {"inspect-0", "inspect-1"}, model.threads
    assert d.stats.inspected == 12 and d.book.late == 0 and len(d.book) == 0


def test_two_workers_finishing_the_same_part_publish_one_result(tmp_path, valve_image):
    """Two jobs for one PartId (a duplicated frame) inspected by both workers at the same moment: exactly one
    result is published, the other is counted late and dropped."""
    model = _TogetherModel()
    d = make_daemon(tmp_path, model=model, pipeline={"workers": 2, "queue_size": 4})
    d._on_plc_event(part_event(401))
    f = frame(valve_image, 401)
    assert d.book.frame_arrived(401, f.arrival, f.frame_id)
    d._jobs.put(_Job(f, 401))
    d._jobs.put(_Job(f, 401))
    _stop_workers(d, _run_workers(d, 2))
    assert set(model.threads) == {"inspect-0", "inspect-1"}
    assert [v.part_id for v in d.plc.published] == [401]
    assert d.stats.late_results == 1 and d.book.late == 1
