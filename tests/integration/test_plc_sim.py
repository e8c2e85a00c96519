"""service.sim.plc_sim: the PLC simulator over a real Snap7 connection on 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest
import snap7

from service.cli import main as cli_main
from service.errors import ConfigError
from service.plc import DB_SIZE, RESULT_START, PlcLink, pack_result, unpack_inputs
from service.records import Verdict
from service.sim.plc_sim import PlcSimulator, load_manifest, main
from tests.helpers.daemon_fixtures import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def client():
    c = snap7.client.Client()
    yield c
    c.disconnect()


def write_result(client, db: int, verdict: Verdict, seq: int) -> None:
    client.db_write(db, RESULT_START, pack_result(verdict, seq))


def test_sim_serves_heartbeat_enable_and_part_ids_over_snap7(client):
    """A Snap7 client reads Enable=1, a moving PlcHeartbeat and each new PartId from the simulator's DB."""
    with PlcSimulator(port=0, rate=0, heartbeat_interval_s=0.02) as sim:
        client.connect("127.0.0.1", 0, 1, sim.port)
        first = unpack_inputs(client.db_read(sim.db, 0, 8))
        assert first.enable is True and first.part_id == 0
        assert wait_until(lambda: unpack_inputs(client.db_read(sim.db, 0, 8)).plc_heartbeat != first.plc_heartbeat,
                          1.0)
        assert sim.new_part() == 1 and sim.new_part() == 2
        assert unpack_inputs(client.db_read(sim.db, 0, 8)).part_id == 2
        assert len(client.db_read(sim.db, 0, DB_SIZE)) == DB_SIZE
        client.disconnect()  # before the server stops: it waits up to 1 s for idle client threads


def test_sim_generates_parts_at_its_rate_up_to_count():
    """With rate and count the simulator writes PartIds 1..count, then stops making parts."""
    with PlcSimulator(port=0, rate=50, count=5, watchdog_s=0.2) as sim:
        assert sim.wait_done(3.0)
        s = sim.stats()
        assert s["parts"] == 5 and s["part_id"] == 5 and s["watchdog_rejects"] == 5
        assert sorted(o.part_id for o in sim.outcomes) == [1, 2, 3, 4, 5]


class StampingSimulator(PlcSimulator):
    """Records the PLC program's own time of each PartId it makes (``made``), so that the spacing is measured
    where it is decided, not by a sampler that may fall behind."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.made: list[float] = []

    def _new_part_locked(self, now: float, part_id: int | None) -> int:
        self.made.append(now)
        return super()._new_part_locked(now, part_id)


def test_parts_never_come_closer_than_one_period_after_enable():
    """After a time with Enable = 0 the simulator does not catch up: the first parts come one period apart,
    not back to back (which would overwrite PartId 1 before any client could read it)."""
    import time

    with StampingSimulator(port=0, rate=10, watchdog_s=5.0, enable=False) as sim:
        time.sleep(0.5)  # five periods pass with Enable = 0: the duration under test, not a wait for a thread
        assert sim.made == [] and sim.stats()["parts"] == 0  # nothing while disabled
        sim.set_enable(True)
        assert wait_until(lambda: len(sim.made) >= 3, 5.0), sim.made
        first, second, third = sim.made[:3]
        # one period (0.1 s) from the first part on: the schedule restarts at enable instead of catching up
        assert second - first >= 0.1 - 1e-9 and third - first >= 0.2 - 1e-9, sim.made


def test_watchdog_counts_a_missing_result_as_rejected():
    """A part without a result within watchdog_s is counted as rejected ('timeout'), never as accepted."""
    with PlcSimulator(port=0, rate=0, watchdog_s=0.2) as sim:
        pid = sim.new_part()
        assert wait_until(lambda: sim.stats()["watchdog_rejects"] == 1, 2.0)
        s = sim.stats()
        assert s["rejected"] == 1 and s["accepted"] == 0 and s["pending"] == 0
        assert [(o.part_id, o.got, o.accepted) for o in sim.outcomes] == [(pid, "timeout", False)]


def test_late_duplicate_and_unknown_results_are_ignored(client):
    """Results after the watchdog fired, second results and unknown PartIds are counted and never accepted."""
    with PlcSimulator(port=0, rate=0, watchdog_s=0.5) as sim:
        client.connect("127.0.0.1", 0, 1, sim.port)
        late = sim.new_part()
        assert wait_until(lambda: sim.stats()["watchdog_rejects"] == 1, 2.0)
        write_result(client, sim.db, Verdict(part_id=late, accept=True), seq=1)
        ok = sim.new_part()
        write_result(client, sim.db, Verdict(part_id=ok, reject_dirt=True), seq=2)
        write_result(client, sim.db, Verdict(part_id=ok, accept=True), seq=3)
        write_result(client, sim.db, Verdict(part_id=999, accept=True), seq=4)
        s = sim.stats()
        client.disconnect()
        assert (s["late_results"], s["duplicate_results"], s["unexpected_results"]) == (1, 1, 1)
        assert s["accepted"] == 0 and s["results"] == 4 and s["seq_gaps"] == 0


def test_sim_flags_illegal_writes_and_seq_gaps(client):
    """A vision side writing the PLC's bytes 0..7 or skipping ResultSeq values is counted."""
    with PlcSimulator(port=0, rate=0) as sim:
        client.connect("127.0.0.1", 0, 1, sim.port)
        client.db_write(sim.db, 0, bytearray(8))
        a, b = sim.new_part(), sim.new_part()
        write_result(client, sim.db, Verdict(part_id=a, accept=True), seq=1)
        write_result(client, sim.db, Verdict(part_id=b, accept=True), seq=5)
        s = sim.stats()
        client.disconnect()
        assert s["illegal_writes"] == 1 and s["seq_gaps"] == 1 and s["accepted"] == 2


def test_accuracy_against_a_manifest(tmp_path):
    """Part i is scored against manifest row i: good needs Accept, a defect needs its Reject bit; a timeout
    counts as wrong, an accepted defect as an escape."""
    rows = ["good", "dirt", "scratch", "ec", "good", "dirt"]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"file": f"{i}.png", "class": c}) + "\n" for i, c in enumerate(rows)))
    answers = [dict(accept=True), dict(reject_dirt=True), dict(reject_ec=True), dict(reject_ec=True), None,
               dict(accept=True)]
    with PlcSimulator(port=0, rate=0, watchdog_s=1.0, manifest=manifest) as sim:
        assert sim.count == len(rows)
        link = PlcLink(host="127.0.0.1", port=sim.port, db=sim.db, min_result_interval_s=0.0,
                       reconnect_min_s=0.05).start()
        try:
            assert link.wait_connected(5)
            for answer in answers:
                pid = sim.new_part()
                while (ev := link.next_event(timeout=2.0)) is not None and ev.kind != "part":
                    pass
                assert ev is not None and ev.part_id == pid
                if answer is not None:
                    link.publish(Verdict(part_id=pid, **answer))
            assert sim.wait_done(5.0)
        finally:
            link.stop()
        s = sim.stats()
    assert (s["scored"], s["correct"], s["accuracy"]) == (6, 3, 0.5)
    assert (s["escapes"], s["false_rejects"], s["watchdog_rejects"]) == (1, 1, 1)
    assert s["confusion"] == {"good->good": 1, "dirt->dirt": 1, "scratch->ec": 1, "ec->ec": 1,
                              "good->timeout": 1, "dirt->good": 1}
    assert [o.expected for o in sorted(sim.outcomes, key=lambda o: o.part_id)] == rows


def test_manifest_errors_name_the_row_and_the_fix(tmp_path):
    """A missing manifest or a row without a known class raises ConfigError naming the file, line and classes."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"class": "good"}\n{"class": "rust"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: 'class' is 'rust'.*good, dirt, scratch, ec"):
        load_manifest(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"class": "Good"}\n\n{"class": "EC", "file": "x.png"}\n')
    assert load_manifest(ok) == ["good", "ec"]


def test_cli_runs_until_count_is_resolved_and_prints_stats(capsys):
    """`plc-sim --count 3` makes three parts, lets their watchdogs fire, exits 0 and prints the stats as JSON."""
    rc = main(["--port", "0", "--rate", "50", "--count", "3", "--watchdog", "0.2", "--heartbeat-interval", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    stats = json.loads(out[re.search(r"^\{$", out, re.M).start():])  # the log lines come before the JSON
    assert stats["parts"] == 3 and stats["watchdog_rejects"] == 3 and stats["accepted"] == 0


def test_cli_reports_a_bad_manifest_and_exits_2(tmp_path, capsys):
    """A missing --manifest makes plc-sim exit 2 with a message naming the file."""
    rc = main(["--port", "0", "--manifest", str(tmp_path / "missing.jsonl")])
    assert rc == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_valve_inspect_dispatches_plc_sim():
    """`valve-inspect plc-sim --help` reaches this module's parser."""
    with pytest.raises(SystemExit) as exc:
        cli_main(["plc-sim", "--help"])
    assert exc.value.code == 0


def test_stop_server_keeps_the_plc_program_running():
    """stop_server() drops connections but the heartbeat and watchdog go on; start_server() serves the same DB."""
    with PlcSimulator(port=0, rate=0, heartbeat_interval_s=0.02, watchdog_s=0.2) as sim:
        port = sim.port
        sim.new_part()
        sim.stop_server()
        hb = sim.stats()["plc_heartbeat"]
        assert wait_until(lambda: sim.stats()["watchdog_rejects"] == 1, 2.0)
        assert sim.stats()["plc_heartbeat"] != hb and not sim.stats()["serving"]
        sim.start_server()
        assert sim.port == port
        c = snap7.client.Client()
        try:
            c.connect("127.0.0.1", 0, 1, port)
            assert unpack_inputs(c.db_read(sim.db, 0, 8)).part_id == 1
        finally:
            c.disconnect()


def test_keep_outcomes_bounds_the_per_part_records():
    """keep_outcomes caps the simulator's per-part records (a soak keeps 1,000; the bench 100,000); < 0 is refused."""
    from service.errors import ConfigError
    from service.sim.plc_sim import PlcSimulator

    assert PlcSimulator(port=0, keep_outcomes=3).outcomes.maxlen == 3
    assert PlcSimulator(port=0).outcomes.maxlen == 100_000
    with pytest.raises(ConfigError, match="keep_outcomes"):
        PlcSimulator(port=0, keep_outcomes=-1)


def test_novel_parts_are_right_only_with_reject_unknown(tmp_path):
    """A manifest's "novel" parts (synth's defect types no model trains on) load, and score right only when
    rejected with RejectUnknown; accepted or rejected for another class only, they are wrong."""
    from service.sim.plc_sim import load_manifest, verdict_correct

    (tmp_path / "m.jsonl").write_text('{"class": "good"}\n{"class": "novel", "subtype": "dent"}\n')
    assert load_manifest(tmp_path / "m.jsonl") == ["good", "novel"]
    assert verdict_correct("novel", False, ["unknown"]) and verdict_correct("novel", False, ["dirt", "unknown"])
    assert not verdict_correct("novel", False, ["dirt"]) and not verdict_correct("novel", True, [])
    assert verdict_correct("dirt", False, ["dirt"]) and not verdict_correct("dirt", False, ["unknown"])
