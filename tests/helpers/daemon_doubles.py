"""Test doubles for the daemon's camera, PLC link and model, and a Daemon wired with them.

The real ROI, decide and metrics run; only the parts that touch the line are replaced. Used by the unit
tests of the wiring (tests/unit/service/test_app.py, test_paths.py, test_invariants.py) and by
integration tests that put one real part beside the doubles (test_plc_drops.py: a real PlcLink;
test_bad_frames.py: the daemon's handling of a bad frame).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from service.app import Daemon
from service.config import load_config
from service.metrics import Metrics
from service.plc import PlcEvent
from service.records import Frame, Prediction
from tests.helpers.daemon_fixtures import write_toml

CLASSES = ("good", "dirt", "scratch", "ec")


# ------------------------------------------------------------------------------------------- doubles


class FakePlc:
    """PlcLink's app-facing API, recording what the daemon does with it."""

    def __init__(self) -> None:
        self.published: list = []
        self.status: dict[str, bool] = {}
        self.events: queue.Queue = queue.Queue()
        self.connected = True
        self.stopped = False
        self.touched = 0
        self.dropped_by_reason: dict[str, int] = {}

    def stats(self) -> dict:
        return {"dropped_by_reason": dict(self.dropped_by_reason)}

    def publish(self, verdict, arrival=None) -> bool:
        self.published.append(verdict)
        return True

    def set_status(self, **bits) -> None:
        self.status.update({k: v for k, v in bits.items() if v is not None})

    def touch(self) -> None:
        self.touched += 1

    def next_event(self, timeout=None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def take_dropped_parts(self) -> list:
        out, self.dropped_parts = list(getattr(self, "dropped_parts", [])), []
        return out

    def stop(self, timeout: float = 5.0) -> bool:
        self.stopped = True
        return True

    def by_part(self) -> dict[int, list]:
        out: dict[int, list] = {}
        for v in self.published:
            out.setdefault(v.part_id, []).append(v)
        return out


class FakeCamera:
    def __init__(self, fail: Exception | None = None) -> None:
        self.triggers: list[int | None] = []
        self.connected = True
        self.closed = False
        self.fail = fail

    def trigger(self, part_id=None, timeout_s=None) -> None:
        if self.fail is not None:
            raise self.fail
        self.triggers.append(part_id)

    def close(self) -> None:
        self.closed = True


class FakeModel:
    """Predicts ``slice_classes`` (one class name per slice; default all good) with p = 0.97."""

    classes = CLASSES
    segmented = np.array([False, True, True, False])

    def __init__(self, slice_classes: list[str] | None = None, error: Exception | None = None) -> None:
        self.slice_classes = slice_classes
        self.error = error
        self.calls = 0

    def run(self, slices: np.ndarray) -> Prediction:
        self.calls += 1
        if self.error is not None:
            raise self.error
        n = slices.shape[0]
        names = self.slice_classes or ["good"] * n
        probs = np.full((n, len(CLASSES)), 0.01, dtype=np.float32)
        for i, name in enumerate(names):
            probs[i, CLASSES.index(name)] = 0.97
        sal = np.zeros((n, 192, 192), dtype=np.float32)
        sal[:, 60:100, 60:100] = 1.0  # a blob: Otsu gives a 40x40 mask
        return Prediction(logits=np.log(probs), probs=probs, saliency=sal, classes=CLASSES)


# ------------------------------------------------------------------------------------------- helpers


def make_settings(tmp_path: Path, **sections: dict):
    """Settings from a file: the demo line (emulator, simulated PLC) unless the sections say otherwise."""
    base = {"archive": {"enabled": False}, "metrics": {"enabled": False}, "ui": {"enabled": False},
            "camera": {"source": "emulator"}, "plc": {"mode": "simulated"}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return load_config(write_toml(tmp_path / "cfg.toml", base), env={})


def make_daemon(tmp_path: Path, model: FakeModel | None = None, cam: FakeCamera | None = None,
                **sections: dict) -> Daemon:
    d = Daemon(make_settings(tmp_path, **sections), metrics=Metrics(CollectorRegistry()))
    d.plc = FakePlc()
    d.camera = cam or FakeCamera()
    d.model = model or FakeModel()
    d.thresholds = {"dirt": 0.5, "scratch": 0.5, "ec": 0.5}
    return d


def part_event(part_id: int, enable: bool = True) -> PlcEvent:
    return PlcEvent("part", time.monotonic(), part_id=part_id, enable=enable)


def parts_metric(d: Daemon, verdict: str) -> float:
    return d.metrics.value("valve_inspect_parts_total", {"verdict": verdict})


def drain_worker(d: Daemon) -> None:
    """Run the inspection worker over what is queued, then end it."""
    t = threading.Thread(target=d._worker)
    t.start()
    d._jobs.put(None, timeout=10.0)
    t.join(20.0)
    assert not t.is_alive()


def frame(image: np.ndarray, part_id: int | None, frame_id: int = 7) -> Frame:
    return Frame(image=image, frame_id=frame_id, arrival=time.monotonic(), part_id=part_id)


def dark() -> np.ndarray:
    return np.full((2048, 2448), 9, dtype=np.uint8)
