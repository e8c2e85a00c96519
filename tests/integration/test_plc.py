"""service.plc: the interface table, packing, and PlcLink against a real Snap7 server; the artifacts that
tools/plc_artifacts.py generates from the table."""

from __future__ import annotations

import doctest
import itertools
import math
import struct
import time

import pytest
import snap7
from hypothesis import given, settings
from hypothesis import strategies as st

import service.plc as plc
import tools.plc_artifacts as artifacts
from service.errors import ConfigError
from service.plc import (
    DB_SIZE,
    LAYOUT,
    RESULT_SIZE,
    RESULT_START,
    STATUS_SIZE,
    STATUS_START,
    PlcInputs,
    PlcLink,
    VisionStatus,
    pack_inputs,
    pack_result,
    pack_status,
    unpack_inputs,
    unpack_result,
    unpack_status,
    wrap_dint,
)
from service.records import Verdict
from service.sim.plc_sim import PlcSimulator
from tests.helpers.daemon_fixtures import free_port, wait_until
from tools.plc_artifacts import classic_layout, parse_udt_source

pytestmark = pytest.mark.timeout(30)

# The interface as specified (docs/plc-interface.md); LAYOUT must match it exactly.
SPEC = [
    ("Enable", "0.0", "Bool"), ("PlcHeartbeat", "2", "Int"), ("PartId", "4", "DInt"),
    ("VisionHeartbeat", "8", "Int"), ("Ready", "10.0", "Bool"), ("CameraOk", "10.1", "Bool"),
    ("ModelOk", "10.2", "Bool"), ("GpuActive", "10.3", "Bool"), ("Fault", "10.4", "Bool"), ("Simulated", "10.5", "Bool"),
    ("ResultSeq", "12", "DInt"), ("ResultPartId", "16", "DInt"), ("FrameId", "20", "DInt"),
    ("Accept", "24.0", "Bool"), ("RejectDirt", "24.1", "Bool"), ("RejectScratch", "24.2", "Bool"),
    ("RejectEC", "24.3", "Bool"), ("RejectUnknown", "24.4", "Bool"), ("NoPart", "24.5", "Bool"),
    ("NotInspected", "24.6", "Bool"), ("DirtAreaPx", "26", "DInt"), ("ScratchAreaPx", "30", "DInt"),
    ("ScoreDirt", "34", "Real"), ("ScoreScratch", "38", "Real"), ("ScoreEC", "42", "Real"),
    ("InspectMs", "46", "Real"),
]

VERDICT_BITS = ["accept", "reject_dirt", "reject_scratch", "reject_ec", "reject_unknown", "no_part", "not_inspected"]


def next_part(link: PlcLink, timeout: float = 2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = link.next_event(timeout=max(0.0, end - time.monotonic()))
        if ev is not None and ev.kind == "part":
            return ev
    return None


def wait_for_a_full_poll(sim: PlcSimulator, link: PlcLink, timeout: float = 5.0) -> bool:
    """True once the link has finished a poll of the DB as it is now (every event of that poll is queued).

    The simulator's PlcHeartbeat only grows (20 per second here, far from the wrap): a poll that read a value
    above the one current now read the DB after this call; a later poll that read a value above the one
    current once the first was seen is a different poll, so the first one had finished.
    """
    for _ in range(2):
        now = sim.stats()["plc_heartbeat"]
        if not wait_until(lambda now=now: (link.stats()["plc_heartbeat"] or 0) > now, timeout):
            return False
    return True


@pytest.fixture
def sim():
    s = PlcSimulator(port=0, rate=0, heartbeat_interval_s=0.05, watchdog_s=1.0, vision_watchdog_s=1.0).start()
    yield s
    s.stop()


def make_link(sim: PlcSimulator, **kw) -> PlcLink:
    args = dict(host="127.0.0.1", port=sim.port, db=sim.db, poll_interval_s=0.01, status_interval_s=0.25,
                reconnect_min_s=0.05, reconnect_max_s=0.2, min_result_interval_s=0.0, plc_heartbeat_timeout_s=3.0)
    args.update(kw)
    return PlcLink(**args)


@pytest.fixture
def link(sim):
    lk = make_link(sim).start()
    assert lk.wait_connected(5), lk.stats()
    yield lk
    lk.stop()


# ------------------------------------------------------------------------------------------- the table


def test_layout_is_exactly_the_specified_interface():
    """LAYOUT lists the specified members at the specified addresses and types, in order, in a 50-byte DB."""
    assert [(f.name, f.address, f.s7type) for f in LAYOUT] == SPEC
    assert DB_SIZE == 50 and (STATUS_START, STATUS_SIZE, RESULT_START, RESULT_SIZE) == (8, 4, 12, 38)
    dirs = {f.name: f.direction for f in LAYOUT}
    assert {n for n, d in dirs.items() if d == plc.PLC_TO_VISION} == {"Enable", "PlcHeartbeat", "PartId"}


def test_layout_offsets_are_what_tia_assigns_in_a_standard_access_db():
    """The UDT's member order and types give exactly LAYOUT's offsets under non-optimised layout rules."""
    placed, size = classic_layout((f.name, f.s7type) for f in LAYOUT)
    assert placed == [(f.name, f.offset, f.bit) for f in LAYOUT]
    assert size == DB_SIZE


def test_docs_table_and_tia_sources_agree_with_layout():
    """docs/plc-interface.md's table and deploy/plc's UDT and DB sources are what LAYOUT generates."""
    assert artifacts.artifact_problems() == []
    udt = (artifacts.REPO_ROOT / artifacts.UDT_PATH).read_text(encoding="utf-8")
    assert parse_udt_source(udt) == [(f.name, f.s7type) for f in LAYOUT]
    db = (artifacts.REPO_ROOT / artifacts.DB_PATH).read_text(encoding="utf-8")
    assert 'DATA_BLOCK "Vision"' in db and "S7_Optimized_Access := 'FALSE'" in db
    assert "NON_RETAIN" in db and '"VisionInterface"' in db
    docs = (artifacts.REPO_ROOT / artifacts.DOCS_PATH).read_text(encoding="utf-8")
    for f in LAYOUT:
        assert f"| {f.address} | DB100." in docs and f"| {f.name} | {f.s7type} |" in docs


def test_artifact_check_reports_a_drifted_docs_table(tmp_path):
    """--check names the file and the fix when the docs table no longer matches LAYOUT."""
    for rel in (artifacts.UDT_PATH, artifacts.DB_PATH, artifacts.DOCS_PATH):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((artifacts.REPO_ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    docs = tmp_path / artifacts.DOCS_PATH
    docs.write_text(docs.read_text(encoding="utf-8").replace("| 26 | DB100.DBD26", "| 28 | DB100.DBD28"),
                    encoding="utf-8")
    problems = artifacts.artifact_problems(tmp_path)
    assert len(problems) == 1 and "docs/plc-interface.md" in problems[0] and "--write" in problems[0]
    assert artifacts.main(["--check", "--root", str(tmp_path)]) == 1


def test_absolute_addresses_of_byte_word_and_double_word_fields():
    """absolute() spells a 1-byte field DBB, a 2-byte one DBW and a 4-byte one DBD."""
    assert plc.Field("Spare", 1, None, "Byte", plc.VISION_TO_PLC, "").absolute(100) == "DB100.DBB1"
    assert plc.FIELDS["PlcHeartbeat"].absolute(7) == "DB7.DBW2"
    assert plc.FIELDS["ScoreEC"].absolute(100) == "DB100.DBD42"


def test_module_doctests_pass():
    """The examples in service.plc's docstrings (and the artifact tool's) hold."""
    import service.plc.codec
    import service.plc.layout
    import service.plc.link

    results = [doctest.testmod(m) for m in (service.plc.layout, service.plc.codec, service.plc.link, artifacts)]
    assert sum(r.attempted for r in results) > 5 and sum(r.failed for r in results) == 0


# ------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bit_name,bit", list(zip(VERDICT_BITS, range(7), strict=True)))
def test_each_verdict_bit_lands_on_byte_24(bit_name, bit):
    """Each verdict flag sets exactly its bit of DB byte 24 (Accept -> 24.0 ... NotInspected -> 24.6)."""
    buf = pack_result(Verdict(part_id=1, **{bit_name: True}), seq=1)
    assert len(buf) == RESULT_SIZE
    assert buf[24 - RESULT_START] == 1 << bit


def test_result_fields_at_their_byte_offsets():
    """Every numeric result field is big-endian at its table offset."""
    v = Verdict(part_id=123456, frame_id=-7, reject_dirt=True, reject_scratch=True, dirt_area_px=1500,
                scratch_area_px=33, score_dirt=0.75, score_scratch=0.5, score_ec=0.125, inspect_ms=42.25)
    db = bytearray(DB_SIZE)
    db[RESULT_START:] = pack_result(v, seq=99)
    assert struct.unpack_from(">i", db, 12)[0] == 99
    assert struct.unpack_from(">i", db, 16)[0] == 123456
    assert struct.unpack_from(">i", db, 20)[0] == -7
    assert db[24] == 0b110 and db[25] == 0
    assert struct.unpack_from(">ii", db, 26) == (1500, 33)
    assert struct.unpack_from(">ffff", db, 34) == (0.75, 0.5, 0.125, 42.25)
    assert pack_result(v, seq=1, inspect_ms=7.5)[46 - RESULT_START:] == struct.pack(">f", 7.5)


def test_status_and_inputs_at_their_byte_offsets():
    """Status: heartbeat at 8, bits 10.0..10.4; inputs: Enable 0.0, PlcHeartbeat 2, PartId 4."""
    st_ = pack_status(-2, VisionStatus(ready=True, camera_ok=False, model_ok=True, gpu_active=False, fault=True))
    assert bytes(st_) == struct.pack(">h", -2) + bytes([0b10101, 0])
    assert bytes(pack_inputs(PlcInputs(True, 300, 70000))) == b"\x01\x00" + struct.pack(">hi", 300, 70000)


def test_not_inspected_can_never_be_packed_as_accept():
    """A record whose bits claim both NotInspected and Accept is refused instead of written."""
    v = Verdict.make_not_inspected(part_id=5, reason="timeout")
    object.__setattr__(v, "accept", True)  # bypass Verdict's own check, as a buggy caller might
    with pytest.raises(ValueError, match="exactly one of"):
        pack_result(v, seq=1)


def test_counters_wrap_and_areas_saturate():
    """ResultSeq wraps like a DInt; pixel areas saturate instead of turning negative."""
    buf = pack_result(Verdict(part_id=1, reject_dirt=True, dirt_area_px=2**40), seq=2**31)
    r = unpack_result(buf)
    assert r.result_seq == -(2**31) and r.dirt_area_px == 2**31 - 1
    assert wrap_dint(r.result_seq - 1) == 2**31 - 1


def test_unpack_names_the_wrong_buffer():
    """Unpacking too short a buffer says which DB bytes were needed and how to pass them."""
    with pytest.raises(ValueError, match=r"need DB bytes 12\.\.49"):
        unpack_result(bytes(10))


def test_scratch_area_saturates_like_the_dirt_area():
    """Both pixel areas saturate at 0..2**31-1 instead of wrapping negative."""
    r = unpack_result(pack_result(Verdict(part_id=1, reject_scratch=True, scratch_area_px=2**40), seq=1))
    assert r.scratch_area_px == 2**31 - 1


@pytest.mark.parametrize("unpack, need", [(unpack_inputs, "0..7"), (unpack_status, "8..11"),
                                          (unpack_result, "12..49")])
def test_unpack_errors_name_the_function_and_the_bytes(unpack, need):
    """Each unpacker's error names itself and the DB bytes it needed."""
    with pytest.raises(ValueError, match=rf"^{unpack.__name__}: need DB bytes {need}, got 3 bytes"):
        unpack(bytes(3))


f32 = st.floats(width=32, allow_nan=False)
dint = st.integers(-(2**31), 2**31 - 1)


@st.composite
def verdicts(draw):
    kind = draw(st.sampled_from(["accept", "reject", "no_part", "not_inspected"]))
    if kind == "reject":
        names = ["reject_dirt", "reject_scratch", "reject_ec", "reject_unknown"]
        flags = {n: True for n in draw(st.lists(st.sampled_from(names), min_size=1, unique=True))}
    else:
        flags = {kind: True}
    return Verdict(part_id=draw(dint), frame_id=draw(dint), dirt_area_px=draw(st.integers(0, 2**31 - 1)),
                   scratch_area_px=draw(st.integers(0, 2**31 - 1)), score_dirt=draw(f32), score_scratch=draw(f32),
                   score_ec=draw(f32), inspect_ms=draw(f32), **flags)


@settings(max_examples=200, deadline=None)
@given(v=verdicts(), seq=dint)
def test_result_round_trip(v, seq):
    """unpack_result(pack_result(v, seq)) gives back every field of the verdict and the sequence number."""
    r = unpack_result(pack_result(v, seq))
    assert r.result_seq == seq and r.result_part_id == v.part_id and r.frame_id == v.frame_id
    for name in VERDICT_BITS + ["dirt_area_px", "scratch_area_px", "score_dirt", "score_scratch", "score_ec",
                                "inspect_ms"]:
        assert getattr(r, name) == getattr(v, name), name
    assert r.consistent and r.label == v.label
    # and the same from a whole-DB buffer
    db = bytes(RESULT_START) + bytes(pack_result(v, seq))
    assert unpack_result(db, base=0) == r


@settings(max_examples=200, deadline=None)
@given(hb=st.integers(-(2**15), 2**15 - 1), bits=st.tuples(*[st.booleans()] * 5))
def test_status_round_trip(hb, bits):
    """unpack_status(pack_status(hb, status)) == (hb, status)."""
    status = VisionStatus(*bits)
    assert unpack_status(pack_status(hb, status)) == (hb, status)


@settings(max_examples=200, deadline=None)
@given(enable=st.booleans(), hb=st.integers(-(2**15), 2**15 - 1), pid=dint)
def test_inputs_round_trip(enable, hb, pid):
    """unpack_inputs(pack_inputs(x)) == x, from the 8-byte poll and from a whole DB."""
    x = PlcInputs(enable, hb, pid)
    assert unpack_inputs(pack_inputs(x)) == x
    assert unpack_inputs(bytes(pack_inputs(x)) + bytes(42), base=0) == x


def test_config_errors_name_the_key_and_the_fix():
    """Invalid link parameters raise ConfigError naming the key and what to use instead."""
    with pytest.raises(ConfigError, match=r"plc\.status_interval_s.*<= 1\.0"):
        PlcLink(host="10.0.0.1", status_interval_s=2.0)
    with pytest.raises(ConfigError, match="plc.host"):
        PlcLink(host="")
    with pytest.raises(ConfigError, match="reconnect_max_s"):
        PlcLink(host="10.0.0.1", reconnect_min_s=5, reconnect_max_s=1)


# ------------------------------------------------------------------------------------------- the link


def test_link_announces_each_part_id_exactly_once(sim):
    """Each new non-zero PartId becomes one 'part' event; a PartId already present at connect and a re-written
    PartId are not announced."""
    sim.new_part()  # PartId 1 is in the DB before the link connects: baseline, not announced
    lk = make_link(sim).start()
    try:
        assert lk.wait_connected(5)
        events = []
        for _ in range(5):
            pid = sim.new_part()
            while (ev := lk.next_event(timeout=2.0)) is not None:
                events.append(ev)
                if ev.kind == "part" and ev.part_id == pid:
                    break
        sim.new_part(part_id=6)  # the same PartId written again: not a new part
        assert wait_for_a_full_poll(sim, lk), lk.stats()  # the link has read it again
        while (ev := lk.next_event(timeout=0)) is not None:  # that poll's events are queued already
            events.append(ev)
        parts = [e.part_id for e in events if e.kind == "part"]
        assert parts == [2, 3, 4, 5, 6]
        assert all(e.at > 0 for e in events)
        kinds = [e.kind for e in events]
        assert kinds[:2] == ["link", "enable"] and events[0].connected and events[1].enable
        assert lk.stats()["parts_detected"] == 5
    finally:
        lk.stop()


def test_link_writes_results_with_incrementing_seq_and_exact_bytes(sim, link):
    """Three results land as three consecutive ResultSeq values with exactly pack_result's bytes in the DB."""
    verdicts_ = []
    for i, flags in enumerate([dict(accept=True), dict(reject_scratch=True, scratch_area_px=321),
                               dict(not_inspected=True)]):
        pid = sim.new_part()
        ev = next_part(link)
        assert ev is not None and ev.part_id == pid
        v = Verdict(part_id=pid, frame_id=100 + i, score_scratch=0.25 * i, inspect_ms=3.5, **flags)
        verdicts_.append(v)
        assert link.publish(v)
        assert wait_until(lambda n=i + 1: sim.stats()["results"] == n, 2.0)
        db = sim.snapshot()
        assert db[RESULT_START:] == pack_result(v, seq=i + 1)
    s = sim.stats()
    assert s["last_result_seq"] == 3 and s["seq_gaps"] == 0 and s["illegal_writes"] == 0
    assert [o.got for o in sim.outcomes] == ["accept", "scratch", "not_inspected"]
    assert link.stats()["results_written"] == 3 and link.stats()["results_dropped"] == 0


def test_inspect_ms_is_measured_from_frame_arrival_to_write(sim, link):
    """With arrival given, InspectMs is the time from the frame's arrival to the result write."""
    pid = sim.new_part()
    assert next_part(link) is not None
    arrival = time.monotonic() - 0.05
    link.publish(Verdict(part_id=pid, accept=True, inspect_ms=0.0), arrival=arrival)
    assert wait_until(lambda: sim.stats()["results"] == 1, 2.0)
    ms = unpack_result(sim.snapshot(), base=0).inspect_ms
    assert 50.0 <= ms < 1000.0


def test_numbering_continues_from_the_db_for_a_new_link(sim):
    """A second link (daemon restart) re-reads ResultSeq from the DB and continues the numbering."""
    for expected_seq in (1, 2):
        lk = make_link(sim).start()
        try:
            assert lk.wait_connected(5)
            pid = sim.new_part()
            assert next_part(lk) is not None
            lk.publish(Verdict(part_id=pid, accept=True))
            assert wait_until(lambda s=expected_seq: sim.stats()["last_result_seq"] == s, 2.0)
        finally:
            assert lk.stop(5)
        assert unpack_status(sim.snapshot(), base=0)[1].ready is False
    assert sim.stats()["seq_gaps"] == 0


def test_vision_heartbeat_increments_at_least_every_1_2_s(sim, link):
    """VisionHeartbeat in the DB changes at least once in every 1.2 s window (written every 0.25 s)."""
    first, _ = unpack_status(sim.snapshot(), base=0)
    last, t_last = first, time.monotonic()
    end = time.monotonic() + 1.3
    while time.monotonic() < end:
        hb, _ = unpack_status(sim.snapshot(), base=0)
        if hb != last:
            last, t_last = hb, time.monotonic()
        # t_last is after the write of `last`, so this is a lower bound of the time without a write
        assert time.monotonic() - t_last < 1.2
        time.sleep(0.02)  # the sampling period, not a wait for the link
    # +1 per write: counted from the values, so a sampler that falls behind still counts every write
    assert (last - first) % 65536 >= 3
    assert sim.stats()["vision_alive"] is True


def test_set_status_bits_are_written_at_once(sim):
    """set_status() updates the status bits in the DB without waiting for the next periodic write."""
    lk = make_link(sim, status_interval_s=1.0).start()
    try:
        assert lk.wait_connected(5)
        # the write every connect makes is done: the next periodic one is status_interval_s (1 s) away
        assert wait_until(lambda: lk.stats()["status_writes"] >= 1, 5.0), lk.stats()
        lk.set_status(ready=True, camera_ok=True, model_ok=True, gpu_active=False)
        want = VisionStatus(True, True, True, False, False)
        assert wait_until(lambda: unpack_status(sim.snapshot(), base=0)[1] == want, 0.5)
        lk.set_status(camera_ok=False)
        assert wait_until(lambda: unpack_status(sim.snapshot(), base=0)[1].camera_ok is False, 0.5)
    finally:
        lk.stop()


def test_stale_plc_heartbeat_sets_fault_and_clears(sim):
    """PlcHeartbeat frozen longer than the timeout sets Fault in the DB; it clears once the heartbeat moves."""
    lk = make_link(sim, plc_heartbeat_timeout_s=0.3).start()
    try:
        assert lk.wait_connected(5)
        lk.set_status(ready=True)
        fault = lambda: unpack_status(sim.snapshot(), base=0)[1].fault  # noqa: E731
        # longer than the timeout passes while the link reads a moving heartbeat (5 steps of 0.05 s at least)
        t0, hb0 = time.monotonic(), lk.stats()["plc_heartbeat"]
        assert wait_until(lambda: time.monotonic() - t0 > 0.5 and lk.stats()["plc_heartbeat"] >= hb0 + 5, 5.0)
        assert not fault() and not lk.stats()["plc_heartbeat_stale"]
        sim.freeze_heartbeat(True)
        assert wait_until(fault, 2.0)
        assert lk.stats()["plc_heartbeat_stale"] and lk.status.fault
        sim.freeze_heartbeat(False)
        assert wait_until(lambda: not fault(), 2.0)
        assert not lk.stats()["plc_heartbeat_stale"]
        assert unpack_status(sim.snapshot(), base=0)[1].ready is True
    finally:
        lk.stop()


def test_server_restart_reconnects_and_never_replays_results(sim):
    """With the server stopped mid-run the link reconnects; results published while down, or for parts
    announced before the outage, are never written (no late Accept) and ResultSeq numbering continues."""
    lk = make_link(sim).start()
    try:
        assert lk.wait_connected(5)
        p1 = sim.new_part()
        assert next_part(lk).part_id == p1
        lk.publish(Verdict(part_id=p1, accept=True))
        assert wait_until(lambda: sim.stats()["results"] == 1, 2.0)

        p2 = sim.new_part()
        assert next_part(lk).part_id == p2
        sim.stop_server()
        assert wait_until(lambda: not lk.connected, 3.0)
        assert lk.publish(Verdict(part_id=p2, accept=True)) is False  # published while down: dropped

        sim.start_server()
        assert wait_until(lambda: lk.connected, 5.0)
        lk.publish(Verdict(part_id=p2, accept=True))  # announced before the outage: stale, dropped
        p3 = sim.new_part()
        assert next_part(lk).part_id == p3
        lk.publish(Verdict(part_id=p3, reject_ec=True))
        assert wait_until(lambda: sim.stats()["results"] == 2, 2.0)
        r = unpack_result(sim.snapshot(), base=0)
        assert (r.result_seq, r.result_part_id, r.reject_ec, r.accept) == (2, p3, True, False)

        assert wait_until(lambda: sim.stats()["watchdog_rejects"] == 1, 3.0)  # p2: the PLC's watchdog
        s = sim.stats()
        assert s["accepted"] == 1 and s["seq_gaps"] == 0 and s["late_results"] == 0
        assert sorted((o.part_id, o.got) for o in sim.outcomes) == [(p1, "accept"), (p2, "timeout"), (p3, "ec")]
        ls = lk.stats()
        assert ls["reconnects"] == 1 and ls["dropped_by_reason"] == {"link_down": 1, "stale_epoch": 1}
        assert ls["result_seq"] == 2
    finally:
        lk.stop()


def test_unannounced_and_duplicate_results_are_dropped(sim, link):
    """A result for a PartId the PLC never announced, or a second result for a part, is counted, not written."""
    pid = sim.new_part()
    assert next_part(link) is not None
    link.publish(Verdict(part_id=pid, accept=True))
    link.publish(Verdict(part_id=pid, reject_dirt=True))
    link.publish(Verdict(part_id=424242, accept=True))
    assert wait_until(lambda: link.stats()["results_dropped"] == 2, 2.0)
    assert link.stats()["dropped_by_reason"] == {"duplicate": 1, "unannounced": 1}
    assert sim.stats()["results"] == 1 and sim.stats()["accepted"] == 1


def test_stop_writes_queued_results_then_ready_0(sim):
    """stop() writes results still queued (spaced by min_result_interval_s), then a status with Ready=0."""
    lk = make_link(sim, min_result_interval_s=0.05).start()
    assert lk.wait_connected(5)
    lk.set_status(ready=True, camera_ok=True)
    pids = []
    for _ in range(3):
        pids.append(sim.new_part())
        assert next_part(lk) is not None
    assert wait_until(lambda: unpack_status(sim.snapshot(), base=0)[1].ready, 1.0)
    for pid in pids:
        lk.publish(Verdict(part_id=pid, accept=True))
    assert lk.stop(5)
    assert sim.stats()["results"] == 3 and sim.stats()["seq_gaps"] == 0
    hb, status = unpack_status(sim.snapshot(), base=0)
    assert status.ready is False and status.camera_ok is True
    assert not lk.connected and lk.publish(Verdict(part_id=pids[0], accept=True)) is False


def test_connect_failures_back_off_exponentially():
    """With nothing listening the link retries with growing delays, not in a tight loop."""
    attempts: list[float] = []

    def client():  # the link makes a fresh client right before each connection attempt
        attempts.append(time.monotonic())
        return snap7.client.Client()

    lk = PlcLink(host="127.0.0.1", port=free_port(), reconnect_min_s=0.05, reconnect_max_s=0.2,
                 client_factory=client).start()
    try:
        assert wait_until(lambda: len(attempts) >= 6, 10.0), (attempts, lk.stats())
        s = lk.stats()
        # 0.05, 0.1, 0.2, 0.2, 0.2 between attempts, at least (a tight loop would be hundreds per second);
        # a slow machine only makes them longer
        gaps = [b - a for a, b in itertools.pairwise(attempts[:6])]
        for gap, backoff in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
            assert gap >= backoff * 0.9, gaps
        assert s["connect_failures"] >= 5, s
        assert not lk.connected and s["last_error"]
    finally:
        assert lk.stop(2)


def test_missing_db_error_names_the_fixes():
    """Connecting to a PLC without the interface DB reports the DB, Optimized block access and PUT/GET."""
    other = PlcSimulator(port=0, db=7, rate=0).start()
    try:
        lk = PlcLink(host="127.0.0.1", port=other.port, db=100, reconnect_min_s=0.05, reconnect_max_s=0.1).start()
        try:
            assert wait_until(lambda: lk.stats()["connect_failures"] >= 1, 3.0)
            err = lk.stats()["last_error"]
            assert "DB100" in err and "Optimized block access" in err and "PUT/GET" in err
            assert not lk.connected
        finally:
            lk.stop(2)
    finally:
        other.stop()


def test_enable_changes_are_events(sim, link):
    """Enable going to 0 and back reaches the app as 'enable' events."""
    while link.next_event(timeout=0.05) is not None:
        pass
    sim.set_enable(False)
    ev = link.next_event(timeout=1.0)
    assert ev is not None and (ev.kind, ev.enable) == ("enable", False)
    sim.set_enable(True)
    ev = link.next_event(timeout=1.0)
    assert ev is not None and (ev.kind, ev.enable) == ("enable", True)


def heartbeat_held(link: PlcLink, writes: int = 2):
    """A wait_until predicate: true once ``writes`` status writes in a row left VisionHeartbeat where it was."""
    since: dict[str, int] = {}

    def held() -> bool:
        s = link.stats()
        if since.get("hb") != s["vision_heartbeat"]:
            since.update(hb=s["vision_heartbeat"], writes=s["status_writes"])
        return s["status_writes"] - since["writes"] >= writes

    return held


def test_app_watchdog_holds_the_vision_heartbeat_while_the_app_is_silent(sim):
    """With app_watchdog_s, VisionHeartbeat stops while the app does not touch() the link, and resumes after."""
    t_start = time.monotonic()  # the link's last touch is its construction, after this
    lk = make_link(sim, app_watchdog_s=0.3, status_interval_s=0.1).start()
    try:
        assert lk.wait_connected(5)
        # silent longer than app_watchdog_s: status writes go on every 0.1 s, VisionHeartbeat stops
        assert wait_until(heartbeat_held(lk), 5.0), lk.stats()
        assert time.monotonic() - t_start > 0.3
        hb1, _ = unpack_status(sim.snapshot(), base=0)
        writes = lk.stats()["status_writes"]
        assert wait_until(lambda: lk.stats()["status_writes"] >= writes + 3, 5.0), lk.stats()
        assert unpack_status(sim.snapshot(), base=0)[0] == hb1
        lk.touch()
        assert wait_until(lambda: unpack_status(sim.snapshot(), base=0)[0] != hb1, 1.0)
    finally:
        lk.stop()


def test_reals_beyond_float32_saturate():
    """Reals beyond the float32 range saturate instead of raising during packing."""
    r = unpack_result(pack_result(Verdict(part_id=1, accept=True, inspect_ms=1e300), seq=1))
    assert math.isfinite(r.inspect_ms) and r.inspect_ms > 3e38


def test_part_ids_overwritten_between_two_polls_are_counted_as_missed(sim):
    """Three PartIds written within one poll: the link announces the last and counts the two it never saw (stats,
    dropped_by_reason "part_id_missed" for the metric, their ids for the bench); a counter reset or a jump
    beyond _MISSED_GAP_MAX is another numbering, not a miss."""
    lk = make_link(sim, poll_interval_s=0.5).start()
    try:
        assert lk.wait_connected(5)
        first = sim.new_part()
        ev = next_part(lk)
        assert ev is not None and ev.part_id == first
        assert wait_for_a_full_poll(sim, lk), lk.stats()  # a poll just ended: the next is about 0.5 s away
        ids = [sim.new_part() for _ in range(3)]
        ev = next_part(lk)
        assert ev is not None and ev.part_id == ids[-1]
        st = lk.stats()
        assert st["parts_missed"] == 2 and lk.missed_part_ids() == ids[:2], st
        assert st["dropped_by_reason"]["part_id_missed"] == 2 and st["parts_detected"] == 2
        assert st["results_dropped"] == sum(st["dropped_by_reason"].values()) == 2, st
        assert wait_for_a_full_poll(sim, lk), lk.stats()
        sim.new_part(part_id=1)  # the PLC's counter restarted
        assert next_part(lk).part_id == 1
        assert wait_for_a_full_poll(sim, lk), lk.stats()
        sim.new_part(part_id=5000)  # another numbering
        assert next_part(lk).part_id == 5000
        assert lk.stats()["parts_missed"] == 2
    finally:
        lk.stop()
