"""The paths on which a result can be lost, each forced against a real Snap7 server (service.sim.plc_sim's
PlcSimulator on a free 127.0.0.1 port): the link's event queue overflowing (a dropped PartId event is
answered NotInspected "event_overflow", or counted when too late), its result queue overflowing
(queue_full), a failed result write (write_failed, never replayed) and an invalid record (invalid).
"""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from service.app import Daemon
from service.metrics import Metrics
from service.plc import PlcEvent, PlcLink, unpack_result
from service.records import Verdict
from service.sim.plc_sim import PlcSimulator
from tests.helpers.daemon_doubles import FakeCamera, FakeModel, FakePlc, frame, make_settings
from tests.helpers.daemon_fixtures import wait_until
from tests.integration.test_plc import make_link

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sim():
    s = PlcSimulator(port=0, rate=0, heartbeat_interval_s=0.05, watchdog_s=5.0, vision_watchdog_s=5.0).start()
    yield s
    s.stop()


def detect(sim: PlcSimulator, link: PlcLink, n: int) -> list[int]:
    """Write n new PartIds, each once the link has seen the one before (so none is overwritten unseen)."""
    pids = []
    for _ in range(n):
        before = link.stats()["parts_detected"]
        pids.append(sim.new_part())
        assert wait_until(lambda b=before: link.stats()["parts_detected"] == b + 1, 3.0), link.stats()
    return pids


def outcome(sim: PlcSimulator, pid: int):
    return next((o for o in list(sim.outcomes) if o.part_id == pid), None)


# ------------------------------------------------------------------------------------------- event queue


def test_a_full_event_queue_keeps_the_dropped_part_ids(sim):
    """event_queue_max = 2 and nobody reading: the link and enable events, then the oldest PartIds, are dropped;
    each dropped PartId is kept (take_dropped_parts, once), counted and logged, the newest stay queued."""
    link = make_link(sim, event_queue_max=2).start()
    try:
        assert link.wait_connected(5)
        assert wait_until(lambda: link.events.qsize() == 2, 2.0)  # link up + enable
        pids = detect(sim, link, 5)
        s = link.stats()
        assert s["events_dropped"] == 5 and s["part_events_dropped"] == 3
        dropped = link.take_dropped_parts()
        assert [e.part_id for e in dropped] == pids[:3] and all(e.kind == "part" and e.at > 0 for e in dropped)
        assert link.take_dropped_parts() == []
        queued = [link.next_event(timeout=0.5) for _ in range(2)]
        assert [e.part_id for e in queued] == pids[3:]
    finally:
        link.stop()


def test_daemon_answers_part_ids_dropped_from_the_event_queue_not_inspected(sim, tmp_path):
    """Through the daemon, against the real server: with event_queue_max = 1 and the control loop not yet
    running, three PartIds arrive; the two whose events were dropped are answered NotInspected
    "event_overflow" (written to the PLC, not left to its watchdog), the third goes the normal way."""
    d = Daemon(make_settings(tmp_path, pipeline={"part_timeout_s": 1.0, "trigger_window_ms": 500}),
               metrics=Metrics(CollectorRegistry()))
    d.camera, d.model = FakeCamera(), FakeModel()
    d.thresholds = {"dirt": 0.5, "scratch": 0.5, "ec": 0.5}
    d.plc = make_link(sim, event_queue_max=1).start()
    try:
        assert d.plc.wait_connected(5)
        pids = detect(sim, d.plc, 3)
        assert d.plc.stats()["part_events_dropped"] == 2
        t = threading.Thread(target=d._control, daemon=True)
        t.start()
        try:
            assert wait_until(lambda: all(outcome(sim, p) for p in pids), 4.0), list(sim.outcomes)
        finally:
            d.request_stop()
            t.join(2.0)
        got = {p: outcome(sim, p).got for p in pids}
        assert got == {pids[0]: "not_inspected", pids[1]: "not_inspected", pids[2]: "not_inspected"}, got
        assert d.camera.triggers == [pids[2]]  # the dropped ones were never triggered: too late to image them
        assert sim.stats()["watchdog_rejects"] == 0 and sim.stats()["late_results"] == 0
        assert d.stats.verdicts["not_inspected"] == 3
        assert d.metrics.value("valve_inspect_parts_total", {"verdict": "not_inspected"}) == 3
    finally:
        d.plc.stop()


def test_a_dropped_part_id_past_its_deadline_is_counted_not_answered(tmp_path):
    """A dropped PartId found only after part_timeout_s (the PLC's watchdog has rejected it) is counted in
    valve_inspect_plc_results_dropped_total{reason="event_overflow"}, not answered late; one still in time
    is answered NotInspected."""
    d = Daemon(make_settings(tmp_path), metrics=Metrics(CollectorRegistry()))
    d.plc, d.camera, d.model = FakePlc(), FakeCamera(), FakeModel()
    now = time.monotonic()
    d.plc.dropped_parts = [PlcEvent("part", now - 60.0, part_id=5), PlcEvent("part", now, part_id=6)]
    d._answer_dropped_part_events()
    assert [(v.part_id, v.reason, v.not_inspected) for v in d.plc.published] == [(6, "event_overflow", True)]
    assert d.metrics.value("valve_inspect_plc_results_dropped_total", {"reason": "event_overflow"}) == 1


# ------------------------------------------------------------------------------------------- result paths


def test_a_full_result_queue_drops_the_oldest_queued_result(sim):
    """result_queue_max = 1 with a result already being held back by min_result_interval_s: each further
    publish drops the oldest queued one (queue_full, counted); the newest is written; the dropped parts are
    left to the PLC's watchdog, never written late."""
    link = make_link(sim, result_queue_max=1, min_result_interval_s=1.0).start()
    try:
        assert link.wait_connected(5)
        a, b, c, e = detect(sim, link, 4)
        link.publish(Verdict(part_id=a, accept=True))
        assert wait_until(lambda: sim.stats()["results"] == 1, 2.0)
        for pid in (b, c, e):  # within the 1 s after a's write: b and c queue behind and are pushed out
            link.publish(Verdict(part_id=pid, reject_dirt=True))
        assert link.stats()["dropped_by_reason"] == {"queue_full": 2}
        assert wait_until(lambda: sim.stats()["results"] == 2, 3.0)
        assert unpack_result(sim.snapshot(), base=0).result_part_id == e
        assert outcome(sim, b) is None and outcome(sim, c) is None
        assert link.stats()["results_dropped"] == 2 and sim.stats()["seq_gaps"] == 0
    finally:
        link.stop()


class _FailingResultWrites:
    """A real snap7 client whose next ``fail`` result writes raise, as a dropped connection does."""

    def __init__(self, fail: int = 1) -> None:
        import snap7

        self._client = snap7.client.Client()
        self.fail = fail

    def db_write(self, db, start, data):
        if start == 12 and self.fail > 0:
            self.fail -= 1
            raise RuntimeError("ISO: connection reset by peer")
        return self._client.db_write(db, start, data)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_failed_result_write_is_counted_and_never_replayed(sim):
    """The result write raises: the result is dropped (write_failed), the link reconnects, and that part is
    never written late on the new connection (the PLC's watchdog has it); the next part's result lands."""
    clients: list[_FailingResultWrites] = []

    def factory():
        clients.append(_FailingResultWrites(fail=1 if not clients else 0))
        return clients[-1]

    link = make_link(sim, client_factory=factory).start()
    try:
        assert link.wait_connected(5)
        (a,) = detect(sim, link, 1)
        assert link.publish(Verdict(part_id=a, accept=True))
        assert wait_until(lambda: link.stats()["reconnects"] == 1 and link.connected, 5.0), link.stats()
        assert link.stats()["dropped_by_reason"] == {"write_failed": 1}
        link.publish(Verdict(part_id=a, accept=True))  # a second attempt for the same part: stale, dropped
        (b,) = detect(sim, link, 1)
        link.publish(Verdict(part_id=b, reject_scratch=True))
        assert wait_until(lambda: sim.stats()["results"] == 1, 3.0)
        assert unpack_result(sim.snapshot(), base=0).result_part_id == b
        assert link.stats()["dropped_by_reason"] == {"write_failed": 1, "stale_epoch": 1}
        assert outcome(sim, a) is None
    finally:
        link.stop()


def test_an_invalid_record_is_dropped_and_the_link_stays_up(sim):
    """A record whose bits were bent behind Verdict's back (Accept + NotInspected) is refused by pack_result
    inside the link: dropped as invalid, nothing written, the link stays up and the next result lands."""
    link = make_link(sim).start()
    try:
        assert link.wait_connected(5)
        a, b = detect(sim, link, 2)
        bent = Verdict.make_not_inspected(a, "timeout_no_frame")
        object.__setattr__(bent, "accept", True)
        link.publish(bent)
        link.publish(Verdict(part_id=b, accept=True))
        assert wait_until(lambda: sim.stats()["results"] == 1, 3.0)
        assert unpack_result(sim.snapshot(), base=0).result_part_id == b
        assert link.stats()["dropped_by_reason"] == {"invalid": 1}
        assert link.connected and link.stats()["reconnects"] == 0 and outcome(sim, a) is None
    finally:
        link.stop()


# ------------------------------------------------------------------------------------------- link loss, each path forced


class _HeldModel(FakeModel):
    """Inference waits until the test releases it: the test decides whether the link drops before or after."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, slices):
        self.started.set()
        assert self.release.wait(10)
        return super().run(slices)


@pytest.fixture
def line(sim, tmp_path, valve_image):
    """A daemon (control loop and one worker running) with a real PlcLink to ``sim``; fake camera and model.
    ``line.part(pid)`` announces a part on the PLC and delivers its frame once the daemon has triggered it."""
    model = _HeldModel()
    d = Daemon(make_settings(tmp_path, pipeline={"part_timeout_s": 4.0, "trigger_window_ms": 1000},
                             plc={"sim_watchdog_s": 6.0}),
               metrics=Metrics(CollectorRegistry()))
    d.camera, d.model = FakeCamera(), model
    d.thresholds = {"dirt": 0.5, "scratch": 0.5, "ec": 0.5}
    d.plc = make_link(sim)
    d.plc.start()
    assert d.plc.wait_connected(5)
    threads = [threading.Thread(target=d._control, daemon=True), threading.Thread(target=d._worker, daemon=True)]
    for t in threads:
        t.start()

    def part() -> int:
        pid = sim.new_part()
        assert wait_until(lambda: pid in d.camera.triggers, 3.0), d.camera.triggers
        d._on_camera_event(frame(valve_image, pid))
        return pid

    d.part = part
    yield d
    model.release.set()
    d.request_stop()
    d._jobs.put(None)
    for t in threads:
        t.join(3.0)
    d.plc.stop()


def _drops(d) -> dict:
    d._sync_plc_drops()
    return {r: d.metrics.value("valve_inspect_plc_results_dropped_total", {"reason": r})
            for r in ("link_down", "stale_epoch") if d.metrics.value("valve_inspect_plc_results_dropped_total",
                                                                      {"reason": r})}


def test_result_ready_while_the_link_is_down_is_dropped_never_replayed(sim, line):
    """Forced order: the part is announced and its inspection started, the cable is pulled, the result is
    ready while the link is down (dropped: link_down), the cable comes back: the result is never written, the
    PLC's watchdog rejects the part, and the next part is answered on the new connection."""
    d = line
    pid = d.part()
    assert d.model.started.wait(5)
    sim.stop_server()
    assert wait_until(lambda: not d.plc.connected, 5.0)
    d.model.release.set()
    assert wait_until(lambda: d.plc.stats()["dropped_by_reason"].get("link_down") == 1, 3.0), d.plc.stats()
    sim.start_server()
    assert wait_until(lambda: d.plc.connected, 5.0)
    nxt = d.part()
    assert wait_until(lambda: outcome(sim, nxt) is not None and outcome(sim, pid) is not None, 8.0)
    assert outcome(sim, pid).got == "timeout" and outcome(sim, nxt).got == "accept"
    assert sim.stats()["late_results"] == 0 and sim.stats()["results"] == 1
    assert _drops(d) == {"link_down": 1}


def test_result_ready_after_the_reconnect_is_dropped_as_stale(sim, line):
    """Forced order: inspection started, cable pulled and plugged back in, then the result is ready: it belongs
    to the old connection (stale_epoch), is dropped and never written; the PLC's watchdog has the part."""
    d = line
    pid = d.part()
    assert d.model.started.wait(5)
    sim.stop_server()
    assert wait_until(lambda: not d.plc.connected, 5.0)
    sim.start_server()
    assert wait_until(lambda: d.plc.connected, 5.0)
    d.model.release.set()
    assert wait_until(lambda: d.plc.stats()["dropped_by_reason"].get("stale_epoch") == 1, 3.0), d.plc.stats()
    assert wait_until(lambda: outcome(sim, pid) is not None, 8.0)
    assert outcome(sim, pid).got == "timeout" and sim.stats()["results"] == 0
    assert _drops(d) == {"stale_epoch": 1}


def test_result_written_before_the_link_drops_is_not_written_again(sim, line):
    """Forced order: the result is written, then the cable is pulled and plugged back in: the part has exactly
    one result (no replay after the reconnect) and nothing is counted dropped."""
    d = line
    d.model.release.set()
    pid = d.part()
    assert wait_until(lambda: outcome(sim, pid) is not None, 5.0)
    sim.stop_server()
    assert wait_until(lambda: not d.plc.connected, 5.0)
    sim.start_server()
    assert wait_until(lambda: d.plc.connected, 5.0)
    nxt = d.part()
    assert wait_until(lambda: outcome(sim, nxt) is not None, 5.0)
    assert sim.stats()["results"] == 2 and sim.stats()["duplicate_results"] == 0
    assert [o.part_id for o in sim.outcomes] == [pid, nxt]
    assert _drops(d) == {}


def test_line_plc_binds_a_free_port_itself_and_keeps_it_across_a_restart():
    """The test PLC binds port 0 (no free_port() picked, released and raced for) and re-binds the same port
    when the cable is plugged back in, so a link reconnects to it."""
    from tests.helpers.daemon_fixtures import LinePlc

    plc = LinePlc()
    assert plc.port == 0
    with plc:
        port = plc.port
        assert port > 0
        link = PlcLink(host="127.0.0.1", port=port, db=100, poll_interval_s=0.01, reconnect_min_s=0.05,
                       reconnect_max_s=0.2).start()
        try:
            assert link.wait_connected(5)
            plc.stop_server()
            assert wait_until(lambda: not link.connected, 5.0)
            plc.start_server()
            assert plc.port == port
            assert wait_until(lambda: link.connected, 5.0) and link.stats()["reconnects"] == 1
        finally:
            link.stop()
