"""Frames that arrive wrong (size, pixel format, truncated buffer) are answered NotInspected with a named
reason, counted and logged: through the real pylon emulator where it can produce them, with a test double
where it cannot (a truncated buffer that pylon still calls a success)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from service.camera import Camera, GrabFailure, PylonDevice, RawGrab
from service.config import CameraSettings
from service.errors import BadFrame
from service.metrics import Metrics
from service.records import Frame

W, H = 2448, 2048


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-frames")
    img = np.full((H, W), 90, np.uint8)
    img[800:1200, 600:1800] = 200
    assert cv2.imwrite(str(folder / "frame_00.png"), img)
    return folder


def emulator_settings(folder: Path, **camera) -> CameraSettings:
    return CameraSettings(**{"source": "emulator", "images": str(folder), "reconnect_min_s": 0.05,
                             "reconnect_max_s": 0.2, "grab_timeout_ms": 2000, **camera})


class ReconfiguredDevice(PylonDevice):
    """The emulator, configured by the daemon, then changed behind its back (as pylon Viewer or another
    program could): ``changes`` are node -> value, applied with grabbing stopped."""

    changes: dict = {}

    def __init__(self, settings: CameraSettings) -> None:
        super().__init__(settings)
        self.cam.StopGrabbing()
        for node, value in self.changes.items():
            getattr(self.cam, node).SetValue(value)
        self.cam.StartGrabbing(self._pylon.GrabStrategy_OneByOne, self._pylon.GrabLoop_ProvidedByUser)


def grab_one(folder: Path, changes: dict, part_id: int = 7) -> tuple[object, Metrics, list[dict]]:
    metrics = Metrics(CollectorRegistry())
    device = type("Dev", (ReconfiguredDevice,), {"changes": changes})
    with structlog.testing.capture_logs() as logs, \
            Camera(emulator_settings(folder), metrics=metrics, device_factory=device).start(require_camera=True) as cam:
        cam.trigger(part_id=part_id)
        ev = cam.get(timeout=5.0)
        stats = cam.stats()
    assert ev is not None, stats
    return ev, metrics, [e for e in logs if e["event"] == "camera_bad_frame"]


@pytest.mark.parametrize(("changes", "reason", "words"), [
    ({"PixelFormat": "Mono16"}, "wrong_pixel_format", "not Mono8"),
    ({"Width": 1024}, "wrong_size", "1024x2048"),
])
def test_the_emulator_changed_behind_the_daemon_gives_a_named_bad_frame(frames, changes, reason, words):
    """A Mono16 or a 1024-wide frame from the real emulator is a GrabFailure named for what is wrong,
    counted in valve_inspect_camera_bad_frames_total{reason} and logged with the part it was for."""
    ev, metrics, logs = grab_one(frames, changes)
    assert isinstance(ev, GrabFailure) and isinstance(ev.error, BadFrame), ev
    assert ev.kind == reason and ev.part_id == 7 and words in ev.reason, ev.reason
    assert metrics.value("valve_inspect_camera_bad_frames_total", {"reason": reason}) == 1.0
    others = {"wrong_size", "wrong_pixel_format", "truncated"} - {reason}
    assert all(metrics.value("valve_inspect_camera_bad_frames_total", {"reason": r}) == 0.0 for r in others)
    assert [(e["reason"], e["part_id"]) for e in logs] == [(reason, 7)]


def test_the_unchanged_emulator_frame_is_not_flagged(frames):
    """The control: the same device class with no change delivers the frame (the checks do not misfire)."""
    ev, metrics, logs = grab_one(frames, {})
    assert isinstance(ev, Frame) and ev.image.shape == (H, W) and ev.part_id == 7
    assert logs == [] and metrics.value("valve_inspect_camera_bad_frames_total", {"reason": "wrong_size"}) == 0.0


class OneShotDevice:
    """A device double that answers each software trigger with the RawGrab it was given."""

    info = {"model": "double", "serial": "0", "device_class": "test"}

    def __init__(self, grab: RawGrab) -> None:
        self.grab = grab
        self.pending: list[RawGrab] = []

    def retrieve(self, timeout_ms):
        if self.pending:
            return self.pending.pop(0)
        time.sleep(timeout_ms / 1000.0)
        return None

    def trigger(self, timeout_ms):
        self.pending.append(self.grab)

    def resync(self):
        self.pending.clear()

    def is_removed(self):
        return False

    def get_feature(self, name):
        return 0

    def set_feature(self, name, value):
        pass

    def execute(self, name):
        pass

    def close(self):
        pass


@pytest.mark.parametrize(("grab", "reason"), [
    (RawGrab(True, np.zeros((8, 8), np.uint8), 0, payload_size=40), "truncated"),
    (RawGrab(True, np.zeros((8, 8), np.uint16), 0), "wrong_pixel_format"),
    (RawGrab(True, np.zeros((8, 8, 3), np.uint8), 0), "wrong_pixel_format"),
    (RawGrab(True, np.zeros((4, 8), np.uint8), 0, payload_size=32), "wrong_size"),
])
def test_a_device_double_covers_what_the_emulator_cannot_produce(grab, reason):
    """A buffer pylon calls a success but that holds 40 of 64 bytes is truncated; a uint16 or colour array is
    the wrong pixel format; a short frame is the wrong size: each named, counted, and the part failed."""
    metrics = Metrics(CollectorRegistry())
    s = emulator_settings(Path("."), images="", width=8, height=8)
    with Camera(s, metrics=metrics, device_factory=lambda _s: OneShotDevice(grab)).start(require_camera=True) as cam:
        cam.trigger(part_id=3)
        ev = cam.get(timeout=5.0)
    assert isinstance(ev, GrabFailure) and ev.kind == reason and ev.part_id == 3, ev
    assert metrics.value("valve_inspect_camera_bad_frames_total", {"reason": reason}) == 1.0


def test_a_bad_frame_reaches_the_plc_as_not_inspected_with_its_reason(tmp_path):
    """The daemon answers the part of a bad frame NotInspected, reason camera_<what is wrong>, never Accept."""
    from tests.helpers.daemon_doubles import make_daemon, part_event

    d = make_daemon(tmp_path)
    d._on_plc_event(part_event(41))
    err = BadFrame("wrong_size", "frame is 1024x2048, not 2448x2048")
    d._on_camera_event(GrabFailure(error=err, arrival=time.monotonic(), frame_id=5, part_id=41))
    (verdict,) = d.plc.published
    assert verdict.part_id == 41 and verdict.not_inspected and not verdict.accept
    assert verdict.reason == "camera_wrong_size"


def test_bad_frame_reasons_are_a_closed_set():
    """A BadFrame must name one of the known reasons (the metric's label values)."""
    with pytest.raises(ValueError, match="reason must be one of"):
        BadFrame("odd", "x")
