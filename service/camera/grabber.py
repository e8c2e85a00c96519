"""The grabber: :class:`Camera` grabs on its own thread, pairs each buffer with its trigger's PartId and
recovers from a lost camera; :class:`GrabFailure` is the event for a grab that gave no usable image.
The design (events, pairing, timeouts, recovery, configuration order) is in docs/camera.md.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.camera.device import NO_BLOCK_ID, Device, PylonDevice, RawGrab
from service.errors import BadFrame, CameraError, CameraRemoved, ConfigError, GrabFailed, GrabTimeout
from service.logs import get_logger
from service.records import Frame

if TYPE_CHECKING:
    from service.config import CameraSettings
    from service.metrics import Metrics

log = get_logger("service.camera")  # one logger name for the camera (as before the split)

#: RetrieveResult slice: how quickly the grab thread notices close(), removal and timeouts.
POLL_MS = 100
#: Consecutive grab timeouts after which the camera is re-created.
TIMEOUTS_BEFORE_RECONNECT = 3

#: Cameras with a running grab thread, closed at interpreter exit: a daemon thread still inside
#: pylon's RetrieveResult when Python finalises aborts the process ("exception not rethrown").
_LIVE: weakref.WeakSet[Camera] = weakref.WeakSet()
_atexit_registered = False


def _close_live_cameras() -> None:
    for cam in list(_LIVE):
        with contextlib.suppress(Exception):
            cam.close()


def _register_atexit() -> None:
    # Registered after pypylon's import (atexit runs last-in first-out): cameras close before pylon ends.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_close_live_cameras)
        _atexit_registered = True


@dataclass(frozen=True)
class GrabFailure:
    """A grab that gave no usable image; the part it was for (if known) cannot be inspected.

    Args:
        error: GrabFailed (failed buffer, or a frame the camera's frame counter shows was lost),
            GrabTimeout (frame missing), CameraRemoved / CameraError (the camera was lost, or the
            stream was resynchronised before the frame could be placed); str(error) is the reason.
        arrival: the camera's clock (time.monotonic() unless the Camera was given another) when the failure
            was noticed.
        frame_id: the failed buffer's frame id (failed buffers only).
        part_id: the PartId given to trigger(), when known.
        error_code: pylon's error code of a failed buffer (0 otherwise).
    """

    error: CameraError
    arrival: float
    frame_id: int | None = None
    part_id: int | None = None
    error_code: int = 0

    @property
    def kind(self) -> str:
        """failed_buffer | timeout | removed | error, or a bad frame's reason (wrong_size |
        wrong_pixel_format | truncated)."""
        if isinstance(self.error, BadFrame):
            return self.error.reason
        if isinstance(self.error, GrabFailed):
            return "failed_buffer"
        if isinstance(self.error, GrabTimeout):
            return "timeout"
        if isinstance(self.error, CameraRemoved):
            return "removed"
        return "error"

    @property
    def reason(self) -> str:
        return str(self.error)


CameraEvent = Frame | GrabFailure


def backoff_delays(min_s: float, max_s: float) -> Iterator[float]:
    """min_s, 2*min_s, 4*min_s, ... capped at max_s, forever."""
    delay = min_s
    while True:
        yield delay
        delay = min(delay * 2.0, max_s)


class _Pending:
    """One software trigger waiting for its buffer: its PartId, its number in the stream, when trigger() was
    called (t) and when the trigger had fired (``fired``, infinite until then: it cannot time out before)."""

    __slots__ = ("fired", "part_id", "seq", "t")

    def __init__(self, part_id: int | None, t: float, seq: int) -> None:
        self.part_id, self.t, self.seq = part_id, t, seq
        self.fired = math.inf


#: How many timed-out triggers of a stream are remembered, to name the part in the late-frame log line.
_EXPIRED_KEPT = 64
_GIGE_BLOCK_MAX = 0xFFFF


def _advance(prev: int, cur: int) -> int | None:
    """Frames counted from BlockID ``prev`` to ``cur``; None when the counter went back (it restarted)."""
    if cur >= prev:
        return cur - prev
    if prev <= _GIGE_BLOCK_MAX and cur >= 1:  # GigE Vision's 16-bit block_id: 65535 -> 1 (0 is not used)
        return cur + _GIGE_BLOCK_MAX - prev
    return None


class Camera:
    """The daemon's camera: configure, grab on a thread, deliver events, recover from loss.

    Args:
        settings: the [camera] section (service.config.CameraSettings).
        on_event: called on the grab thread with each Frame / GrabFailure; must return quickly.
            None: events go to a bounded queue read with get().
        queue_size: the internal queue's size (without on_event).
        metrics: service.metrics.Metrics to update (camera_connected, failed buffers, timeouts,
            reconnects, frames dropped, the "grab" stage = software trigger -> buffer arrived).
        device_factory: settings -> Device; default PylonDevice (tests pass a double).
        poll_ms: RetrieveResult slice.
        clock: the time source of trigger times, grab timeouts and event arrivals; default
            time.monotonic (tests pass one they move by hand).
    """

    def __init__(self, settings: CameraSettings, *, on_event: Callable[[CameraEvent], None] | None = None,
                 queue_size: int = 8, metrics: Metrics | None = None,
                 device_factory: Callable[[CameraSettings], Device] | None = None, poll_ms: int = POLL_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._on_event = on_event
        self._queue: queue.Queue[CameraEvent] = queue.Queue(maxsize=max(1, queue_size))
        self._metrics = metrics
        self._factory: Callable[[CameraSettings], Device] = device_factory or PylonDevice
        self._poll_ms = poll_ms
        self._lock = threading.RLock()  # the device reference: swaps, trigger(), feature access, close
        self._pending_lock = threading.Lock()
        self._connect_lock = threading.Lock()  # one connection attempt at a time
        self._pending: deque[_Pending] = deque()
        self._device: Device | None = None
        self._info: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ever_connected = False
        self._own_count = 0
        self._last_frame_t: float | None = None
        self._connected_t = 0.0
        self._timeouts_in_row = 0
        # The current stream (software trigger): next trigger number, the (BlockID, trigger number) of the
        # last buffer placed, timed-out trigger numbers -> PartId, and why it must be resynchronised (if so).
        self._seq_next = 0
        self._anchor: tuple[int, int] | None = None
        self._expired: dict[int, int | None] = {}
        self._resync_reason: str | None = None  # written under _pending_lock
        self._stats = {"frames": 0, "failed_buffers": 0, "bad_frames": 0, "timeouts": 0, "dropped": 0, "triggers": 0,
                       "late_frames_discarded": 0, "unmatched_frames_discarded": 0, "frames_lost": 0,
                       "resyncs": 0, "disconnects": 0, "reconnect_attempts": 0, "reconnects": 0,
                       "callback_errors": 0}
        self._last_frame_id: int | None = None
        self._last_error = ""
        self._set_connected_metric(False)

    # --------------------------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        return self._device is not None

    def open(self) -> Camera:
        """Connect now (enumerate, open, configure, start grabbing), without the grab thread.

        Raises:
            ConfigError: the camera rejects the configuration.
            CameraError: no camera, or it cannot be opened.
        """
        if self._closed:
            raise RuntimeError("Camera is closed; create a new one")
        self._connect()
        return self

    def start(self, require_camera: bool = False) -> Camera:
        """Connect and start the grab thread.

        A ConfigError is raised (fatal). A CameraError (camera absent at start) is raised only with
        ``require_camera``; otherwise it is logged and the grab thread keeps retrying with back-off
        (``connected`` stays False, triggers raise CameraRemoved meanwhile).
        """
        if self._closed:
            raise RuntimeError("Camera is closed; create a new one")
        if self._thread is not None:
            return self
        try:
            self.open()
        except CameraError as exc:
            if require_camera:
                raise
            self._last_error = str(exc)
            log.warning("camera_unavailable_at_start", error=str(exc), retry_in_s=self.settings.reconnect_min_s)
        self._thread = threading.Thread(target=self._run, name="camera-grab", daemon=True)
        _LIVE.add(self)
        _register_atexit()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the grab thread and release the camera. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        _LIVE.discard(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._poll_ms / 1000.0 + 10.0)
            if thread.is_alive():
                log.error("camera_grab_thread_did_not_stop")
        with self._lock:
            dev, self._device = self._device, None
            if dev is not None:
                dev.close()
        self._set_connected_metric(False)
        log.info("camera_closed", **self.stats())

    def __enter__(self) -> Camera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- use

    def trigger(self, part_id: int | None = None, timeout_s: float | None = None) -> None:
        """Software trigger: wait until the camera is ready (WaitForFrameTriggerReady), then fire.

        The resulting Frame (or GrabFailure) carries ``part_id``; when this call raises, no event
        for ``part_id`` follows.

        Raises:
            CameraRemoved: the camera is not connected (reconnecting).
            GrabTimeout: not ready for a trigger within timeout_s (default grab_timeout_ms); not fired.
            CameraError: pylon refused the trigger (the stream is then resynchronised: it may have
                fired), or the stream is being resynchronised.
            RuntimeError: camera.trigger is not "software".
        """
        if self.settings.trigger != "software":
            raise RuntimeError(f"trigger() needs camera.trigger = 'software' (it is {self.settings.trigger!r})")
        timeout_ms = int(1000 * timeout_s) if timeout_s is not None else self.settings.grab_timeout_ms
        with self._lock:
            dev = self._device
            if dev is None:
                raise CameraRemoved(f"camera not connected (reconnecting): part {part_id} cannot be grabbed")
            with self._pending_lock:  # in the queue before it fires: its buffer always finds it
                if self._resync_reason is not None:
                    raise CameraError(f"camera stream being resynchronised ({self._resync_reason}): part "
                                      f"{part_id} cannot be grabbed")
                entry = _Pending(part_id, self._clock(), self._seq_next)
                self._seq_next += 1
                self._pending.append(entry)
            try:
                dev.trigger(timeout_ms)
            except Exception as exc:
                with self._pending_lock:
                    placed = entry not in self._pending  # a buffer took it already (an untriggered frame)
                    with contextlib.suppress(ValueError):
                        self._pending.remove(entry)
                    if isinstance(exc, GrabTimeout) and not placed and self._seq_next == entry.seq + 1:
                        self._seq_next -= 1  # not ready: it never fired, so the camera counts no frame for it
                    elif self._resync_reason is None:
                        self._resync_reason = f"software trigger of part {part_id} failed: {exc}"
                if isinstance(exc, CameraError):
                    raise
                raise CameraError(f"software trigger failed: {exc}") from exc
            entry.fired = self._clock()
            self._stats["triggers"] += 1

    def get(self, timeout: float | None = None) -> CameraEvent | None:
        """The next event from the internal queue, or None after ``timeout`` seconds."""
        if self._on_event is not None:
            raise RuntimeError("this Camera delivers events to on_event; get() has nothing")
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_feature(self, name: str) -> Any:
        """A camera node's current value (e.g. "ExposureTime")."""
        return self._with_device(lambda d: d.get_feature(name))

    def set_feature(self, name: str, value: Any) -> None:
        """Set a camera node now (not kept across a reconnect: put it in camera.features for that)."""
        self._with_device(lambda d: d.set_feature(name, value))

    def execute(self, name: str) -> None:
        """Execute a command node (e.g. the emulator's "ForceFailedBuffer")."""
        self._with_device(lambda d: d.execute(name))

    def _with_device(self, fn: Callable[[Device], Any]) -> Any:
        with self._lock:
            if self._device is None:
                raise CameraRemoved("camera not connected")
            return fn(self._device)

    def stats(self) -> dict[str, Any]:
        """Counters since construction, plus the current state (for logs, the bench and tests)."""
        with self._pending_lock:
            pending = len(self._pending)
        return {"connected": self.connected, "device": dict(self._info), **self._stats,
                "pending_triggers": pending, "queue_depth": self._queue.qsize(),
                "last_frame_id": self._last_frame_id, "last_error": self._last_error}

    # ------------------------------------------------------------------------------- grab thread

    def _connect(self) -> None:
        # Not under self._lock: enumerating and opening take a while, and trigger() must fail fast meanwhile.
        with self._connect_lock:
            if self._device is not None:
                return
            dev = self._factory(self.settings)
            with self._lock:
                if self._stop.is_set():  # close() came while we were opening
                    dev.close()
                    return
                with self._pending_lock:
                    self._new_stream()
                self._device = dev
        self._info = dict(getattr(dev, "info", {}))
        self._connected_t = self._clock()
        self._last_frame_t = None
        self._timeouts_in_row = 0
        self._set_connected_metric(True)
        if self._ever_connected:
            self._stats["reconnects"] += 1
            if self._metrics is not None:
                self._metrics.camera_reconnects.inc()
            log.info("camera_reconnected", **self._info, reconnects=self._stats["reconnects"])
        else:
            log.info("camera_connected", **self._info, trigger=self.settings.trigger,
                     width=self.settings.width, height=self.settings.height)
        self._ever_connected = True

    def _run(self) -> None:
        delays: Iterator[float] | None = None
        while not self._stop.is_set():
            dev = self._device
            if dev is None:
                if delays is None:
                    delays = backoff_delays(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
                if self._stop.wait(next(delays)):
                    break
                self._stats["reconnect_attempts"] += 1
                try:
                    self._connect()
                    delays = None
                except (CameraError, ConfigError) as exc:
                    self._last_error = str(exc)
                    log.warning("camera_reconnect_failed", error=str(exc), attempts=self._stats["reconnect_attempts"])
                except Exception as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("camera_reconnect_failed", attempts=self._stats["reconnect_attempts"])
                continue
            if self._resync_reason is not None:
                self._resync(dev, self._resync_reason)
                continue
            try:
                grab = dev.retrieve(self._poll_ms)
            except Exception as exc:
                removed = self._safe_removed(dev)
                self._lose(dev, f"grab failed: {exc}", removed)
                continue
            now = self._clock()
            if grab is None:
                self._idle(dev, now)
            else:
                self._deliver(grab, now)

    def _safe_removed(self, dev: Device) -> bool:
        try:
            return dev.is_removed()
        except Exception:
            return False

    def _idle(self, dev: Device, now: float) -> None:
        if self._safe_removed(dev):
            self._lose(dev, "the camera was removed (disconnected, powered off or GigE heartbeat lost)", True)
            return
        limit = self.settings.grab_timeout_ms / 1000.0
        missing: list[int | None] = []
        counted = True
        if self.settings.trigger == "software":
            with self._pending_lock:
                while self._pending and now - self._pending[0].fired > limit:
                    entry = self._pending.popleft()
                    missing.append(entry.part_id)
                    self._expired[entry.seq] = entry.part_id
                    if len(self._expired) > _EXPIRED_KEPT:
                        del self._expired[next(iter(self._expired))]
                counted = self._anchor is not None
        elif self.settings.trigger == "free-run":
            since = self._last_frame_t if self._last_frame_t is not None else self._connected_t
            if now - since > limit:
                missing.append(None)
                self._last_frame_t = now  # one timeout per period without frames
        if not missing:
            return
        for part_id in missing:
            self._stats["timeouts"] += 1
            self._timeouts_in_row += 1
            if self._metrics is not None:
                self._metrics.camera_grab_timeouts.inc()
            what = "after the software trigger" if self.settings.trigger == "software" else "in free-run"
            err = GrabTimeout(f"no frame within {self.settings.grab_timeout_ms} ms {what}")
            log.warning("camera_grab_timeout", part_id=part_id, timeout_ms=self.settings.grab_timeout_ms,
                        in_a_row=self._timeouts_in_row)
            self._emit(GrabFailure(error=err, arrival=now, part_id=part_id))
        if self._timeouts_in_row >= TIMEOUTS_BEFORE_RECONNECT:
            self._lose(dev, f"{self._timeouts_in_row} grab timeouts in a row", False)
        elif not counted:  # the late buffer, if it comes, could not be told from the next part's
            self._resync(dev, f"grab timeout of part {missing[-1]} with no frame counter to pair by")

    def _deliver(self, grab: RawGrab, now: float) -> None:
        self._timeouts_in_row = 0
        self._last_frame_t = now
        frame_id = grab.block_id if grab.block_id != NO_BLOCK_ID else self._own_count
        self._own_count += 1
        self._last_frame_id = frame_id
        entry: _Pending | None = None
        if self.settings.trigger == "software":
            with self._pending_lock:
                outcome, entry, lost, late_part = self._place(grab.block_id)
            for skipped in lost:
                self._frame_lost(skipped, frame_id, now)
            if outcome == "late":
                self._stats["late_frames_discarded"] += 1
                log.warning("camera_late_frame_discarded", frame_id=frame_id, part_id=late_part,
                            timeout_ms=self.settings.grab_timeout_ms, ok=grab.ok,
                            late_frames_discarded=self._stats["late_frames_discarded"],
                            hint="the frame of a part already reported as a grab timeout came after "
                                 "camera.grab_timeout_ms; if this repeats, raise grab_timeout_ms")
                return
            if outcome == "unmatched":
                self._stats["unmatched_frames_discarded"] += 1
                log.error("camera_unmatched_frame_discarded", frame_id=frame_id, ok=grab.ok,
                          anchor=self._anchor, next_trigger=self._seq_next,
                          unmatched_frames_discarded=self._stats["unmatched_frames_discarded"])
                with self._pending_lock:
                    if self._resync_reason is None:
                        self._resync_reason = f"frame {frame_id} matches no software trigger"
                return
        part_id = entry.part_id if entry is not None else None
        bad = self._bad_frame(grab) if grab.ok else None
        if bad is not None:
            self._stats["bad_frames"] += 1
            if self._metrics is not None:
                self._metrics.camera_bad_frames.labels(reason=bad.reason).inc()
            log.warning("camera_bad_frame", frame_id=frame_id, part_id=part_id, reason=bad.reason, detail=str(bad),
                        bad_frames=self._stats["bad_frames"])
            self._emit(GrabFailure(error=bad, arrival=now, frame_id=frame_id, part_id=part_id))
            return
        if grab.ok and grab.image is not None:
            self._stats["frames"] += 1
            if entry is not None and self._metrics is not None:
                self._metrics.observe_stage("grab", now - entry.t)
            self._emit(Frame(image=grab.image, frame_id=frame_id, arrival=now, camera_timestamp=grab.timestamp,
                             part_id=part_id))
            return
        self._stats["failed_buffers"] += 1
        if self._metrics is not None:
            self._metrics.camera_failed_buffers.inc()
        desc = grab.description or "no description"
        err = GrabFailed(f"failed buffer (frame {frame_id}): {desc} (error code 0x{grab.error_code & 0xFFFFFFFF:08X})")
        log.warning("camera_failed_buffer", frame_id=frame_id, part_id=part_id,
                    error_code=f"0x{grab.error_code & 0xFFFFFFFF:08X}", description=desc,
                    failed_buffers=self._stats["failed_buffers"])
        self._emit(GrabFailure(error=err, arrival=now, frame_id=frame_id, part_id=part_id,
                               error_code=grab.error_code))

    def _bad_frame(self, grab: RawGrab) -> BadFrame | None:
        """A successful buffer that is not the configured frame: Mono8, camera.height x camera.width, whole."""
        s = self.settings
        img = grab.image
        expected = s.width * s.height
        if grab.pixel_format != "Mono8" or img is None or img.dtype != np.uint8 or img.ndim != 2:
            what = f"{grab.pixel_format}, " + ("no image" if img is None else f"{img.dtype} array of shape {img.shape}")
            return BadFrame("wrong_pixel_format", f"frame is not Mono8 ({what}): the camera's PixelFormat was "
                                                  "changed behind the daemon (pylon Viewer, a pfs file?); the "
                                                  "daemon sets Mono8 when it (re)connects")
        if grab.payload_size is not None and grab.payload_size < min(expected, img.size):
            return BadFrame("truncated", f"buffer holds {grab.payload_size} of {expected} bytes "
                                         f"({s.width}x{s.height} Mono8): a truncated transfer")
        if img.shape != (s.height, s.width):
            return BadFrame("wrong_size", f"frame is {img.shape[1]}x{img.shape[0]}, not camera.width x camera.height "
                                          f"= {s.width}x{s.height}: the camera's Width/Height/binning changed "
                                          "behind the daemon")
        return None

    def _place(self, block_id: int) -> tuple[str, _Pending | None, list[_Pending], int | None]:
        """Which trigger produced this buffer (under _pending_lock).

        Returns (outcome, entry, lost, late_part): outcome "match" (entry: its trigger, lost: the
        earlier triggers the frame counter skipped), "late" (its trigger already timed out; late_part
        is that part's id when still remembered) or "unmatched" (no trigger accounts for it).
        """
        if self._resync_reason is not None:  # a trigger of this stream may or may not have fired
            return "unmatched", None, [], None
        has_id = block_id != NO_BLOCK_ID
        if self._anchor is None:
            # No trigger of this stream has timed out (that resynchronises while there is no anchor), so
            # every earlier trigger got its buffer: this one is the oldest waiting trigger's.
            if not self._pending:
                return "unmatched", None, [], None
            entry = self._pending.popleft()
            if has_id:
                self._anchor = (block_id, entry.seq)
            return "match", entry, [], None
        if not has_id:
            return "unmatched", None, [], None
        step = _advance(self._anchor[0], block_id)
        if step is None:
            return "unmatched", None, [], None
        seq = self._anchor[1] + step
        if seq >= self._seq_next:
            return "unmatched", None, [], None
        self._anchor = (block_id, seq)
        lost: list[_Pending] = []
        while self._pending and self._pending[0].seq < seq:
            lost.append(self._pending.popleft())
        if self._pending and self._pending[0].seq == seq:
            return "match", self._pending.popleft(), lost, None
        return "late", None, lost, self._expired.pop(seq, None)

    def _frame_lost(self, entry: _Pending, frame_id: int, now: float) -> None:
        self._stats["frames_lost"] += 1
        if self._metrics is not None:
            self._metrics.camera_failed_buffers.inc()
        err = GrabFailed(f"frame lost: the camera's frame counter skipped it (frame {frame_id} arrived for a later "
                         "trigger)")
        log.warning("camera_frame_lost", part_id=entry.part_id, next_frame_id=frame_id,
                    frames_lost=self._stats["frames_lost"])
        self._emit(GrabFailure(error=err, arrival=now, part_id=entry.part_id))

    def _new_stream(self) -> None:
        """Forget the stream's trigger count and counter anchor (under _pending_lock, nothing pending)."""
        self._seq_next = 0
        self._anchor = None
        self._expired.clear()

    def _resync(self, dev: Device, reason: str) -> None:
        """Restart the stream: fail every waiting trigger, discard every buffer of the old stream."""
        t0 = time.monotonic()
        error: Exception | None = None
        with self._lock:  # no trigger fires meanwhile
            if self._device is not dev:
                return
            with self._pending_lock:
                stranded = [p.part_id for p in self._pending]
                self._pending.clear()
                self._new_stream()
            try:
                restart = getattr(dev, "resync", None)
                if restart is None:
                    raise CameraError("the device cannot restart its stream")
                restart()
            except Exception as exc:
                error = exc
            with self._pending_lock:
                self._resync_reason = None
        self._stats["resyncs"] += 1
        log.warning("camera_resynchronised", reason=reason, failed_parts=stranded,
                    seconds=round(time.monotonic() - t0, 3), resyncs=self._stats["resyncs"])
        now = self._clock()
        for part_id in stranded:
            err = CameraError(f"frame cannot be attributed safely: the camera stream was resynchronised ({reason})")
            self._emit(GrabFailure(error=err, arrival=now, part_id=part_id))
        if error is not None:
            self._lose(dev, f"resynchronisation failed: {error}", self._safe_removed(dev))

    def _lose(self, dev: Device, reason: str, removed: bool) -> None:
        with self._lock:
            if self._device is dev:
                self._device = None
            try:
                dev.close()
            except Exception as exc:
                log.debug("camera_close_failed", error=str(exc))
        self._set_connected_metric(False)
        self._stats["disconnects"] += 1
        self._last_error = reason
        log.error("camera_lost", reason=reason, removed=removed, retry_in_s=self.settings.reconnect_min_s,
                  disconnects=self._stats["disconnects"])
        with self._pending_lock:
            lost = [p.part_id for p in self._pending]
            self._pending.clear()
            self._resync_reason = None  # the next device starts a new stream
        cls = CameraRemoved if removed else CameraError
        now = self._clock()
        for part_id in lost or [None]:
            self._emit(GrabFailure(error=cls(f"camera lost: {reason}"), arrival=now, part_id=part_id))

    def _emit(self, event: CameraEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                self._stats["callback_errors"] += 1
                log.exception("camera_event_callback_failed")
            return
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    old = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self._stats["dropped"] += 1
                if self._metrics is not None:
                    self._metrics.frames_dropped.inc()
                log.warning("camera_queue_full_dropped_oldest", frame_id=getattr(old, "frame_id", None),
                            part_id=getattr(old, "part_id", None), dropped=self._stats["dropped"])

    def _set_connected_metric(self, connected: bool) -> None:
        if self._metrics is not None:
            self._metrics.set_camera_connected(connected)
