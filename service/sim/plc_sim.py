"""``valve-inspect plc-sim``: a PLC simulator, a Snap7 server that plays the PLC side of docs/plc-interface.md.

It serves the interface DB on 127.0.0.1:1102 (configurable) and, like the line's PLC program:

* increments PlcHeartbeat every ``heartbeat_interval_s`` and holds Enable = 1;
* writes a new PartId (1, 2, 3, ...) at ``rate`` parts/s, up to an optional ``count``;
* takes each result when ResultSeq changes and matches it to its PartId;
* runs its own watchdog: a part with no result within ``watchdog_s`` is counted as rejected
  (a result that arrives later is counted as late and ignored, as the PLC would);
* watches VisionHeartbeat (``vision_alive``) and the status bits;
* with a manifest (JSONL, one row per part with ``class`` in good/dirt/scratch/ec), scores part i
  (PartId i+1) against row i: good -> Accept expected, dirt/scratch/ec -> the matching Reject bit,
  and logs the line's running accuracy.

The simulator captures each result write as it lands (a Snap7 server write event), i.e. it behaves like
a PLC with an infinitely short cycle; a real PLC scans ResultSeq once per cycle, which is why the link
spaces result writes by ``min_result_interval_s``.

Usable in-process (the daemon's demo, the tests)::

    sim = PlcSimulator(port=0, rate=5, count=20).start()    # port=0: any free port, see sim.port
    ...
    sim.stop(); print(sim.stats())
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snap7.server import EVC_DATA_WRITE, Server
from snap7.type import SrvArea

from service.errors import ConfigError
from service.logs import get_logger
from service.plc import (
    DB_SIZE,
    DEFAULT_DB,
    INPUT_SIZE,
    INPUT_START,
    RESULT_START,
    PlcInputs,
    PlcResult,
    pack_inputs,
    unpack_result,
    unpack_status,
    wrap_dint,
    wrap_int,
)

log = get_logger(__name__)

#: the manifest classes the simulator scores; "novel" (service.sim.synth's defect types no model trains on)
#: is right when the part is rejected with RejectUnknown
MANIFEST_CLASSES = ("good", "dirt", "scratch", "ec", "novel")
#: the defect bit a manifest class must have among the part's rejects (its own name, except novel)
EXPECTED_DEFECT = {"novel": "unknown"}


def load_manifest(path: str | Path) -> list[str]:
    """A manifest.jsonl -> the ``class`` of each row, in order (row i is part i, PartId i+1)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist; write one with `valve-inspect synth` or pass the right "
                          f"--manifest path")
    classes: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not a JSON object ({exc.msg}); a manifest has one JSON object "
                              f"per line") from exc
        cls = row.get("class") if isinstance(row, dict) else None
        if not isinstance(cls, str) or cls.lower() not in MANIFEST_CLASSES:
            raise ConfigError(f"{path}:{lineno}: 'class' is {cls!r}; each row needs \"class\" one of "
                              f"{', '.join(MANIFEST_CLASSES)}")
        classes.append(cls.lower())
    if not classes:
        raise ConfigError(f"manifest {path} has no rows")
    return classes


@dataclass(frozen=True)
class PartOutcome:
    """How the simulated PLC resolved one part.

    got: accept | dirt | scratch | ec | unknown (or a '+'-joined combination) | no_part | not_inspected
         | invalid | timeout (its watchdog rejected it).
    """

    part_id: int
    index: int
    expected: str | None
    got: str
    accepted: bool
    correct: bool | None
    latency_s: float
    result_seq: int | None = None


@dataclass
class _Part:
    part_id: int
    index: int
    created: float
    expected: str | None


def verdict_correct(expected: str, accepted: bool, defects: Sequence[str]) -> bool:
    """How a result is scored against the ground truth: a good part must be accepted, a defect part
    rejected with its own class among the defects (a novel part: with RejectUnknown)."""
    return accepted if expected == "good" else (EXPECTED_DEFECT.get(expected, expected) in defects and not accepted)


class PlcSimulator:
    """The PLC side of the interface, served by a snap7.server.Server.

    Args:
        host, port: where to listen (port 0: a free port, read ``port`` after start()).
        db: the interface DB's number.
        rate: new parts per second (0: none; use new_part()).
        count: stop making parts after this many (default: the manifest's length, else unlimited).
        watchdog_s: a part without a result after this long is counted as rejected.
        manifest: path to a manifest.jsonl or a sequence of class names (part i -> row i).
        heartbeat_interval_s: PlcHeartbeat period.
        vision_watchdog_s: VisionHeartbeat unchanged this long -> ``vision_alive`` False (logged).
        tick_s: the simulated PLC cycle for heartbeat, parts and watchdogs.
        report_every: log the running accuracy every this many resolved parts (0: never).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 1102, db: int = DEFAULT_DB, rate: float = 2.0,
                 count: int | None = None, watchdog_s: float = 2.0, manifest: str | Path | Sequence[str] | None = None,
                 heartbeat_interval_s: float = 0.1, vision_watchdog_s: float = 2.0, tick_s: float = 0.005,
                 report_every: int = 10, first_part_id: int = 1, enable: bool = True,
                 keep_outcomes: int = 100_000) -> None:
        if rate < 0:
            raise ConfigError(f"plc-sim rate = {rate}: parts per second must be >= 0")
        if count is not None and count < 0:
            raise ConfigError(f"plc-sim count = {count}: must be >= 0 (or unset for no limit)")
        if watchdog_s <= 0 or heartbeat_interval_s <= 0 or tick_s <= 0 or vision_watchdog_s <= 0:
            raise ConfigError("plc-sim watchdog_s, heartbeat_interval_s, vision_watchdog_s and tick_s must be > 0")
        if keep_outcomes < 0:
            raise ConfigError(f"plc-sim keep_outcomes = {keep_outcomes}: must be >= 0 (0 keeps no per-part record)")
        if not 1 <= db <= 65535:
            raise ConfigError(f"plc-sim db = {db}: must be a DB number 1..65535")
        if isinstance(manifest, (str, Path)):
            manifest = load_manifest(manifest)
        self.manifest: list[str] | None = [c.lower() for c in manifest] if manifest is not None else None
        if self.manifest is not None:
            bad = sorted({c for c in self.manifest if c not in MANIFEST_CLASSES})
            if bad:
                raise ConfigError(f"manifest classes {bad} unknown; use {', '.join(MANIFEST_CLASSES)}")
        self.host, self.port, self.db = host, port, db
        self.rate, self.watchdog_s, self.tick_s = rate, watchdog_s, tick_s
        self.count = count if count is not None else (len(self.manifest) if self.manifest is not None else None)
        self.heartbeat_interval_s, self.vision_watchdog_s = heartbeat_interval_s, vision_watchdog_s
        self.report_every = report_every
        self._log = log.bind(component="plc-sim", db=db)

        self._buf = bytearray(DB_SIZE)  # the DB; shared with the Server, guarded by its area lock
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stop_evt = threading.Event()
        self._done_evt = threading.Event()
        self._lock = threading.Lock()  # simulator state; never taken while holding the area lock

        self._inputs = PlcInputs(enable=enable, plc_heartbeat=0, part_id=0)
        self._hb_frozen = False
        self._next_part_id = first_part_id
        self._produced = 0
        self._pending: collections.OrderedDict[int, _Part] = collections.OrderedDict()
        self._resolved: dict[int, str] = {}  # part_id -> "result" | "timeout" (recent)
        self._last_seq: int | None = None
        self.outcomes: collections.deque[PartOutcome] = collections.deque(maxlen=keep_outcomes)
        self._vision_hb: int | None = None
        self._vision_hb_changed = -math.inf
        self._vision_alive = False
        self._vision_status: dict[str, bool] = {}
        self._c: collections.Counter[str] = collections.Counter()
        self._confusion: collections.Counter[str] = collections.Counter()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> PlcSimulator:
        """Serve the DB and run the PLC program (idempotent for the program thread)."""
        self._write_inputs()
        self.start_server()
        if self._thread is None or not self._thread.is_alive():
            self._stop_evt.clear()
            self._thread = threading.Thread(target=self._run, name="plc-sim", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the program thread and the server (state and the DB contents are kept)."""
        self._stop_evt.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self.stop_server()

    def __enter__(self) -> PlcSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_server(self) -> None:
        """(Re)start only the Snap7 server on the same port: the link's connection comes back."""
        if self._server is not None:
            return
        server = Server(log=False)
        server.register_area(SrvArea.DB, self.db, self._buf)
        server.set_events_callback(self._on_server_event)
        try:
            server.start_to(self.host, self.port)
        except Exception as exc:
            raise ConfigError(f"plc-sim cannot listen on {self.host}:{self.port} ({exc}); is another simulator or "
                              f"PLC program using the port? Choose another with --port") from exc
        if self.port == 0 and server.server_socket is not None:
            self.port = server.server_socket.getsockname()[1]
        self._server = server
        self._log.info("plc_sim_listening", host=self.host, port=self.port)

    def stop_server(self) -> None:
        """Stop only the Snap7 server (like pulling the cable); the PLC program, its watchdog included, runs on."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            self._log.info("plc_sim_server_stopped", port=self.port)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- test / demo controls

    def new_part(self, part_id: int | None = None) -> int:
        """Write a new PartId now (the next in sequence unless given) and start its watchdog; returns it."""
        with self._lock:
            pid = self._new_part_locked(time.monotonic(), part_id)
        self._write_inputs()
        return pid

    def freeze_heartbeat(self, frozen: bool = True) -> None:
        """Stop (or resume) incrementing PlcHeartbeat, e.g. to test the vision side's stale detection."""
        with self._lock:
            self._hb_frozen = frozen

    def set_enable(self, enable: bool) -> None:
        with self._lock:
            self._inputs = PlcInputs(bool(enable), self._inputs.plc_heartbeat, self._inputs.part_id)
        self._write_inputs()

    def snapshot(self) -> bytes:
        """A consistent copy of the whole DB."""
        return self._read_db(0, DB_SIZE)

    def wait_done(self, timeout: float | None = None) -> bool:
        """True once ``count`` parts were made and every one was resolved (result or watchdog)."""
        return self._done_evt.wait(timeout)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Poll ``predicate(stats)`` until it is true or ``timeout`` passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.stats()):
                return True
            time.sleep(0.01)
        return bool(predicate(self.stats()))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._c
            scored, correct = c["scored"], c["correct"]
            return dict(
                port=self.port, running=self.running, serving=self._server is not None,
                parts=self._produced, pending=len(self._pending), results=c["results"], accepted=c["accepted"],
                rejected=c["rejected"], watchdog_rejects=c["watchdog_rejects"], late_results=c["late_results"],
                duplicate_results=c["duplicate_results"], unexpected_results=c["unexpected_results"],
                protocol_violations=c["protocol_violations"], illegal_writes=c["illegal_writes"],
                seq_gaps=c["seq_gaps"], last_result_seq=self._last_seq, scored=scored, correct=correct,
                accuracy=(correct / scored) if scored else None, escapes=c["escapes"],
                false_rejects=c["false_rejects"], confusion=dict(self._confusion),
                plc_heartbeat=self._inputs.plc_heartbeat, part_id=self._inputs.part_id, enable=self._inputs.enable,
                vision_alive=self._vision_alive, vision_heartbeat=self._vision_hb,
                vision_status=dict(self._vision_status),
            )

    # ---------------------------------------------------------------- the DB

    def _read_db(self, start: int, size: int) -> bytes:
        server = self._server
        if server is not None:
            server.lock_area(SrvArea.DB, self.db)
            try:
                return bytes(self._buf[start:start + size])
            finally:
                server.unlock_area(SrvArea.DB, self.db)
        return bytes(self._buf[start:start + size])

    def _write_inputs(self) -> None:
        # Pack and store under the state lock so that two writers can never reorder an older PartId over a newer
        # one (lock order: state lock -> area lock; the server callback never holds the area lock while it
        # takes the state lock).
        with self._lock:
            data = pack_inputs(self._inputs)
            server = self._server
            if server is not None:
                server.lock_area(SrvArea.DB, self.db)
                try:
                    self._buf[INPUT_START:INPUT_START + INPUT_SIZE] = data
                finally:
                    server.unlock_area(SrvArea.DB, self.db)
            else:
                self._buf[INPUT_START:INPUT_START + INPUT_SIZE] = data

    # ---------------------------------------------------------------- the PLC program

    def _new_part_locked(self, now: float, part_id: int | None) -> int:
        pid = wrap_dint(part_id if part_id is not None else self._next_part_id)
        if pid == 0:
            pid = 1
        self._next_part_id = wrap_dint(pid + 1) or 1
        index = self._produced
        self._produced += 1
        expected = None
        if self.manifest is not None and index < len(self.manifest):
            expected = self.manifest[index]
        self._pending[pid] = _Part(pid, index, now, expected)
        self._resolved.pop(pid, None)
        self._inputs = PlcInputs(self._inputs.enable, self._inputs.plc_heartbeat, pid)
        return pid

    def _run(self) -> None:
        now = time.monotonic()
        next_hb = now + self.heartbeat_interval_s
        next_part = now + (1.0 / self.rate if self.rate > 0 else 0.0)
        while not self._stop_evt.is_set():
            now = time.monotonic()
            new_pid = None
            changed = False
            with self._lock:
                if now >= next_hb:
                    next_hb = max(next_hb + self.heartbeat_interval_s, now)
                    if not self._hb_frozen:
                        hb = wrap_int(self._inputs.plc_heartbeat + 1)
                        self._inputs = PlcInputs(self._inputs.enable, hb, self._inputs.part_id)
                        changed = True
                more = self.count is None or self._produced < self.count
                if self.rate > 0 and more and self._inputs.enable and now >= next_part:
                    # Never two parts closer than one period: after Enable = 0, or a stall of this thread,
                    # the schedule restarts from now (catching up would write PartIds back to back, faster
                    # than any line, and the link would see only the last of them).
                    next_part = next_part + 1.0 / self.rate
                    if next_part <= now:
                        next_part = now + 1.0 / self.rate
                    new_pid = self._new_part_locked(now, None)
                    changed = True
                timed_out = [p for p in self._pending.values() if now - p.created > self.watchdog_s]
                for part in timed_out:
                    del self._pending[part.part_id]
                    self._resolved[part.part_id] = "timeout"
                    self._c["watchdog_rejects"] += 1
                    self._record_locked(part, "timeout", accepted=False, latency=now - part.created, seq=None)
                if self.count is not None and self._produced >= self.count and not self._pending:
                    self._done_evt.set()
            if changed:
                self._write_inputs()
            if new_pid is not None:
                self._log.debug("plc_sim_part", part_id=new_pid)
            for part in timed_out:
                self._log.warning("plc_sim_watchdog_reject", part_id=part.part_id, watchdog_s=self.watchdog_s)
            self._watch_vision(now)
            self._stop_evt.wait(self.tick_s)

    def _watch_vision(self, now: float) -> None:
        hb, status = unpack_status(self._read_db(0, DB_SIZE), base=0)
        with self._lock:
            if self._vision_hb is None:
                self._vision_hb = hb  # baseline: alive only once it moves
            elif hb != self._vision_hb:
                self._vision_hb, self._vision_hb_changed = hb, now
            alive = now - self._vision_hb_changed <= self.vision_watchdog_s
            self._vision_status = {k: bool(v) for k, v in vars(status).items()}
            changed, self._vision_alive = alive != self._vision_alive, alive
        if changed:
            (self._log.info if alive else self._log.warning)("plc_sim_vision_heartbeat", alive=alive,
                                                              vision_heartbeat=hb)

    def _on_server_event(self, event: Any) -> None:
        """Server callback (in the server's client thread, after the write landed, before it is acknowledged)."""
        if event.EvtCode != EVC_DATA_WRITE or event.EvtParam1 != SrvArea.DB or event.EvtParam2 != self.db:
            return
        start, size = int(event.EvtParam3), int(event.EvtParam4)
        if start < INPUT_START + INPUT_SIZE:
            with self._lock:
                self._c["illegal_writes"] += 1
            self._log.error("plc_sim_illegal_write", start=start, size=size,
                            rule="the vision side must never write bytes 0..7")
        if not start <= RESULT_START < start + size:
            return  # a status write (or a partial write that does not touch ResultSeq)
        res = unpack_result(self._read_db(0, DB_SIZE), base=0)
        self._on_result(res, time.monotonic())

    def _on_result(self, res: PlcResult, now: float) -> None:
        msg: tuple[str, dict[str, Any]] | None = None
        with self._lock:
            if res.result_seq == self._last_seq:
                return  # rewritten without a change: not a new result
            if self._last_seq is not None and res.result_seq != wrap_dint(self._last_seq + 1):
                self._c["seq_gaps"] += 1
                msg = ("plc_sim_seq_gap", dict(previous=self._last_seq, now=res.result_seq))
            self._last_seq = res.result_seq
            self._c["results"] += 1
            part = self._pending.pop(res.result_part_id, None)
            if part is None:
                how = self._resolved.get(res.result_part_id)
                key = {"timeout": "late_results", "result": "duplicate_results"}.get(how, "unexpected_results")
                self._c[key] += 1
                msg = ("plc_sim_result_ignored", dict(part_id=res.result_part_id, why=key, seq=res.result_seq))
            else:
                self._resolved[part.part_id] = "result"
                if len(self._resolved) > 10_000:
                    for k in list(self._resolved)[:5_000]:
                        del self._resolved[k]
                if not res.consistent:
                    self._c["protocol_violations"] += 1
                    got = "invalid"
                elif res.accept:
                    got = "accept"
                elif res.defects:
                    got = "+".join(res.defects)
                else:
                    got = res.label
                self._record_locked(part, got, accepted=res.accept and res.consistent, latency=now - part.created,
                                    seq=res.result_seq)
                if self.count is not None and self._produced >= self.count and not self._pending:
                    self._done_evt.set()
        if msg:
            self._log.warning(msg[0], **msg[1])

    def _record_locked(self, part: _Part, got: str, *, accepted: bool, latency: float, seq: int | None) -> None:
        c = self._c
        c["accepted" if accepted else "rejected"] += 1
        correct = None
        if part.expected is not None:
            correct = verdict_correct(part.expected, accepted, got.split("+"))
            c["scored"] += 1
            c["correct"] += int(correct)
            if part.expected != "good" and accepted:
                c["escapes"] += 1
            if part.expected == "good" and not accepted:
                c["false_rejects"] += 1
            self._confusion[f"{part.expected}->{'good' if accepted else got}"] += 1
        self.outcomes.append(PartOutcome(part.part_id, part.index, part.expected, got, accepted, correct, latency, seq))
        if self.report_every and part.expected is not None and c["scored"] % self.report_every == 0:
            self._log.info("plc_sim_accuracy", scored=c["scored"], correct=c["correct"],
                           accuracy=round(c["correct"] / c["scored"], 4), escapes=c["escapes"],
                           false_rejects=c["false_rejects"], watchdog_rejects=c["watchdog_rejects"])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="valve-inspect plc-sim",
        description="Run a PLC simulator: a Snap7 server with the vision interface DB that plays the PLC side "
                    "(heartbeat, Enable, PartIds, result handshake, watchdog, accuracy against a manifest).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=1102, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--db", type=int, default=DEFAULT_DB, help="interface DB number (default: %(default)s)")
    p.add_argument("--rate", type=float, default=2.0, help="new parts per second (default: %(default)s)")
    p.add_argument("--count", type=int, default=None,
                   help="stop after this many parts (default: the manifest's rows, else unlimited)")
    p.add_argument("--watchdog", type=float, default=2.0,
                   help="seconds until a part without a result is counted as rejected (default: %(default)s)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="manifest.jsonl; row i's 'class' is the truth for part i (PartId i+1)")
    p.add_argument("--heartbeat-interval", type=float, default=0.1, help="PlcHeartbeat period, s (default: %(default)s)")
    p.add_argument("--report-every", type=int, default=10, help="log accuracy every N scored parts (default: %(default)s)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until "
                   "--count parts are resolved, or Ctrl-C)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sim = PlcSimulator(host=args.host, port=args.port, db=args.db, rate=args.rate, count=args.count,
                           watchdog_s=args.watchdog, manifest=args.manifest,
                           heartbeat_interval_s=args.heartbeat_interval, report_every=args.report_every)
        sim.start()
    except ConfigError as exc:
        print(f"valve-inspect plc-sim: {exc}", file=sys.stderr)
        return exc.exit_code

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not stop.is_set():
            if sim.wait_done(0.1):
                break
            if end is not None and time.monotonic() >= end:
                break
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    stats = sim.stats()
    log.info("plc_sim_done", parts=stats["parts"], results=stats["results"], accuracy=stats["accuracy"],
             watchdog_rejects=stats["watchdog_rejects"])
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
