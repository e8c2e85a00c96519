"""service.camera against pylon's real camera emulator (PYLON_CAMEMU), plus a test double for recovery timing."""

import itertools
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from service.camera import Camera, GrabFailure, PylonDevice, RawGrab, backoff_delays
from service.config import CameraSettings
from service.errors import CameraError, CameraRemoved, ConfigError, GrabFailed, GrabTimeout
from service.metrics import Metrics
from service.records import Frame

pytestmark = pytest.mark.timeout(60)

W, H = 2448, 2048


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Three distinct 2448x2048 Mono8 PNGs, written in reverse order so that only sorting gives 0, 1, 2."""
    folder = tmp_path_factory.mktemp("frames")
    yy, xx = np.mgrid[0:H, 0:W]
    images = []
    for i in range(3):
        img = ((xx // 8 + yy // 8 * 3 + 70 * i) % 256).astype(np.uint8)
        img[100 + 200 * i: 300 + 200 * i, 500:900] = 255 - 40 * i  # a block that moves between frames
        images.append(img)
    for i in reversed(range(3)):
        assert cv2.imwrite(str(folder / f"frame_{i:02d}.png"), images[i])
    return folder, images


def settings(frames: Path | None = None, **camera) -> CameraSettings:
    values = {"source": "emulator", "images": str(frames) if frames else "", "reconnect_min_s": 0.05,
              "reconnect_max_s": 0.2, **camera}
    return CameraSettings(**values)


def next_event(cam: Camera, timeout: float = 5.0):
    ev = cam.get(timeout=timeout)
    assert ev is not None, f"no camera event within {timeout} s; stats {cam.stats()}"
    return ev


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def matches_one_of(image: np.ndarray, images: list[np.ndarray]) -> bool:
    return any(np.array_equal(image, ref) for ref in images)


# ------------------------------------------------------------------------------------ real emulator


def test_software_trigger_replays_the_folder_bit_exact_in_sorted_order(frames_dir):
    """Each software trigger yields the next file of the folder (sorted, looping), bit-exact, tagged with its part."""
    folder, images = frames_dir
    metrics = Metrics(CollectorRegistry())
    cam = Camera(settings(folder), metrics=metrics).start(require_camera=True)
    try:
        assert cam.connected and metrics.value("valve_inspect_camera_connected") == 1.0
        got = []
        for part in range(100, 104):
            cam.trigger(part_id=part)
            got.append(next_event(cam))
        assert all(isinstance(f, Frame) for f in got), got
        assert [f.part_id for f in got] == [100, 101, 102, 103]
        for frame, expected in zip(got, [0, 1, 2, 0], strict=True):
            assert frame.image.shape == (H, W) and frame.image.dtype == np.uint8
            assert np.array_equal(frame.image, images[expected])
        ids = [f.frame_id for f in got]
        assert ids == list(range(ids[0], ids[0] + 4))
        assert all(a.arrival < b.arrival for a, b in itertools.pairwise(got))
        assert cam.stats()["frames"] == 4 and cam.stats()["triggers"] == 4
        assert metrics.value("valve_inspect_stage_seconds_count", {"stage": "grab"}) == 4.0
    finally:
        cam.close()
    cam.close()  # idempotent
    assert not cam.connected and metrics.value("valve_inspect_camera_connected") == 0.0


def test_free_run_streams_frames_without_triggers(frames_dir):
    """In free-run the camera delivers frames on its own, with increasing frame ids and no part id."""
    folder, images = frames_dir
    s = settings(folder, trigger="free-run",
                 features={"AcquisitionFrameRateEnable": True, "AcquisitionFrameRate": 10.0})
    with Camera(s).start(require_camera=True) as cam:
        got = [next_event(cam) for _ in range(3)]
        assert all(isinstance(f, Frame) and f.part_id is None for f in got), got
        assert all(matches_one_of(f.image, images) for f in got)
        assert got[0].frame_id < got[1].frame_id < got[2].frame_id
        with pytest.raises(RuntimeError, match="camera.trigger = 'software'"):
            cam.trigger(part_id=1)


def test_forced_failed_buffers_are_counted_surfaced_and_grabbing_resumes(frames_dir):
    """ForceFailedBuffer on the emulator gives GrabFailed events for those parts, counted and logged, then frames again."""
    folder, images = frames_dir
    metrics = Metrics(CollectorRegistry())
    with Camera(settings(folder), metrics=metrics).start(require_camera=True) as cam:
        cam.set_feature("ForceFailedBufferCount", 2)
        cam.execute("ForceFailedBuffer")
        with structlog.testing.capture_logs() as logs:
            events = []
            for part in (10, 11, 12, 13):
                cam.trigger(part_id=part)
                events.append(next_event(cam))
        failed, ok = events[:2], events[2:]
        assert all(isinstance(e, GrabFailure) and e.kind == "failed_buffer" for e in failed), events
        assert [e.part_id for e in failed] == [10, 11]
        assert isinstance(failed[0].error, GrabFailed) and "incompletely grabbed" in failed[0].reason
        assert failed[0].frame_id is not None and failed[1].frame_id == failed[0].frame_id + 1
        assert all(isinstance(e, Frame) for e in ok) and [e.part_id for e in ok] == [12, 13]
        assert all(matches_one_of(e.image, images) for e in ok)
        assert cam.stats()["failed_buffers"] == 2 and cam.stats()["frames"] == 2
        assert metrics.value("valve_inspect_camera_failed_buffers_total") == 2.0
        assert [entry["part_id"] for entry in logs if entry["event"] == "camera_failed_buffer"] == [10, 11]


def test_unknown_feature_name_is_a_clear_config_error(frames_dir):
    """A misspelt node in camera.features fails start() with the key, the node and a suggestion."""
    cam = Camera(settings(frames_dir[0], features={"ExposureTme": 5000.0}))
    with pytest.raises(ConfigError) as exc:
        cam.start()
    msg = str(exc.value)
    assert "camera.features.ExposureTme" in msg and "no feature named 'ExposureTme'" in msg
    assert "did you mean" in msg and "ExposureTime" in msg
    assert not cam.connected
    cam.close()


def test_rejected_feature_values_name_the_node_and_the_allowed_range(frames_dir):
    """A value the camera refuses, or of the wrong type, fails with the node, the value and what it accepts."""
    with pytest.raises(ConfigError, match=r"camera.features.ExposureTime = -5.0: the camera rejected it.*allowed"):
        Camera(settings(frames_dir[0], features={"ExposureTime": -5.0})).open().close()
    with pytest.raises(ConfigError, match=r"camera.features.GevSCPSPacketSize = True: .* takes an integer"):
        Camera(settings(frames_dir[0], features={"GevSCPSPacketSize": True})).open().close()


def test_features_are_applied_and_read_back(frames_dir):
    """camera.features values are set by node type (float, int, bool; a lower-case key from the environment too)."""
    feats = {"ExposureTime": 5000.0, "GevSCPSPacketSize": 8192, "ReverseX": False, "gainraw": "300"}
    with Camera(settings(frames_dir[0], features=feats)).open() as cam:
        assert cam.get_feature("ExposureTime") == 5000.0
        assert cam.get_feature("GevSCPSPacketSize") == 8192
        assert cam.get_feature("ReverseX") is False
        assert cam.get_feature("GainRaw") == 300
        assert cam.get_feature("PixelFormat") == "Mono8"
        assert (cam.get_feature("Width"), cam.get_feature("Height")) == (W, H)
        assert cam.get_feature("TriggerMode") == "On" and cam.get_feature("TriggerSource") == "Software"


def test_pfs_file_is_loaded_before_features(frames_dir, tmp_path):
    """A .pfs file's values are applied, camera.features override them, and a bad .pfs names camera.pfs_file."""
    from pypylon import pylon

    with Camera(settings(frames_dir[0], features={"ExposureTime": 4321.0, "GevSCPSPacketSize": 4000})).open() as cam:
        nodemap = cam._device.cam.GetNodeMap()  # the test saves the emulator's state with pylon directly
        pfs = tmp_path / "line.pfs"
        pylon.FeaturePersistence.Save(str(pfs), nodemap)
    with Camera(settings(frames_dir[0], pfs_file=str(pfs), features={"GevSCPSPacketSize": 6000})).open() as cam:
        assert cam.get_feature("ExposureTime") == 4321.0
        assert cam.get_feature("GevSCPSPacketSize") == 6000
    bad = tmp_path / "bad.pfs"
    bad.write_text(pfs.read_text().splitlines()[0] + "\nNoSuchNode\t12\n")
    with pytest.raises(ConfigError, match="camera.pfs_file: .*bad.pfs cannot be loaded"):
        Camera(settings(frames_dir[0], pfs_file=str(bad))).open()


def test_device_removal_is_recovered_with_a_new_device(frames_dir):
    """After the emulator reports removal, a CameraRemoved failure is delivered and the camera is re-created."""
    folder, images = frames_dir
    metrics = Metrics(CollectorRegistry())
    with Camera(settings(folder), metrics=metrics).start(require_camera=True) as cam:
        cam.trigger(part_id=1)
        assert isinstance(next_event(cam), Frame)
        cam.execute("FirePnPCallback")  # the emulator's simulated unplug: IsCameraDeviceRemoved() -> True
        lost = next_event(cam)
        assert isinstance(lost, GrabFailure) and lost.kind == "removed", lost
        assert isinstance(lost.error, CameraRemoved)
        assert wait_until(lambda: cam.connected and cam.stats()["reconnects"] == 1), cam.stats()
        cam.trigger(part_id=2)
        frame = next_event(cam)
        assert isinstance(frame, Frame) and frame.part_id == 2
        assert np.array_equal(frame.image, images[0])  # a fresh device replays from the first file
        assert cam.stats()["disconnects"] == 1
        assert metrics.value("valve_inspect_camera_reconnects_total") == 1.0
        assert metrics.value("valve_inspect_camera_connected") == 1.0


def test_hardware_trigger_configures_line1_and_waits_quietly(frames_dir):
    """trigger = hardware sets FrameStart on Line1, rising edge; an idle line gives no events and no timeouts."""
    # The config refuses hardware + emulator (nothing drives Line1); bypass it to check the node settings.
    s = settings(frames_dir[0], grab_timeout_ms=100).model_copy(update={"trigger": "hardware"})
    with Camera(s).start(require_camera=True) as cam:
        assert cam.get_feature("TriggerMode") == "On"
        assert cam.get_feature("TriggerSource") == "Line1"
        assert cam.get_feature("TriggerActivation") == "RisingEdge"
        assert cam.get(timeout=0.4) is None
        assert cam.stats()["timeouts"] == 0 and cam.connected


def test_emulator_is_found_when_pylon_camemu_is_unset(monkeypatch):
    """source = emulator sets PYLON_CAMEMU itself before enumerating (the demo needs no environment)."""
    monkeypatch.delenv("PYLON_CAMEMU", raising=False)
    with Camera(settings()).open() as cam:
        assert cam.connected and cam.stats()["device"]["serial"] == "0815-0000"
    import os

    assert os.environ["PYLON_CAMEMU"] == "1"


def test_missing_camera_is_a_camera_error_or_a_background_retry():
    """An unknown serial raises CameraError when required, else start() returns and keeps retrying."""
    with pytest.raises(CameraError, match=r"no camera emulator with serial '9999' found.*0815-0000"):
        Camera(settings(serial="9999")).start(require_camera=True)
    cam = Camera(settings(serial="9999")).start()
    try:
        assert not cam.connected and "9999" in cam.stats()["last_error"]
        with pytest.raises(CameraRemoved, match="not connected"):
            cam.trigger(part_id=1)
    finally:
        cam.close()


# ----------------------------------------------------------------------------------------- test double


NO_BLOCK_ID = 2**64 - 1


class FakeDevice:
    """A Device double: frames come from a deque; ``removed``, ``deliver``, ``hold``, ``lose``, ``ready`` steer it.

    A triggered frame's pixels hold the number of the trigger that fired it (``shots``), so a test sees whose
    image a part got. ``block`` is the frame counter (BlockID; 2**64-1 without ``block_ids``). ``hold`` keeps
    frames back (late) until release(); ``lose`` counts frames that the camera numbers but never delivers;
    ``ready`` False refuses triggers (GrabTimeout, not fired); ``trigger_error`` fires, then raises CameraError;
    resync() flushes everything queued and restarts the counter at 0, like the emulator.
    """

    def __init__(self, deliver: bool = True, block_ids: bool = True) -> None:
        self.info = {"model": "Fake", "serial": "F-1"}
        self.queue: deque[RawGrab] = deque()
        self.held: deque[RawGrab] = deque()
        self.removed = False
        self.deliver = deliver
        self.block_ids = block_ids
        self.hold = False
        self.lose = 0
        self.ready = True
        self.trigger_error = False
        self.closed = False
        self.block = 0
        self.shots = 0
        self.resyncs = 0

    def _grab(self, tag: int) -> RawGrab:
        grab = RawGrab(True, np.full((4, 4), tag % 256, np.uint8), self.block if self.block_ids else NO_BLOCK_ID)
        self.block += 1
        return grab

    def push(self, n: int = 1) -> None:
        for _ in range(n):
            self.queue.append(self._grab(self.block))

    def release(self) -> None:
        while self.held:
            self.queue.append(self.held.popleft())

    def retrieve(self, timeout_ms):
        if self.queue:
            return self.queue.popleft()
        time.sleep(timeout_ms / 1000.0)
        return None

    def trigger(self, timeout_ms):
        if not self.ready:
            time.sleep(timeout_ms / 1000.0)  # like WaitForFrameTriggerReady
            raise GrabTimeout("not ready for a trigger (test double)")
        shot, self.shots = self.shots, self.shots + 1
        if self.deliver:
            grab = self._grab(shot)
            if self.lose:
                self.lose -= 1
            else:
                (self.held if self.hold or self.held else self.queue).append(grab)  # the stream keeps its order
        if self.trigger_error:
            raise CameraError("software trigger failed: lost the register write's answer (test double)")

    def resync(self):
        self.resyncs += 1
        self.held.clear()
        self.queue.clear()
        self.block = 0

    def is_removed(self):
        return self.removed

    def get_feature(self, name):
        return 0

    def set_feature(self, name, value):
        pass

    def execute(self, name):
        pass

    def close(self):
        self.closed = True


class FlakyFactory:
    """Fails ``failures`` times with CameraError, then returns FakeDevices; records when it was called."""

    def __init__(self, failures: int = 0, deliver: bool = True, block_ids: bool = True) -> None:
        self.failures = failures
        self.deliver = deliver
        self.block_ids = block_ids
        self.calls: list[float] = []
        self.devices: list[FakeDevice] = []

    def __call__(self, settings):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise CameraError("no camera found (test double)")
        dev = FakeDevice(self.deliver, self.block_ids)
        self.devices.append(dev)
        return dev


def fake_settings(**camera) -> CameraSettings:
    """Settings for FakeDevice, whose frames are 4x4 Mono8."""
    return settings(**{"reconnect_min_s": 0.02, "reconnect_max_s": 0.08, "width": 4, "height": 4, **camera})


def test_backoff_delays_double_up_to_the_maximum():
    """The reconnect delays are min, 2*min, 4*min, ... capped at max."""
    assert list(itertools.islice(backoff_delays(0.5, 10.0), 7)) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_absent_camera_is_retried_with_growing_delays_until_it_appears():
    """A camera missing at start is retried after 0.02, 0.04, 0.08, 0.08 s ... and connects when it appears."""
    factory = FlakyFactory(failures=4)
    cam = Camera(fake_settings(), device_factory=factory, poll_ms=10).start()
    try:
        assert wait_until(lambda: cam.connected, 5.0), cam.stats()
        gaps = [b - a for a, b in itertools.pairwise(factory.calls)]
        assert len(gaps) == 4
        for gap, expected in zip(gaps, [0.02, 0.04, 0.08, 0.08], strict=True):
            assert gap >= expected * 0.9, gaps
        assert cam.stats()["reconnect_attempts"] == 4 and cam.stats()["reconnects"] == 0
    finally:
        cam.close()


def test_lost_camera_fails_pending_parts_and_is_recreated():
    """When the device reports removal, each pending part gets a CameraRemoved failure and a new device is made."""
    factory = FlakyFactory(deliver=False)
    metrics = Metrics(CollectorRegistry())
    cam = Camera(fake_settings(), device_factory=factory, poll_ms=10, metrics=metrics).start(require_camera=True)
    try:
        cam.trigger(part_id=5)
        cam.trigger(part_id=6)
        factory.devices[0].removed = True
        failures = [next_event(cam), next_event(cam)]
        assert [(f.kind, f.part_id) for f in failures] == [("removed", 5), ("removed", 6)]
        assert factory.devices[0].closed
        assert wait_until(lambda: cam.connected and len(factory.devices) == 2)
        assert cam.stats()["reconnects"] == 1 and metrics.value("valve_inspect_camera_reconnects_total") == 1.0
    finally:
        cam.close()
    assert factory.devices[1].closed


def test_missing_triggered_frames_time_out_then_the_camera_is_recreated():
    """A triggered frame missing after grab_timeout_ms is a GrabTimeout for that part; three in a row re-create."""
    factory = FlakyFactory(deliver=False)
    metrics = Metrics(CollectorRegistry())
    cam = Camera(fake_settings(grab_timeout_ms=30), device_factory=factory, poll_ms=10, metrics=metrics)
    cam.start(require_camera=True)
    try:
        for part in (1, 2, 3):
            cam.trigger(part_id=part)
            ev = next_event(cam, 2.0)
            assert isinstance(ev, GrabFailure) and isinstance(ev.error, GrabTimeout) and ev.part_id == part
        lost = next_event(cam, 2.0)
        assert lost.kind == "error" and "3 grab timeouts in a row" in lost.reason
        assert wait_until(lambda: len(factory.devices) == 2 and cam.connected)
        assert metrics.value("valve_inspect_camera_grab_timeouts_total") == 3.0
    finally:
        cam.close()


def test_full_queue_drops_the_oldest_event_and_counts_it():
    """Without a consumer the bounded queue keeps the newest events; the dropped ones are counted."""
    factory = FlakyFactory()
    metrics = Metrics(CollectorRegistry())
    cam = Camera(fake_settings(trigger="free-run"), device_factory=factory, poll_ms=10, queue_size=2,
                 metrics=metrics).open()
    factory.devices[0].push(5)
    cam.start()
    try:
        assert wait_until(lambda: cam.stats()["frames"] == 5)
        assert [cam.get(0).frame_id, cam.get(0).frame_id] == [3, 4]
        assert cam.stats()["dropped"] == 3 and metrics.value("valve_inspect_frames_dropped_total") == 3.0
    finally:
        cam.close()


def test_a_failing_callback_does_not_stop_grabbing():
    """An exception in on_event is counted and logged; later frames are still delivered."""
    seen: list[int] = []
    done = threading.Event()

    def on_event(ev):
        seen.append(ev.frame_id)
        if len(seen) == 1:
            raise ValueError("consumer bug")
        if len(seen) == 3:
            done.set()

    factory = FlakyFactory()
    cam = Camera(fake_settings(trigger="free-run"), device_factory=factory, poll_ms=10, on_event=on_event).open()
    factory.devices[0].push(3)
    cam.start()
    try:
        assert done.wait(5.0)
        assert seen == [0, 1, 2] and cam.stats()["callback_errors"] == 1
        with pytest.raises(RuntimeError, match="on_event"):
            cam.get(0)
    finally:
        cam.close()


# ------------------------------------------------------------------- pairing frames with software triggers


def own_frame(ev, part: int, shot: int) -> bool:
    """ev is a Frame for ``part`` carrying the image of the device's trigger number ``shot``."""
    return isinstance(ev, Frame) and ev.part_id == part and int(ev.image[0, 0]) == shot % 256


def test_late_frames_after_a_timeout_are_discarded_and_never_tagged_to_the_next_part():
    """A frame arriving after its part's GrabTimeout is discarded and counted; every other part gets its own frame."""
    factory = FlakyFactory()
    cam = Camera(fake_settings(grab_timeout_ms=300), device_factory=factory, poll_ms=5).start(require_camera=True)
    try:
        dev = factory.devices[0]
        with structlog.testing.capture_logs() as logs:
            for part in range(1, 9):
                late = part in (3, 6)  # their frames stay queued until the next part's trigger has fired
                dev.hold = late
                cam.trigger(part_id=part)
                if late:
                    ev = next_event(cam, 3.0)
                    assert isinstance(ev, GrabFailure) and ev.kind == "timeout" and ev.part_id == part, ev
                    continue
                dev.release()  # the late frame (if any) comes first, then this part's own
                ev = next_event(cam)
                assert own_frame(ev, part, shot=part - 1), (part, ev)
                assert ev.frame_id == part - 1
        assert cam.get(timeout=0.05) is None
        st = cam.stats()
        assert st["late_frames_discarded"] == 2 and st["timeouts"] == 2 and st["frames"] == 6
        assert st["resyncs"] == 0 and st["unmatched_frames_discarded"] == 0 and st["pending_triggers"] == 0
        late_logs = [(e["part_id"], e["frame_id"]) for e in logs if e["event"] == "camera_late_frame_discarded"]
        assert late_logs == [(3, 2), (6, 5)]
    finally:
        cam.close()


def test_a_frame_the_counter_shows_lost_fails_its_part_and_the_next_part_keeps_its_own():
    """A frame the camera numbered but never delivered is a GrabFailed for its part; the next part still gets its own."""
    factory = FlakyFactory()
    cam = Camera(fake_settings(), device_factory=factory, poll_ms=5).start(require_camera=True)
    try:
        dev = factory.devices[0]
        cam.trigger(part_id=1)
        assert own_frame(next_event(cam), 1, shot=0)
        dev.hold, dev.lose = True, 1
        cam.trigger(part_id=2)  # numbered 1 by the camera, lost on the way
        cam.trigger(part_id=3)
        dev.hold = False
        dev.release()
        lost, ev = next_event(cam), next_event(cam)
        assert isinstance(lost, GrabFailure) and lost.kind == "failed_buffer" and lost.part_id == 2, lost
        assert "frame lost" in lost.reason
        assert own_frame(ev, 3, shot=2) and ev.frame_id == 2
        cam.trigger(part_id=4)
        assert own_frame(next_event(cam), 4, shot=3)
        assert cam.stats()["frames_lost"] == 1 and cam.stats()["timeouts"] == 0
    finally:
        cam.close()


class ManualClock:
    """A camera clock that only moves when the test moves it (``advance``)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.mark.parametrize("block_ids", [True, False], ids=["before-the-first-frame", "no-block-id"])
def test_a_timeout_the_counter_cannot_place_resynchronises_the_stream(block_ids):
    """A timeout with no frame counter to pair by restarts the stream: the late frame never surfaces, the part in
    flight fails, later parts get their own frames."""
    factory = FlakyFactory(block_ids=block_ids)
    clock = ManualClock()  # the grab thread's timeouts follow it: no race between this thread and the grab thread
    cam = Camera(fake_settings(grab_timeout_ms=600), device_factory=factory, poll_ms=5,
                 clock=clock).start(require_camera=True)
    try:
        dev = factory.devices[0]
        dev.hold = True
        cam.trigger(part_id=1)
        clock.advance(0.3)  # half way through part 1's 600 ms
        cam.trigger(part_id=2)  # in flight behind the late one: its frame cannot be told from part 1's
        assert cam.get(timeout=0.05) is None  # neither has timed out: the camera's time stands still
        clock.advance(0.31)  # part 1 is past its 600 ms, part 2 (310 ms) still within its time
        timeout, stranded = next_event(cam, 3.0), next_event(cam)
        assert isinstance(timeout, GrabFailure) and timeout.kind == "timeout" and timeout.part_id == 1, timeout
        assert isinstance(stranded, GrabFailure) and stranded.kind == "error" and stranded.part_id == 2, stranded
        assert "resynchronised" in stranded.reason
        assert dev.resyncs == 1 and not dev.held  # the stream restart flushed both frames
        dev.hold = False
        for part in (3, 4, 5):
            cam.trigger(part_id=part)
            ev = next_event(cam)
            assert own_frame(ev, part, shot=part - 1) and ev.frame_id == part - 3, (part, ev)
        assert cam.get(timeout=0.05) is None
        st = cam.stats()
        assert st["resyncs"] == 1 and st["timeouts"] == 1 and st["frames"] == 3
        assert st["late_frames_discarded"] == 0 and st["unmatched_frames_discarded"] == 0
    finally:
        cam.close()


def test_a_trigger_refused_as_not_ready_does_not_shift_the_pairing():
    """A trigger that raised GrabTimeout (not ready, never fired) gives no event and leaves the count alone."""
    factory = FlakyFactory()
    cam = Camera(fake_settings(grab_timeout_ms=100), device_factory=factory, poll_ms=5).start(require_camera=True)
    try:
        dev = factory.devices[0]
        cam.trigger(part_id=1)
        assert own_frame(next_event(cam), 1, shot=0)
        dev.ready = False
        with pytest.raises(GrabTimeout, match="not ready"):
            cam.trigger(part_id=2, timeout_s=0.3)  # waits longer than grab_timeout_ms: no GrabTimeout event meanwhile
        dev.ready = True
        for part, shot in ((3, 1), (4, 2)):
            cam.trigger(part_id=part)
            assert own_frame(next_event(cam), part, shot), part
        st = cam.stats()
        assert st["timeouts"] == 0 and st["resyncs"] == 0 and st["late_frames_discarded"] == 0
    finally:
        cam.close()


def test_a_frame_no_trigger_accounts_for_or_an_uncertain_trigger_resynchronises_the_stream():
    """An untriggered frame, or a trigger pylon failed inside, is never paired with a part: the stream restarts."""
    factory = FlakyFactory()
    cam = Camera(fake_settings(), device_factory=factory, poll_ms=5).start(require_camera=True)
    try:
        dev = factory.devices[0]
        cam.trigger(part_id=1)
        assert own_frame(next_event(cam), 1, shot=0)
        dev.push()  # a frame nobody triggered
        assert wait_until(lambda: dev.resyncs == 1), cam.stats()
        assert cam.stats()["unmatched_frames_discarded"] == 1
        cam.trigger(part_id=2)
        assert own_frame(next_event(cam), 2, shot=1)
        dev.hold, dev.trigger_error = True, True  # it fired, but pylon raised: its frame must not go to part 4
        with pytest.raises(CameraError, match="software trigger failed"):
            cam.trigger(part_id=3)
        dev.hold, dev.trigger_error = False, False
        assert wait_until(lambda: dev.resyncs == 2), cam.stats()
        dev.release()  # nothing left: the restart flushed part 3's frame
        cam.trigger(part_id=4)
        assert own_frame(next_event(cam), 4, shot=3)
        assert cam.get(timeout=0.05) is None and cam.stats()["resyncs"] == 2
    finally:
        cam.close()


class HeldPylonDevice(PylonDevice):
    """The emulator device; while ``holding`` the grab thread sees nothing, so buffers wait in pylon's queue."""

    holding = False

    def retrieve(self, timeout_ms):
        if self.holding:
            time.sleep(timeout_ms / 1000.0)
            return None
        return super().retrieve(timeout_ms)


def held_camera(folder: Path) -> tuple[Camera, list[HeldPylonDevice]]:
    devices: list[HeldPylonDevice] = []

    def factory(s):
        devices.append(HeldPylonDevice(s))
        return devices[-1]

    cam = Camera(settings(folder, grab_timeout_ms=800), device_factory=factory, poll_ms=20)
    return cam.start(require_camera=True), devices


def test_emulator_late_frame_is_discarded_and_the_next_part_gets_its_own_image(frames_dir):
    """On the emulator, a frame left in pylon's queue past its part's timeout is discarded; the next parts get theirs."""
    folder, images = frames_dir
    cam, devices = held_camera(folder)
    with cam:
        cam.trigger(part_id=1)
        first = next_event(cam)
        assert isinstance(first, Frame) and np.array_equal(first.image, images[0])
        devices[0].holding = True
        cam.trigger(part_id=2)
        timeout = next_event(cam, 3.0)
        assert isinstance(timeout, GrabFailure) and timeout.kind == "timeout" and timeout.part_id == 2
        assert devices[0].cam.NumReadyBuffers.Value == 1  # part 2's frame: late, waiting in pylon's queue
        cam.trigger(part_id=3)
        devices[0].holding = False
        got = [next_event(cam), None]
        cam.trigger(part_id=4)
        got[1] = next_event(cam)
        assert [(type(e).__name__, e.part_id) for e in got] == [("Frame", 3), ("Frame", 4)], got
        assert np.array_equal(got[0].image, images[2]) and np.array_equal(got[1].image, images[0])
        assert [e.frame_id - first.frame_id for e in got] == [2, 3]
        st = cam.stats()
        assert st["late_frames_discarded"] == 1 and st["resyncs"] == 0 and st["frames"] == 3


def test_emulator_resync_flushes_a_late_frame_the_counter_cannot_place(frames_dir):
    """On the emulator, a timeout before the stream's first frame restarts grabbing and the late frame never surfaces."""
    folder, images = frames_dir
    cam, devices = held_camera(folder)
    with cam:
        devices[0].holding = True
        cam.trigger(part_id=1)
        assert wait_until(lambda: devices[0].cam.NumReadyBuffers.Value == 1, 0.7)  # queued, not retrieved
        timeout = next_event(cam, 3.0)
        assert isinstance(timeout, GrabFailure) and timeout.kind == "timeout" and timeout.part_id == 1
        assert wait_until(lambda: cam.stats()["resyncs"] == 1), cam.stats()
        devices[0].holding = False
        assert cam.get(timeout=0.3) is None  # StopGrabbing discarded it
        cam.trigger(part_id=2)
        frame = next_event(cam)
        assert isinstance(frame, Frame) and frame.part_id == 2
        assert frame.frame_id == 0 and np.array_equal(frame.image, images[0])  # a fresh stream: BlockID and replay
        st = cam.stats()
        assert st["late_frames_discarded"] == 0 and st["unmatched_frames_discarded"] == 0 and st["frames"] == 1


def test_importing_the_camera_module_does_not_import_pypylon():
    """service.camera imports pypylon only when a camera is opened."""
    code = "import sys, service.camera; print('pypylon' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
