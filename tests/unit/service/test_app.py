"""service.parts and service.app: PartBook's exactly-once bookkeeping, and the Daemon's wiring with test
doubles for the PLC link, the camera and the model (tests/helpers/daemon_doubles.py; the real ROI, decide
and metrics run). The daemon as a whole, with the real camera emulator and a real Snap7 server, is in
tests/integration/test_daemon_e2e.py and test_daemon_faults.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import structlog

from service.app import Daemon
from service.camera import GrabFailure
from service.errors import CameraRemoved, GrabFailed, GrabTimeout
from service.parts import PartBook
from service.plc import PlcEvent, PlcLinkConfig
from service.records import Frame, Verdict
from service.roi import RoiParams
from tests.helpers.daemon_doubles import (
    FakeCamera,
    FakeModel,
    dark,
    drain_worker,
    frame,
    make_daemon,
    make_settings,
    part_event,
    parts_metric,
    write_toml,
)

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------------------------------- PartBook


def test_partbook_claims_each_part_exactly_once_and_counts_late_claims():
    """claim() hands out an announced part once; a second claim (or one for an unknown part) is None and counted late."""
    book = PartBook(timeout_s=2.0)
    assert book.announce(5, at=100.0)
    p = book.claim(5)
    assert p is not None and p.part_id == 5 and p.announced == 100.0
    assert book.claim(5) is None and book.claim(6) is None
    assert book.late == 2 and len(book) == 0


def test_partbook_refuses_a_duplicate_announcement():
    """Announcing an open PartId again returns False, keeps the first announcement and counts the duplicate."""
    book = PartBook(timeout_s=2.0)
    assert book.announce(1, at=10.0)
    assert not book.announce(1, at=11.0)
    assert book.duplicates == 1 and len(book) == 1
    assert book.claim(1).announced == 10.0


def test_partbook_counts_every_duplicate_announcement():
    """Each further announcement of an open PartId adds one to ``duplicates`` (3 repeats -> 3)."""
    book = PartBook(timeout_s=2.0)
    book.announce(1, at=10.0)
    for t in (11.0, 12.0, 13.0):
        assert not book.announce(1, at=t)
    assert book.duplicates == 3


def test_partbook_deadline_runs_from_announcement_then_extends_with_the_frame():
    """A part expires timeout_s after its announcement unless its frame came, which gives timeout_s more from the frame."""
    book = PartBook(timeout_s=2.0)
    book.announce(1, at=0.0)
    book.announce(2, at=0.0)
    assert book.frame_arrived(2, arrival=1.5, frame_id=42)
    assert book.expired(now=1.99) == []
    first = book.expired(now=2.0)
    assert [p.part_id for p in first] == [1] and first[0].arrival is None
    assert book.expired(now=3.4) == []
    second = book.expired(now=3.5)
    assert [(p.part_id, p.frame_id, p.arrival) for p in second] == [(2, 42, 1.5)]
    assert len(book) == 0


def test_partbook_takes_one_frame_per_open_part_only():
    """frame_arrived() is accepted once per open part; a second frame or a frame for an unknown part is refused."""
    book = PartBook(timeout_s=2.0)
    book.announce(1, at=0.0)
    assert book.frame_arrived(1, arrival=0.1, frame_id=1)
    assert not book.frame_arrived(1, arrival=0.2, frame_id=2)
    assert not book.frame_arrived(9, arrival=0.2, frame_id=3)
    assert book.claim(1).frame_id == 1


def test_partbook_oldest_without_frame_pairs_frames_in_announcement_order():
    """For the hardware trigger, frames go to the oldest announced part still without one."""
    book = PartBook(timeout_s=2.0)
    assert book.oldest_without_frame() is None
    for pid in (7, 8, 9):
        book.announce(pid, at=0.0)
    assert book.oldest_without_frame() == 7
    book.frame_arrived(7, 0.1, 1)
    assert book.oldest_without_frame() == 8
    book.claim(8)
    assert book.oldest_without_frame() == 9


def test_partbook_drain_returns_and_forgets_every_open_part():
    """drain() hands out every open part in announcement order and leaves the book empty."""
    book = PartBook(timeout_s=2.0)
    for pid in (3, 1, 2):
        book.announce(pid, at=0.0)
    assert [p.part_id for p in book.drain()] == [3, 1, 2]
    assert len(book) == 0 and book.drain() == []


# ------------------------------------------------------------------------------------------- settings


def test_roi_and_plc_link_config_follow_the_settings(tmp_path):
    """RoiParams.from_settings maps [roi] (grid from the sizes) and PlcLinkConfig.from_settings maps [plc] (ms -> s)."""
    s = make_settings(tmp_path, roi={"roi_width": 768, "roi_height": 384, "slice_size": 192, "threshold": 55},
                      plc={"mode": "client", "host": "10.0.0.5", "port": 1234, "poll_ms": 20,
                           "heartbeat_timeout_s": 4.0}, camera={"source": "pylon"})
    roi = RoiParams.from_settings(s.roi)
    assert (roi.cols, roi.rows, roi.slice_size, roi.threshold) == (4, 2, 192, 55)
    assert roi.length_range == (600.0, 960.0)
    cfg = PlcLinkConfig.from_settings(s.plc)
    assert (cfg.host, cfg.port, cfg.db, cfg.poll_interval_s) == ("10.0.0.5", 1234, 100, 0.02)
    assert cfg.plc_heartbeat_timeout_s == 4.0 and cfg.app_watchdog_s == 4.0


# --------------------------------------------------------------------------------------- PLC events


def test_part_event_is_booked_and_fires_the_software_trigger(tmp_path):
    """A new PartId from the PLC opens the part and triggers the camera with that PartId; nothing is published yet."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(11))
    assert d.camera.triggers == [11]
    assert len(d.book) == 1 and d.plc.published == []
    assert d.stats.parts == 1


def test_duplicate_part_id_is_neither_triggered_nor_answered_twice(tmp_path):
    """A PartId that is still open is ignored (logged), without a second trigger or result."""
    d = make_daemon(tmp_path)
    with structlog.testing.capture_logs() as logs:
        d._on_plc_event(part_event(11))
        d._on_plc_event(part_event(11))
    assert d.camera.triggers == [11] and len(d.book) == 1
    assert [e["part_id"] for e in logs if e["event"] == "duplicate_part_id"] == [11]


def test_part_while_disabled_is_not_inspected_without_a_trigger(tmp_path):
    """A part announced with Enable = 0 gets NotInspected at once and the camera is not triggered."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(3, enable=False))
    assert d.camera.triggers == []
    (v,) = d.plc.published
    assert v.part_id == 3 and v.not_inspected and v.reason == "inspection_disabled"
    assert len(d.book) == 0 and parts_metric(d, "not_inspected") == 1


@pytest.mark.parametrize(("error", "reason"), [(CameraRemoved("reconnecting"), "trigger_failed"),
                                               (GrabTimeout("not ready"), "camera_not_ready"),
                                               (RuntimeError("x"), "trigger_failed")])
def test_failed_software_trigger_makes_the_part_not_inspected(tmp_path, error, reason):
    """When the trigger raises (camera gone, not ready, misconfigured), the part is NotInspected at once."""
    d = make_daemon(tmp_path, cam=FakeCamera(fail=error))
    d._on_plc_event(part_event(4))
    (v,) = d.plc.published
    assert v.not_inspected and v.reason == reason and len(d.book) == 0


class RecordingCamera(FakeCamera):
    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def trigger(self, part_id=None, timeout_s=None) -> None:
        self.timeouts.append(timeout_s)
        super().trigger(part_id, timeout_s)


def test_software_trigger_waits_at_most_the_rest_of_the_trigger_window(tmp_path):
    """The camera gets what is left of trigger_window_ms (not grab_timeout_ms) to become ready."""
    cam = RecordingCamera()
    d = make_daemon(tmp_path, cam=cam, pipeline={"trigger_window_ms": 300})
    d._on_plc_event(PlcEvent("part", time.monotonic() - 0.1, part_id=5, enable=True))
    assert cam.triggers == [5]
    (left,) = cam.timeouts
    assert 0.15 < left <= 0.2 + 1e-6


def test_part_announced_longer_ago_than_the_trigger_window_is_not_triggered(tmp_path):
    """A PartId the control loop reaches after trigger_window_ms: the part has left; NotInspected, no trigger."""
    cam = RecordingCamera()
    d = make_daemon(tmp_path, cam=cam, pipeline={"trigger_window_ms": 100})
    d._on_plc_event(PlcEvent("part", time.monotonic() - 0.25, part_id=6, enable=True))
    assert cam.triggers == []
    (v,) = d.plc.published
    assert v.part_id == 6 and v.not_inspected and v.reason == "trigger_late" and len(d.book) == 0
    assert parts_metric(d, "not_inspected") == 1


def test_worker_skips_a_frame_whose_part_already_timed_out(tmp_path, valve_image):
    """Overload: a queued frame whose part the control loop already answered (timeout) is not inspected."""
    model = FakeModel()
    d = make_daemon(tmp_path, model=model)
    d._on_plc_event(part_event(7))
    d._on_plc_event(part_event(8))
    d._on_camera_event(frame(valve_image, 7, frame_id=1))
    d._on_camera_event(frame(valve_image, 8, frame_id=2))
    p = d.book.claim(7)  # what the control loop's timeout does while the frame waits in the queue
    d._finish_claimed(p, Verdict.make_not_inspected(7, "timeout_inspection", frame_id=1))
    drain_worker(d)
    assert model.calls == 1 and d.stats.skipped_closed == 1 and d.stats.inspected == 1
    assert [(v.part_id, v.label) for v in d.plc.published] == [(7, "not_inspected"), (8, "accept")]


def test_link_events_set_the_connected_gauge_and_count_reconnects(tmp_path):
    """Link up/down events drive valve_inspect_plc_connected; every link-up after the first counts a reconnect."""
    d = make_daemon(tmp_path)
    m = d.metrics
    d._on_plc_event(PlcEvent("link", 0.0, connected=True))
    assert m.value("valve_inspect_plc_connected") == 1 and m.value("valve_inspect_plc_reconnects_total") == 0
    d._on_plc_event(PlcEvent("link", 1.0, connected=False))
    assert m.value("valve_inspect_plc_connected") == 0
    d._on_plc_event(PlcEvent("link", 2.0, connected=True))
    d._on_plc_event(PlcEvent("link", 3.0, connected=False))
    d._on_plc_event(PlcEvent("link", 4.0, connected=True))
    assert m.value("valve_inspect_plc_connected") == 1 and m.value("valve_inspect_plc_reconnects_total") == 2


def test_enable_event_is_followed(tmp_path):
    """An Enable change from the PLC is taken over; the next part then follows it."""
    d = make_daemon(tmp_path)
    d._on_plc_event(PlcEvent("enable", 0.0, enable=False))
    assert d._enabled is False
    d._on_plc_event(PlcEvent("enable", 0.0, enable=True))
    d._on_plc_event(part_event(1))
    assert d.camera.triggers == [1]


# ------------------------------------------------------------------------------------ camera events


def test_grab_failure_makes_its_part_not_inspected_and_counts_it(tmp_path):
    """A failed buffer for an open part publishes NotInspected (reason camera_failed_buffer, its frame id) and counts it."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(21))
    d._on_camera_event(GrabFailure(error=GrabFailed("incomplete"), arrival=time.monotonic(), frame_id=5, part_id=21))
    (v,) = d.plc.published
    assert v.part_id == 21 and v.not_inspected and v.reason == "camera_failed_buffer" and v.frame_id == 5
    assert not v.accept and parts_metric(d, "not_inspected") == 1 and len(d.book) == 0


def test_frame_is_inspected_by_the_worker_and_its_verdict_published(tmp_path, valve_image):
    """A frame for an open part is queued (never inspected on the grab thread); the worker publishes its verdict once."""
    d = make_daemon(tmp_path, model=FakeModel(["dirt"] + ["good"] * 7))
    d._on_plc_event(part_event(31))
    d._on_camera_event(frame(valve_image, 31, frame_id=9))
    assert d.model.calls == 0 and d._jobs.qsize() == 1
    drain_worker(d)
    (v,) = d.plc.published
    assert v.part_id == 31 and v.frame_id == 9 and v.reject_dirt and not v.accept
    # the area is the refined mask of slice 0: the model's 40 x 40 blob says where, the slice which pixels
    from service.roi import extract
    from service.segment import refined_mask

    sal = np.zeros((192, 192), np.float32)
    sal[60:100, 60:100] = 1.0
    expected = int(refined_mask(extract(valve_image, d.roi_params).slices[0, 0], sal).sum())
    assert v.dirt_area_px == expected and expected > 0 and v.score_dirt == pytest.approx(0.97)
    assert d.stats.inspected == 1 and parts_metric(d, "reject") == 1
    for stage in ("roi", "infer", "segment", "plc"):
        assert d.metrics.value("valve_inspect_stage_seconds_count", {"stage": stage}) == 1


def test_full_queue_reports_the_part_not_inspected_at_once(tmp_path, valve_image):
    """With the queue full, a further frame's part is NotInspected (overflow) at once and counted as dropped."""
    d = make_daemon(tmp_path, pipeline={"queue_size": 1})
    for pid in (1, 2):
        d._on_plc_event(part_event(pid))
        d._on_camera_event(frame(valve_image, pid, frame_id=pid))
    (v,) = d.plc.published
    assert v.part_id == 2 and v.not_inspected and v.reason == "overflow"
    assert d.metrics.value("valve_inspect_frames_dropped_total") == 1 and d.stats.overflow == 1
    drain_worker(d)
    assert [x.part_id for x in d.plc.published] == [2, 1] and d.plc.published[1].accept


def test_frame_for_a_closed_or_unknown_part_is_dropped(tmp_path, valve_image):
    """A frame whose part was already answered (or never announced) is not inspected and publishes nothing."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(1, enable=False))  # answered at once
    with structlog.testing.capture_logs() as logs:
        d._on_camera_event(frame(valve_image, 1))
        d._on_camera_event(frame(valve_image, 99))
    assert d._jobs.empty() and len(d.plc.published) == 1
    assert [e["part_id"] for e in logs if e["event"] == "frame_for_closed_part"] == [1, 99]


def test_worker_answers_a_frame_it_cannot_finish_before_the_deadline_not_inspected(tmp_path, valve_image):
    """Overload: when one inspection takes longer than the part has left, the frame is answered NotInspected
    (overload) at once and not inspected, so the frames behind it are not made late too."""
    model = FakeModel()
    d = make_daemon(tmp_path, model=model, pipeline={"part_timeout_s": 0.5, "trigger_window_ms": 100})
    d._on_plc_event(part_event(9))
    d._on_camera_event(frame(valve_image, 9, frame_id=3))
    d._inspect_s = 5.0  # recent inspections took 5 s; the part has at most 0.5 s left
    drain_worker(d)
    assert model.calls == 0 and d.stats.skipped_no_time == 1 and d.stats.inspected == 0
    (v,) = d.plc.published
    assert (v.part_id, v.frame_id, v.label, v.reason) == (9, 3, "not_inspected", "overload")


def test_worker_keeps_a_running_estimate_of_one_inspection(tmp_path, valve_image):
    """After an inspection the worker's estimate is set (and then moves by 1/5 of each new time)."""
    d = make_daemon(tmp_path)
    assert d._inspect_s is None
    d._on_plc_event(part_event(10))
    d._on_camera_event(frame(valve_image, 10, frame_id=4))
    drain_worker(d)
    assert d._inspect_s is not None and 0 < d._inspect_s < 5.0
    assert [(v.part_id, v.label) for v in d.plc.published] == [(10, "accept")]


def test_late_inspection_after_a_timeout_is_dropped_not_published(tmp_path, valve_image):
    """When a part times out while its frame is being inspected, the later result is counted late, never published."""
    d = make_daemon(tmp_path)

    class TimeoutDuringInference(FakeModel):
        def run(self, slices):
            (p,) = d.book.expired(time.monotonic() + 60.0)  # the control loop's timeout fires meanwhile
            d._finish_claimed(p, Verdict.make_not_inspected(41, "timeout_inspection"))
            return super().run(slices)

    d.model = TimeoutDuringInference()
    d._on_plc_event(part_event(41))
    d._on_camera_event(frame(valve_image, 41))
    drain_worker(d)
    assert [(v.part_id, v.label) for v in d.plc.published] == [(41, "not_inspected")]
    assert d.stats.late_results == 1 and d.book.late == 1 and d.model.calls == 1


def test_hardware_trigger_frames_pair_with_the_part_id_read_at_arrival(tmp_path, valve_image):
    """With the hardware trigger, no software trigger is fired and a frame pairs with the PartId read at its arrival."""
    d = make_daemon(tmp_path, camera={"source": "pylon", "images": "", "trigger": "hardware"},
                    simulation={"mix_with_real_hardware": True})  # a real camera, the PLC a double
    for pid in (51, 52):
        d._on_plc_event(part_event(pid))
    assert d.camera.triggers == []
    d._on_camera_event(frame(valve_image, None, frame_id=1))  # PartId 52 was the last one written
    d._on_camera_event(GrabFailure(error=GrabFailed("x"), arrival=time.monotonic(), frame_id=2))
    assert d.plc.published == [] and d.stats.unpaired_frames == 1  # 52 has its frame: nothing to pair with
    drain_worker(d)
    assert [(v.part_id, v.frame_id) for v in d.plc.published] == [(52, 1)]
    assert d.book.waiting_for_frame(51)  # 51 never got a frame: it will time out as NotInspected


def test_free_run_frames_are_inspected_and_counted_without_a_plc_result(tmp_path, valve_image):
    """In free-run (commissioning) a frame without a PartId is inspected and counted, and nothing goes to the PLC."""
    d = make_daemon(tmp_path, camera={"trigger": "free-run"})
    d._on_camera_event(frame(valve_image, None))
    drain_worker(d)
    assert d.plc.published == [] and d.stats.inspected == 1 and parts_metric(d, "accept") == 1


# -------------------------------------------------------------------------------------------- inspect


def test_dark_frame_is_no_part_without_running_the_model(tmp_path):
    """A frame without a valve gives NoPart (reason no_valve) and the model is never run."""
    d = make_daemon(tmp_path, model=FakeModel(error=AssertionError("the model must not run")))
    v, extras = d.inspect(frame(dark(), 5), 5)
    assert v.no_part and v.reason == "no_valve" and extras is None and d.model.calls == 0


def test_model_error_makes_the_part_not_inspected_and_the_worker_goes_on(tmp_path, valve_image):
    """An exception in inference makes that part NotInspected (inspection_error); the worker takes the next frame."""
    # a generous part deadline: this test is about the error path, and under load the default 1 s could
    # run out before the worker thread starts (the part would then be skipped as closed, not errored)
    d = make_daemon(tmp_path, model=FakeModel(error=RuntimeError("onnxruntime failed")),
                    pipeline={"part_timeout_s": 30.0}, plc={"sim_watchdog_s": 60.0})
    for pid in (61, 62):
        d._on_plc_event(part_event(pid))
        d._on_camera_event(frame(valve_image, pid))
    drain_worker(d)
    assert [(v.part_id, v.reason) for v in d.plc.published] == [(61, "inspection_error"), (62, "inspection_error")]
    assert not any(v.accept for v in d.plc.published)


# ------------------------------------------------------------------------------------------ control loop


def test_control_loop_times_out_a_part_whose_frame_never_comes_and_sets_ready(tmp_path):
    """The control loop takes PLC events, answers a part without a frame NotInspected after part_timeout_s,
    and keeps Ready = camera connected and enabled."""
    d = make_daemon(tmp_path, pipeline={"part_timeout_s": 0.2, "trigger_window_ms": 100})
    t = threading.Thread(target=d._control, daemon=True)
    t.start()
    try:
        d.plc.events.put(part_event(71))
        end = time.monotonic() + 5.0
        while not d.plc.published and time.monotonic() < end:
            time.sleep(0.01)
        (v,) = d.plc.published
        assert v.part_id == 71 and v.reason == "timeout_no_frame"
        assert d.camera.triggers == [71]
        assert d.plc.status.get("ready") is True and d.plc.status.get("camera_ok") is True
        d.camera.connected = False
        end = time.monotonic() + 2.0
        while d.plc.status.get("ready") and time.monotonic() < end:
            time.sleep(0.01)
        assert d.plc.status["ready"] is False and d.plc.status["fault"] is True
    finally:
        d.request_stop()
        t.join(2.0)
    assert not t.is_alive() and d.plc.touched > 0


def test_healthy_is_false_when_the_control_loop_stalls_or_the_worker_hangs(tmp_path):
    """healthy() (the systemd watchdog's check) fails when the loop has not run for 5 s or one frame takes over 10 s."""
    d = make_daemon(tmp_path)
    assert d.healthy()
    d._loop_beat = time.monotonic() - 6.0
    assert not d.healthy()
    d._loop_beat = time.monotonic()
    d._worker_busy_since = {0: time.monotonic() - 11.0}
    assert not d.healthy()


def test_stop_answers_open_parts_not_inspected_and_clears_ready(tmp_path):
    """stop() closes the camera, answers every open part NotInspected (shutdown), clears Ready and stops the link; twice is harmless."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(81))
    d._on_plc_event(part_event(82))
    d.plc.set_status(ready=True)
    d.stop("test")
    assert d.camera.closed and d.plc.stopped
    assert [(v.part_id, v.reason) for v in d.plc.published] == [(81, "shutdown"), (82, "shutdown")]
    assert d.plc.status["ready"] is False
    assert d.summary()["verdict_not_inspected"] == 2
    d.stop("again")
    assert len(d.plc.published) == 2


def test_stop_also_answers_parts_the_link_announced_after_the_control_loop_ended(tmp_path):
    """PartIds still waiting in the link's event queue at stop() get their NotInspected (shutdown) result too."""
    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(91))
    d.plc.events.put(PlcEvent("enable", 0.0, enable=True))
    d.plc.events.put(part_event(92))
    d.plc.events.put(part_event(91))  # already open: still one result
    d.stop("test")
    assert [(v.part_id, v.reason) for v in d.plc.published] == [(91, "shutdown"), (92, "shutdown")]
    assert d.camera.triggers == [91]  # nothing is triggered during shutdown
    assert d.summary()["parts"] == 2


def test_hardware_trigger_frame_pairs_with_the_part_id_read_at_arrival_only_while_it_waits():
    """Hardware trigger: a frame goes to the latest announced PartId if it waits for a frame, else it is dropped."""
    import types

    d = Daemon.__new__(Daemon)
    d.settings = types.SimpleNamespace(camera=types.SimpleNamespace(trigger="hardware"),
                                       pipeline=types.SimpleNamespace(queue_size=4))
    d.book = PartBook(timeout_s=5.0)
    from service.app import DaemonStats

    d.stats = DaemonStats()
    queued = []
    d._jobs = types.SimpleNamespace(put_nowait=queued.append)
    d._latest_part_id = None
    frame = Frame(image=np.zeros((4, 4), np.uint8), frame_id=1, arrival=1.0)
    d._on_camera_event(frame)  # nothing announced yet: dropped
    assert queued == [] and d.stats.unpaired_frames == 1
    d.book.announce(7, 0.5)
    d._latest_part_id = 7
    d._on_camera_event(frame)
    assert [j.part_id for j in queued] == [7]
    d._on_camera_event(Frame(image=frame.image, frame_id=2, arrival=1.1))  # a second frame for 7: dropped
    assert len(queued) == 1 and d.stats.unpaired_frames == 2
    d.book.claim(7)  # part 7 closed (e.g. timed out); its late frame must not go to anyone else
    d._on_camera_event(Frame(image=frame.image, frame_id=3, arrival=1.2))
    assert len(queued) == 1 and d.stats.unpaired_frames == 3


def test_results_the_link_dropped_are_mirrored_into_the_metric_by_reason(tmp_path):
    """Counts the PLC link drops (by reason) reach valve_inspect_plc_results_dropped_total once each."""
    d = make_daemon(tmp_path)
    d.plc.dropped_by_reason = {"link_down": 2}
    d._sync_plc_drops()
    d._sync_plc_drops()  # no double counting
    d.plc.dropped_by_reason = {"link_down": 3, "stale_epoch": 1}
    d._sync_plc_drops()
    reg = d.metrics.registry
    assert reg.get_sample_value("valve_inspect_plc_results_dropped_total", {"reason": "link_down"}) == 3.0
    assert reg.get_sample_value("valve_inspect_plc_results_dropped_total", {"reason": "stale_epoch"}) == 1.0


def test_embedded_demo_caps_the_reject_archive_quota(monkeypatch, tmp_path):
    """Without --config the demo's reject archive quota is capped at DEMO_ARCHIVE_QUOTA_MB."""
    import service.app as app

    seen = {}

    class StubDaemon:
        def __init__(self, settings, demo_manifest=None, demo_rate=None):
            seen["settings"], seen["manifest"], seen["demo_rate"] = settings, demo_manifest, demo_rate

        def start(self):
            raise app.FatalError("stop before touching the line")

        def stop(self, reason):
            seen["stopped"] = reason

    monkeypatch.setattr(app, "Daemon", StubDaemon)
    monkeypatch.setattr(app, "demo_frames", lambda parts: (tmp_path, ["good", "dirt"]))
    monkeypatch.setattr(app, "bmp_frames", lambda frames: frames / "bmp")
    monkeypatch.setattr(app, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(app.signal, "signal", lambda *a: None)
    for key in [k for k in __import__("os").environ if k.startswith("VALVE_INSPECT_")]:
        monkeypatch.delenv(key)
    assert app.main([]) == 2
    s = seen["settings"]
    assert s.archive.quota_mb == app.DEMO_ARCHIVE_QUOTA_MB < 1024
    assert s.camera.images == str(tmp_path / "bmp") and seen["manifest"][:2] == ["good", "dirt"]
    assert seen["stopped"] == "fatal" and seen["demo_rate"] == "auto"  # the embedded demo fits its rate
    assert app.main(["--demo-rate", "1.5"]) == 2 and seen["demo_rate"] == 1.5
    # a config's simulated PLC keeps its sim_rate_hz unless --demo-rate is given
    cfg = write_toml(tmp_path / "sim.toml", {"camera": {"source": "emulator"}, "plc": {"mode": "simulated"}})
    assert app.main(["--config", str(cfg)]) == 2 and seen["demo_rate"] is None
    assert app.main(["--config", str(cfg), "--demo-rate", "auto"]) == 2 and seen["demo_rate"] == "auto"


def test_demo_rate_option_is_checked_and_refused_beside_a_real_plc(tmp_path, capsys, monkeypatch):
    """--demo-rate takes 'auto' or a positive rate, and is refused when the config's PLC is a real one."""
    import service.app as app

    for bad in ("0", "-1", "fast", "1e9"):
        with pytest.raises(SystemExit) as exc:
            app.main(["--demo-rate", bad])
        assert exc.value.code == 2 and "give 'auto' or parts per second" in capsys.readouterr().err
    cfg = write_toml(tmp_path / "line.toml", {"plc": {"mode": "client", "host": "192.168.0.10"}})
    assert app.main(["--config", str(cfg), "--demo-rate", "2"]) == 2
    assert "the PLC configured here is real ([plc] mode = 'client')" in capsys.readouterr().err
    monkeypatch.setenv("VALVE_INSPECT_PLC__MODE", "client")  # no --config, a real PLC by the environment
    monkeypatch.setenv("VALVE_INSPECT_PLC__HOST", "192.168.0.10")
    monkeypatch.setenv("VALVE_INSPECT_SIMULATION__MIX_WITH_REAL_HARDWARE", "true")  # else the loader refuses first
    assert app.main(["--demo-rate", "2"]) == 2
    assert "the PLC configured here is real" in capsys.readouterr().err
    with pytest.raises(ValueError, match="demo_rate must be"):
        app.Daemon(make_settings(tmp_path), demo_rate=0)


class SlowModel(FakeModel):
    """FakeModel that takes ``seconds`` per call, like a model on a slower CPU."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def run(self, slices):
        time.sleep(self.seconds)
        return super().run(slices)


@pytest.mark.parametrize(("seconds", "low", "high"), [(0.0, 4.0, 4.0), (0.25, 1.1, 1.4), (0.4, 0.7, 0.8)])
def test_the_demo_rate_fits_the_time_one_inspection_takes(tmp_path, valve_image, monkeypatch, seconds, low, high):
    """'auto' times the inspection of the demo's first frame (median of 5) and keeps the line at DEMO_LOAD (0.35) of
    one worker: 4 parts/s (sim_rate_hz) on a machine that keeps up, fewer on a slower one (0.25 s a part: 1.4 parts/s
    less the ROI's and Otsu's share), never below DEMO_MIN_RATE_HZ."""
    import cv2

    import service.app as app

    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "part_000000.png"), valve_image.astype(np.uint16) * 256)  # Mono16: not a camera frame
    cv2.imwrite(str(frames / "part_000001.bmp"), dark())  # no valve: it would never reach the model
    cv2.imwrite(str(frames / "part_000002.bmp"), valve_image)
    d = make_daemon(tmp_path, model=SlowModel(seconds), camera={"images": str(frames)})
    rate = d._fit_demo_rate(4.0)
    assert d.model.calls == 5 and low <= rate <= high, rate
    assert app.DEMO_LOAD == 0.35
    # camera.images as one file, as the emulator also takes it
    d = make_daemon(tmp_path, model=SlowModel(seconds), camera={"images": str(frames / "part_000002.bmp")})
    assert low <= d._fit_demo_rate(4.0) <= high and d.model.calls == 5
    if seconds:
        monkeypatch.setattr(app, "DEMO_LOAD", 0.01)  # as on a machine 50x slower: the floor
        assert d._fit_demo_rate(4.0) == app.DEMO_MIN_RATE_HZ == 0.2
    # no readable frame: the configured rate, with a warning
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    d = make_daemon(tmp_path, model=SlowModel(seconds), camera={"images": str(tmp_path / "empty")})
    assert d._fit_demo_rate(4.0) == 4.0 and d.model.calls == 0
    # a model that fails on the frame: the configured rate, not a daemon that cannot start
    d = make_daemon(tmp_path, model=FakeModel(error=RuntimeError("session lost")), camera={"images": str(frames)})
    assert d._fit_demo_rate(4.0) == 4.0 and d.model.calls == 1


def test_every_reported_part_reaches_the_live_view_by_reference(tmp_path, valve_image):
    """With [ui] on, each reported part is handed to the live view: an inspected one with its very frame and the
    inspection's records (no copy), a part that never got a frame without one; ui_status counts both."""
    from service.ui import LiveParts

    d = make_daemon(tmp_path, model=FakeModel(["dirt"] + ["good"] * 7))
    d.model.provider, d.model.sha256, d.model.preset = "CPUExecutionProvider", "ab" * 32, "compact"
    d.live = LiveParts()
    d._on_plc_event(part_event(41))
    f = frame(valve_image, 41, frame_id=3)
    d._on_camera_event(f)
    drain_worker(d)
    shown = d.live.latest_image()
    assert shown.verdict.part_id == 41 and shown.image is f.image
    assert set(shown.extras) >= {"batch", "pred", "masks"} and [p.verdict.part_id for p in d.live.rejects()] == [41]
    d._on_plc_event(part_event(42))
    d._finish(42, Verdict.make_not_inspected(42, "timeout_no_frame"))
    assert d.live.latest().verdict.part_id == 42 and d.live.latest().image is None
    assert d.live.latest_image().verdict.part_id == 41
    st = d.ui_status()
    assert st["parts"] == {"accept": 0, "reject": 1, "no_part": 0, "not_inspected": 1}
    assert st["provider"] == "CPUExecutionProvider" and st["gpu"] is False and st["model"]["sha256"] == "ab" * 32
