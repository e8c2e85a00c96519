"""The daemon's side of the S7 link: :class:`PlcLink`, one owner thread for the (not thread-safe) Snap7 client.

It polls bytes 0..7, announces each new PartId once, writes VisionHeartbeat + status at least once per
second and every published result with one ``db_write``; it reconnects with exponential back-off.
Link-loss policy (docs/plc-interface.md, "Link loss"): a result is written only on the same
connection on which its PartId was announced; everything else is dropped and counted, never replayed.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from snap7 import util as s7util

from service.errors import ConfigError, PlcLinkError
from service.logs import get_logger
from service.plc.codec import VisionStatus, pack_result, pack_status, unpack_inputs, wrap_dint, wrap_int
from service.plc.layout import (
    DB_RANGE,
    DB_SIZE,
    DEFAULT_DB,
    INPUT_SIZE,
    INPUT_START,
    ISO_ON_TCP_PORT,
    RACK_RANGE,
    RESULT_START,
    SLOT_RANGE,
    STATUS_START,
)
from service.records import Verdict

log = get_logger("service.plc")  # one logger name for the whole link (as before the split)


@dataclass(frozen=True)
class PlcLinkConfig:
    """Explicit link parameters (the config system maps its [plc] table onto these).

    Args:
        host: the PLC's IP address.
        rack, slot: S7-1500: 0 / 1.
        port: ISO-on-TCP port (102 on a real PLC; the simulator defaults to 1102).
        db: the interface DB's number.
        poll_interval_s: how often bytes 0..7 are read; keep it well below the part period.
        status_interval_s: VisionHeartbeat + status are written at this period (<= 1 s).
        plc_heartbeat_timeout_s: PlcHeartbeat unchanged this long -> Fault (cleared when it moves).
        reconnect_min_s, reconnect_max_s: exponential back-off between connection attempts.
        io_timeout_s: socket timeout for reads and writes once connected.
        min_result_interval_s: minimum spacing of result writes, so that a PLC scanning ResultSeq once
            per cycle never misses one (keep it above two PLC cycle times).
        result_queue_max: results waiting to be written; beyond this the oldest is dropped.
        event_queue_max: events waiting for the app; beyond this the oldest is dropped.
        app_watchdog_s: when set, VisionHeartbeat only increments while the app has called touch(),
            publish() or set_status() within this time (so a hung inspection loop stops the heartbeat).
    """

    host: str
    rack: int = 0
    slot: int = 1
    port: int = ISO_ON_TCP_PORT
    db: int = DEFAULT_DB
    poll_interval_s: float = 0.010
    status_interval_s: float = 0.25
    plc_heartbeat_timeout_s: float = 3.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    io_timeout_s: float = 2.0
    min_result_interval_s: float = 0.02
    result_queue_max: int = 64
    event_queue_max: int = 1024
    app_watchdog_s: float | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"plc.{key} = {getattr(self, key)!r}: {why}")

        if not self.host:
            raise ConfigError("plc.host is empty: set it to the PLC's IP address, e.g. 192.168.0.1")
        (r0, r1), (s0, s1), (d0, d1) = RACK_RANGE, SLOT_RANGE, DB_RANGE
        if not r0 <= self.rack <= r1 or not s0 <= self.slot <= s1:
            raise ConfigError(f"plc.rack/slot = {self.rack}/{self.slot}: rack must be {r0}..{r1} and slot "
                              f"{s0}..{s1} (S7-1500: rack 0, slot 1)")
        if not 1 <= self.port <= 65535:
            raise bad("port", f"must be 1..65535 (a real PLC listens on {ISO_ON_TCP_PORT})")
        if not d0 <= self.db <= d1:
            raise bad("db", f"must be a DB number {d0}..{d1} (default {DEFAULT_DB})")
        for key in ("poll_interval_s", "status_interval_s", "plc_heartbeat_timeout_s", "reconnect_min_s",
                    "io_timeout_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0 seconds")
        if self.status_interval_s > 1.0:
            raise bad("status_interval_s", "must be <= 1.0 s: the PLC expects VisionHeartbeat to move every second")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise bad("reconnect_max_s", f"must be >= reconnect_min_s ({self.reconnect_min_s})")
        if self.min_result_interval_s < 0:
            raise bad("min_result_interval_s", "must be >= 0 seconds")
        if self.result_queue_max < 1 or self.event_queue_max < 1:
            raise ConfigError("plc.result_queue_max and plc.event_queue_max must be >= 1")
        if self.app_watchdog_s is not None and not self.app_watchdog_s > 0:
            raise bad("app_watchdog_s", "must be > 0 seconds, or unset to tie the heartbeat to the link thread")

    @classmethod
    def from_settings(cls, plc: Any) -> PlcLinkConfig:
        """The link's parameters from the [plc] section (service.config.PlcSettings; its port is resolved).

        VisionHeartbeat is tied to the app's loop (app_watchdog_s), never shorter than 2 s.
        """
        return cls(host=plc.host, rack=plc.rack, slot=plc.slot, port=plc.port, db=plc.db,
                   poll_interval_s=plc.poll_ms / 1000.0, plc_heartbeat_timeout_s=plc.heartbeat_timeout_s,
                   reconnect_min_s=plc.reconnect_min_s, reconnect_max_s=plc.reconnect_max_s,
                   app_watchdog_s=max(2.0, plc.heartbeat_timeout_s))


@dataclass(frozen=True)
class PlcEvent:
    """What the link tells the app.

    kind:
        ``part``: a new non-zero PartId (emitted once); ``at`` is its detection time (time.monotonic()).
        ``enable``: Enable changed (and its value right after each connect).
        ``link``: the connection went up (``connected=True``) or down.
    ``enable`` always carries the last Enable read.
    """

    kind: str
    at: float
    part_id: int = 0
    enable: bool = False
    connected: bool = False


@dataclass
class _Queued:
    verdict: Verdict
    arrival: float | None
    published: float


_RESOLVED = -1  # marks a PartId whose result was written (in _announced)
_ANNOUNCED_MAX = 4096
#: a PartId that moved on by more than one and at most this much within a connection skipped the ids between
#: (the PLC's PartId is a counter): they were announced and overwritten between two polls. A larger or backward
#: jump is a counter reset or another numbering, not counted as missed.
_MISSED_GAP_MAX = 1000


def _default_client_factory() -> Any:
    import snap7

    return snap7.client.Client()


class PlcLink:
    """The daemon's side of the S7 interface; one owner thread does all Snap7 I/O.

    Thread-safe API: start(), stop(timeout), publish(verdict, arrival=None), set_status(...), touch(),
    next_event(timeout) / the ``events`` queue, take_dropped_parts(), ``connected``, wait_connected(timeout),
    stats().

        link = PlcLink(host="192.168.0.1", db=100)   # or PlcLink(PlcLinkConfig(...))
        link.start()
        link.set_status(ready=True, camera_ok=True, model_ok=True, gpu_active=True)
        ev = link.next_event(timeout=0.1)            # PlcEvent(kind="part", part_id=..., at=...)
        link.publish(verdict, arrival=frame.arrival)
        link.stop()                                  # writes queued results, then Ready=0
    """

    def __init__(self, config: PlcLinkConfig | None = None, /, *,
                 client_factory: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        if config is None:
            config = PlcLinkConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = config
        self.events: queue.Queue[PlcEvent] = queue.Queue(maxsize=config.event_queue_max)
        self._client_factory = client_factory or _default_client_factory
        self._log = log.bind(component="plc", plc=f"{config.host}:{config.port}", db=config.db)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_evt = threading.Event()
        self._up_evt = threading.Event()
        self._thread: threading.Thread | None = None
        self._results: collections.deque[_Queued] = collections.deque()
        self._status = VisionStatus()
        self._status_dirty = True
        self._last_touch = time.monotonic()
        self._stopped = False

        # owner-thread state
        self._client: Any = None
        self._epoch = 0
        self._announced: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._last_part_id: int | None = None
        self._enable: bool | None = None
        self._plc_hb: int | None = None
        self._plc_hb_changed = 0.0
        self._plc_stale = False
        self._app_silent = False
        self._vision_hb = 0
        self._result_seq = 0
        self._next_poll = 0.0
        self._next_status = 0.0
        self._last_result_write = -math.inf

        self._stats: dict[str, Any] = dict(
            connects=0, reconnects=0, connect_failures=0, read_failures=0, write_failures=0,
            parts_detected=0, parts_missed_on_reconnect=0, parts_missed=0, results_written=0, results_dropped=0,
            status_writes=0, events_dropped=0, part_events_dropped=0, last_error="", last_latency_ms=None,
            max_latency_ms=None,
        )
        self._dropped_parts: collections.deque[PlcEvent] = collections.deque(maxlen=_ANNOUNCED_MAX)
        self._dropped: collections.Counter[str] = collections.Counter()
        self._missed: collections.deque[int] = collections.deque(maxlen=_ANNOUNCED_MAX)  # PartIds never seen

    # ---------------------------------------------------------------- app API

    def start(self) -> PlcLink:
        """Start the owner thread (it connects in the background; see wait_connected())."""
        if self._thread is not None:
            raise RuntimeError("PlcLink.start() called twice; a stopped link cannot be restarted, create a new one")
        self._thread = threading.Thread(target=self._run, name="plc-link", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Write the queued results and a final status with Ready=0, disconnect; True if done in time."""
        with self._lock:
            self._stopped = True
        self._stop_evt.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning("plc_stop_timeout", timeout_s=timeout,
                              hint="the owner thread is blocked in a Snap7 call (connect timeout is 5 s)")
            return False
        return True

    def __enter__(self) -> PlcLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._up_evt.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._up_evt.wait(timeout)

    def publish(self, verdict: Verdict, arrival: float | None = None) -> bool:
        """Queue one result for writing; False when it was dropped at once (link down, stopped, queue full).

        Args:
            verdict: the part's result; its part_id must be one this link announced on the current connection.
            arrival: time.monotonic() of the frame's arrival; when given, InspectMs is measured up to the write.
        """
        if not isinstance(verdict, Verdict):
            raise TypeError(f"publish() takes a service.records.Verdict, got {type(verdict).__name__}")
        now = time.monotonic()
        with self._lock:
            self._last_touch = now
            if self._stopped:
                reason = "stopped"
            elif not self._up_evt.is_set():
                reason = "link_down"
            else:
                reason = ""
                if len(self._results) >= self.config.result_queue_max:
                    old = self._results.popleft()
                    self._drop_locked(old.verdict, "queue_full")
                self._results.append(_Queued(verdict, arrival, now))
            if reason:
                self._drop_locked(verdict, reason)
        self._wake.set()
        return not reason

    def set_status(self, *, ready: bool | None = None, camera_ok: bool | None = None, model_ok: bool | None = None,
                   gpu_active: bool | None = None, fault: bool | None = None, simulated: bool | None = None) -> None:
        """Update status bits (None leaves a bit as it is); written at once. Fault is ORed with a stale PLC heartbeat."""
        changes = {k: bool(v) for k, v in dict(ready=ready, camera_ok=camera_ok, model_ok=model_ok,
                                                   gpu_active=gpu_active, fault=fault,
                                                   simulated=simulated).items() if v is not None}
        with self._lock:
            self._last_touch = time.monotonic()
            new = replace(self._status, **changes)
            if new != self._status:
                self._status = new
                self._status_dirty = True
        self._wake.set()

    @property
    def status(self) -> VisionStatus:
        """The status bits as written (app bits; Fault includes a stale PLC heartbeat)."""
        with self._lock:
            return replace(self._status, fault=self._status.fault or self._plc_stale)

    def touch(self) -> None:
        """Tell the link the app's loop is alive (only matters with app_watchdog_s)."""
        with self._lock:
            self._last_touch = time.monotonic()

    def next_event(self, timeout: float | None = None) -> PlcEvent | None:
        """The next PlcEvent, or None after ``timeout`` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stats(self) -> dict[str, Any]:
        """Counters and state for metrics and logs (a copy)."""
        with self._lock:
            out = dict(self._stats)
            out.update(
                connected=self._up_evt.is_set(), dropped_by_reason=dict(self._dropped), queue_depth=len(self._results),
                result_seq=self._result_seq, vision_heartbeat=self._vision_hb, plc_heartbeat=self._plc_hb,
                plc_heartbeat_stale=self._plc_stale, enable=self._enable, last_part_id=self._last_part_id,
                epoch=self._epoch,
            )
        return out

    # ---------------------------------------------------------------- owner thread

    def missed_part_ids(self) -> list[int]:
        """The PartIds the polls never saw (the latest _ANNOUNCED_MAX), oldest first; kept out of stats(), which the
        control loop reads every 0.2 s."""
        with self._lock:
            return list(self._missed)

    def _drop_locked(self, verdict: Verdict, reason: str) -> None:
        self._stats["results_dropped"] += 1
        self._dropped[reason] += 1
        self._log.warning("plc_result_dropped", part_id=verdict.part_id, verdict=verdict.label, reason=reason)

    def _drop(self, verdict: Verdict, reason: str) -> None:
        with self._lock:
            self._drop_locked(verdict, reason)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _emit(self, event: PlcEvent) -> None:
        """Queue an event for the app; when the queue is full the oldest event is dropped.

        A dropped ``part`` event is never silently lost: its PartId and detection time are kept
        (``take_dropped_parts()``), counted (``part_events_dropped``) and logged, so that the app can
        still answer the part (NotInspected "event_overflow") or count it as lost.
        """
        try:
            self.events.put_nowait(event)
        except queue.Full:
            try:
                old = self.events.get_nowait()
            except queue.Empty:
                old = None
            with self._lock:
                self._stats["events_dropped"] += 1
                if old is not None and old.kind == "part":
                    self._stats["part_events_dropped"] += 1
                    self._dropped_parts.append(old)
            self._log.warning("plc_event_queue_full", dropped="oldest", dropped_kind=getattr(old, "kind", None),
                              dropped_part_id=getattr(old, "part_id", None) or None,
                              hint="the app is not reading next_event()")
            try:
                self.events.put_nowait(event)
            except queue.Full:
                pass

    def take_dropped_parts(self) -> list[PlcEvent]:
        """The ``part`` events dropped from the full event queue since the last call (oldest first)."""
        with self._lock:
            out = list(self._dropped_parts)
            self._dropped_parts.clear()
        return out

    def _run(self) -> None:
        backoff = self.config.reconnect_min_s
        try:
            while not self._stop_evt.is_set():
                if self._client is None:
                    if self._connect():
                        backoff = self.config.reconnect_min_s
                    else:
                        self._stop_evt.wait(backoff)
                        backoff = min(backoff * 2, self.config.reconnect_max_s)
                        continue
                try:
                    timeout = self._service()
                except Exception as exc:  # noqa: BLE001 - any Snap7/socket error means the link is down
                    self._link_down(exc)
                    continue
                if timeout > 0:
                    self._wake.wait(timeout)
                self._wake.clear()
        finally:
            self._shutdown()

    def _connect(self) -> bool:
        cfg = self.config
        client = None
        try:
            client = self._client_factory()
            client.connect(cfg.host, cfg.rack, cfg.slot, cfg.port)
            _set_io_timeout(client, cfg.io_timeout_s)
            try:
                data = client.db_read(cfg.db, 0, DB_SIZE)
            except Exception as exc:  # noqa: BLE001
                raise PlcLinkError(
                    f"connected to {cfg.host}:{cfg.port} but cannot read DB{cfg.db} bytes 0..{DB_SIZE - 1}: {exc}. "
                    f"Check that DB{cfg.db} exists with >= {DB_SIZE} bytes (deploy/plc/DB100_Vision.db), that its "
                    f"'Optimized block access' is off, and that PUT/GET access is permitted in the CPU's protection "
                    f"settings (docs/plc-interface.md)") from exc
        except Exception as exc:  # noqa: BLE001
            with self._lock:
                self._stats["connect_failures"] += 1
                self._stats["last_error"] = str(exc)
            self._log.warning("plc_connect_failed", error=str(exc), rack=cfg.rack, slot=cfg.slot)
            _disconnect_quietly(client)
            return False

        now = time.monotonic()
        inputs = unpack_inputs(data, base=0)
        seq = int(s7util.get_dint(data, RESULT_START))
        vision_hb = int(s7util.get_int(data, STATUS_START))
        previous = self._last_part_id
        if previous is not None and inputs.part_id not in (0, previous):
            # The PLC announced at least one part while we were away; its own watchdog handles it.
            self._count("parts_missed_on_reconnect")
            self._log.warning("plc_parts_missed_while_down", last_seen=previous, current=inputs.part_id)
        with self._lock:
            self._client = client
            self._epoch += 1
            self._stats["connects"] += 1
            if self._stats["connects"] > 1:
                self._stats["reconnects"] += 1
            self._result_seq = seq
            self._vision_hb = vision_hb
            self._plc_hb = inputs.plc_heartbeat
            self._plc_hb_changed = now
            self._enable = inputs.enable
            self._status_dirty = True
            if inputs.part_id:
                self._last_part_id = inputs.part_id  # baseline: a PartId already there is not announced
            self._next_poll = now + cfg.poll_interval_s
            self._next_status = now
            self._up_evt.set()
        self._log.info("plc_link_up", epoch=self._epoch, result_seq=seq, part_id=inputs.part_id,
                       enable=inputs.enable)
        self._emit(PlcEvent("link", now, enable=inputs.enable, connected=True))
        self._emit(PlcEvent("enable", now, enable=inputs.enable))
        return True

    def _link_down(self, exc: BaseException) -> None:
        client, self._client = self._client, None
        _disconnect_quietly(client)
        with self._lock:
            self._stats["last_error"] = str(exc)
            self._up_evt.clear()
            queued = list(self._results)
            self._results.clear()
            for q in queued:
                self._drop_locked(q.verdict, "link_down")
        self._log.warning("plc_link_down", error=str(exc), error_type=type(exc).__name__, dropped=len(queued))
        self._emit(PlcEvent("link", time.monotonic(), enable=bool(self._enable), connected=False))

    def _service(self) -> float:
        """One pass: poll, results, status. Returns the seconds until the next deadline."""
        cfg = self.config
        now = time.monotonic()
        if now >= self._next_poll:
            self._poll()
            now = time.monotonic()
            self._next_poll = max(self._next_poll + cfg.poll_interval_s, now + cfg.poll_interval_s / 2)
        while self._results and now - self._last_result_write >= cfg.min_result_interval_s:
            with self._lock:
                item = self._results.popleft() if self._results else None
            if item is None:
                break
            self._write_result(item)
            now = time.monotonic()
        with self._lock:
            dirty = self._status_dirty
        if dirty or now >= self._next_status:
            self._write_status()
            now = time.monotonic()
        deadlines = [self._next_poll, self._next_status]
        if self._results:
            deadlines.append(self._last_result_write + cfg.min_result_interval_s)
        return max(0.0, min(deadlines) - now)

    def _poll(self) -> None:
        try:
            data = self._client.db_read(self.config.db, INPUT_START, INPUT_SIZE)
        except Exception:
            self._count("read_failures")
            raise
        now = time.monotonic()
        inputs = unpack_inputs(data)
        if inputs.enable != self._enable:
            self._enable = inputs.enable
            self._log.info("plc_enable", enable=inputs.enable)
            self._emit(PlcEvent("enable", now, enable=inputs.enable))
        if inputs.plc_heartbeat != self._plc_hb:
            self._plc_hb, self._plc_hb_changed = inputs.plc_heartbeat, now
            if self._plc_stale:
                with self._lock:
                    self._plc_stale, self._status_dirty = False, True
                self._log.info("plc_heartbeat_ok", plc_heartbeat=inputs.plc_heartbeat)
        elif not self._plc_stale and now - self._plc_hb_changed > self.config.plc_heartbeat_timeout_s:
            with self._lock:
                self._plc_stale, self._status_dirty = True, True
            self._log.warning("plc_heartbeat_stale", plc_heartbeat=inputs.plc_heartbeat,
                              unchanged_s=round(now - self._plc_hb_changed, 3), action="Fault=1",
                              hint="PLC in STOP, or its program does not increment PlcHeartbeat")
        pid = inputs.part_id
        if pid and pid != self._last_part_id:
            previous = self._last_part_id
            if previous is not None and 1 < pid - previous <= _MISSED_GAP_MAX:
                # the PLC wrote more than one PartId since the last poll: the ones between were never seen, so
                # never answered; the PLC's watchdog rejects them. Counted where the operators look.
                missed = list(range(previous + 1, pid))
                with self._lock:
                    self._stats["parts_missed"] += len(missed)
                    self._stats["results_dropped"] += len(missed)  # = the sum of dropped_by_reason, as the metric
                    self._dropped["part_id_missed"] += len(missed)
                    self._missed.extend(missed)
                self._log.warning("plc_part_ids_missed", first=missed[0], last=missed[-1], count=len(missed),
                                  poll_ms=round(self.config.poll_interval_s * 1000.0, 1),
                                  hint="two PartIds within one poll: the part period is shorter than the poll, or "
                                       "the daemon stalled; the PLC's watchdog rejects these parts")
            self._last_part_id = pid
            self._announced[pid] = self._epoch
            self._announced.move_to_end(pid)
            while len(self._announced) > _ANNOUNCED_MAX:
                self._announced.popitem(last=False)
            self._count("parts_detected")
            self._emit(PlcEvent("part", now, part_id=pid, enable=inputs.enable))

    def _write_status(self, final: bool = False) -> None:
        cfg = self.config
        now = time.monotonic()
        with self._lock:
            status = replace(self._status, fault=self._status.fault or self._plc_stale)
            if final:
                status = replace(status, ready=False)
            self._status_dirty = False
            silent = cfg.app_watchdog_s is not None and now - self._last_touch > cfg.app_watchdog_s
        if silent != self._app_silent:
            self._app_silent = silent
            if silent:
                self._log.warning("vision_heartbeat_held", reason="app silent", silent_for_s=cfg.app_watchdog_s)
            else:
                self._log.info("vision_heartbeat_resumed")
        hb = self._vision_hb if silent else wrap_int(self._vision_hb + 1)
        try:
            self._client.db_write(cfg.db, STATUS_START, pack_status(hb, status))
        except Exception:
            with self._lock:
                self._stats["write_failures"] += 1
                self._status_dirty = True
            raise
        with self._lock:
            self._vision_hb = hb
            self._stats["status_writes"] += 1
        self._next_status = now + cfg.status_interval_s

    def _write_result(self, item: _Queued) -> None:
        v = item.verdict
        epoch = self._announced.get(v.part_id)
        if epoch is None:
            self._drop(v, "unannounced")
            return
        if epoch == _RESOLVED:
            self._drop(v, "duplicate")
            return
        if epoch != self._epoch:
            self._drop(v, "stale_epoch")
            return
        seq = wrap_dint(self._result_seq + 1)
        now = time.monotonic()
        inspect_ms = None if item.arrival is None else (now - item.arrival) * 1000.0
        try:
            buf = pack_result(v, seq, inspect_ms=inspect_ms)
        except ValueError as exc:
            self._log.error("plc_result_invalid", part_id=v.part_id, error=str(exc))
            self._drop(v, "invalid")
            return
        try:
            self._client.db_write(self.config.db, RESULT_START, buf)
        except Exception:
            with self._lock:
                self._stats["write_failures"] += 1
                self._drop_locked(v, "write_failed")
            raise
        done = time.monotonic()
        self._last_result_write = done
        self._announced[v.part_id] = _RESOLVED
        with self._lock:
            self._result_seq = seq
            self._stats["results_written"] += 1
            latency = (done - item.published) * 1000.0
            self._stats["last_latency_ms"] = latency
            prev = self._stats["max_latency_ms"]
            self._stats["max_latency_ms"] = latency if prev is None else max(prev, latency)
        self._log.debug("plc_result_written", part_id=v.part_id, seq=seq, verdict=v.label)

    def _shutdown(self) -> None:
        if self._client is not None:
            try:
                while True:
                    with self._lock:
                        item = self._results.popleft() if self._results else None
                    if item is None:
                        break
                    wait = self._last_result_write + self.config.min_result_interval_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self._write_result(item)
                self._write_status(final=True)
                self._log.info("plc_link_stopped", result_seq=self._result_seq, ready=False)
            except Exception as exc:  # noqa: BLE001
                self._log.warning("plc_final_write_failed", error=str(exc))
            _disconnect_quietly(self._client)
            self._client = None
        with self._lock:
            queued = list(self._results)
            self._results.clear()
            for q in queued:
                self._drop_locked(q.verdict, "link_down")
            self._up_evt.clear()


def _set_io_timeout(client: Any, seconds: float) -> None:
    """Best effort: python-snap7 3.x has no public receive-timeout setter; its socket defaults to 5 s."""
    conn = getattr(client, "connection", None)
    sock = getattr(conn, "socket", None)
    if sock is not None:
        conn.timeout = seconds
        sock.settimeout(seconds)


def _disconnect_quietly(client: Any) -> None:
    if client is None:
        return
    try:
        client.disconnect()
    except Exception:  # noqa: BLE001, S110 - the connection is being thrown away
        pass
