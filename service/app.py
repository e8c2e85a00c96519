"""The inspection daemon: wiring only.

    PLC link (owner thread) --PartId--> control loop --software trigger--> camera (grab thread)
    camera --Frame / GrabFailure--> PartBook + bounded frame queue --> inference worker
    inference worker: ROI -> 8 slices -> ONNX (probs + Grad-CAM++) -> Otsu -> decide -> Verdict
    Verdict -> PartBook (exactly once per PartId) -> PLC link, metrics, log, reject archive

The stages of one frame are service.pipeline.inspect_frame, the part book service.parts.PartBook, the
demo's frames service.sim.demo; this module builds the components, runs the threads, and is the CLI.

Rules this module enforces:
- Every announced PartId gets exactly one result (PartBook.claim): the first of inspection,
  camera failure, overflow, timeout or shutdown wins; a late inspection is counted and dropped.
- Grabbing never waits for inference: the camera callback only enqueues (bounded). When the queue
  is full the part is reported NotInspected at once (policy ``pipeline.overflow = not-inspected``)
  and counted in ``valve_inspect_frames_dropped_total``.
- A part that was not fully inspected is never Accept (service.decide and Verdict enforce it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import notify
from service.config import GPU_PROVIDERS, Settings, load_config
from service.errors import CameraError, FatalError, GrabTimeout, ValveInspectError
from service.logs import configure_logging, get_logger
from service.metrics import Metrics
from service.parts import OpenPart, PartBook
from service.pipeline import inspect_frame
from service.records import DEFECTS_TABLE, Frame, Verdict
from service.sim.demo import bmp_frames, demo_frames

log = get_logger("service.app")

STOP_BUDGET_S = 8.0  # SIGTERM -> exit, inside systemd's 10 s
DEMO_ARCHIVE_QUOTA_MB = 200  # the embedded demo (no --config) writes its rejects to ~/.cache
#: The embedded demo's automatic part rate keeps one inspection worker busy about this fraction of the time:
#: the camera emulator, the PLC simulator, the live view's JPEGs and the archive's PNGs share the same cores.
DEMO_LOAD = 0.35
DEMO_MIN_RATE_HZ = 0.2  # the automatic rate never goes below one part every 5 s


# ------------------------------------------------------------------------------------ the daemon


@dataclass
class _Job:
    frame: Frame
    part_id: int | None


@dataclass
class DaemonStats:
    started: float = field(default_factory=time.monotonic)
    parts: int = 0
    inspected: int = 0
    overflow: int = 0
    late_results: int = 0
    unpaired_frames: int = 0
    skipped_closed: int = 0  # frames not inspected because their part had already timed out
    skipped_no_time: int = 0  # frames not inspected because their part's deadline was nearer than one inspection
    verdicts: dict[str, int] = field(default_factory=lambda: {"accept": 0, "reject": 0, "no_part": 0,
                                                               "not_inspected": 0})


class Daemon:
    """The running line. ``start()`` builds and starts everything; ``stop()`` ends it cleanly.

    Args:
        settings: the validated configuration.
        metrics: a Metrics (fresh registry in tests); default: a new one on the default registry.
        plc_simulator: an already running PlcSimulator to use instead of starting one
            (plc.mode = simulated only).
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, plc_simulator: Any = None,
                 demo_manifest: list[str] | None = None, demo_rate: float | str | None = None) -> None:
        if not (demo_rate is None or demo_rate == "auto"
                or (isinstance(demo_rate, (int, float)) and not isinstance(demo_rate, bool) and demo_rate > 0)):
            raise ValueError(f"demo_rate must be None, 'auto' or a rate > 0 (parts/s), got {demo_rate!r}")
        self.settings = settings
        self._demo_rate = demo_rate
        self.metrics = metrics or Metrics()
        self.stats = DaemonStats()
        self._sim = plc_simulator
        self._own_sim = False
        self._demo_manifest = demo_manifest
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.pipeline.queue_size)
        self.book = PartBook(settings.pipeline.part_timeout_s)
        self._enabled = True
        self._latest_part_id: int | None = None  # the last PartId the PLC announced (hardware trigger pairing)
        self._plc_link_ups = 0
        self._plc_drops_seen: dict[str, int] = {}
        self._loop_beat = time.monotonic()
        self._worker_beat = time.monotonic()
        self._worker_busy_since: dict[int, float] = {}  # worker index -> when its current inspection began
        self._stats_lock = threading.Lock()  # stats are updated by the control loop, the grab thread, the workers
        self._inspect_s: float | None = None  # moving average of one inspection's wall time (seconds)
        self._mixed_warned = 0.0  # when the mixed-simulation warning was last logged
        self.model = None
        self.unknown_threshold: float | None = None  # the unknown-score threshold in use (None: no score)
        self.camera = None
        self.plc = None
        self.archive = None
        self.http = None
        self.live = None  # service.ui.LiveParts: what the live view shows
        self.ui = None
        self._pinger = None
        self._threads: list[threading.Thread] = []
        from service.roi import RoiParams

        self.roi_params = RoiParams.from_settings(settings.roi)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Daemon:
        from service.camera import Camera
        from service.infer import InferenceModel
        from service.plc import PlcLink, PlcLinkConfig

        s = self.settings
        # 1. The model: a bad model file is fatal, before anything touches the line.
        self.model = InferenceModel(s.model.path or None, providers=tuple(s.model.providers),
                                    require_gpu=s.model.require_gpu, intra_op_threads=s.model.intra_op_threads)
        from service.decide import resolve_unknown_threshold, validate_thresholds

        self.thresholds = validate_thresholds(s.model.thresholds.model_dump(), self.model.classes)
        self.unknown_threshold = resolve_unknown_threshold(s.model.unknown_threshold, self.model)
        gpu = self.model.provider in GPU_PROVIDERS
        self.metrics.set_model_info(self.model.sha256, self.model.provider, self.model.preset)
        log.info("model_loaded", provider=self.model.provider, sha256=self.model.sha256, preset=self.model.preset,
                 classes=list(self.model.classes), gpu=gpu, unknown_threshold=self.unknown_threshold,
                 unknown_threshold_from="config" if s.model.unknown_threshold else "model.json",
                 unknown_rule=s.model.unknown_rule)

        # 2. Metrics endpoint.
        if s.metrics.enabled:
            self.http = self.metrics.start_http(s.metrics.host, s.metrics.port)
            log.info("metrics_serving", url=self.http.url)

        # 2b. The live view (read-only). It is not needed to inspect: a port that is taken is logged, not fatal.
        if s.ui.enabled:
            from service.ui import LiveParts, start_ui

            self.live = LiveParts()
            try:
                self.ui = start_ui(s.ui.host, s.ui.port, self.live, self.ui_status, token=s.ui.token)
                log.info("ui_serving", url=self.ui.url, token_required=bool(s.ui.token))
            except OSError as exc:
                self.live = None
                log.error("ui_unavailable", error=str(exc), fix="free the port, or change [ui] port / enabled")

        # 3. Archive.
        if s.archive.enabled:
            from service.archive import RejectArchive
            from service.config import state_dir

            root = Path(s.archive.dir) if s.archive.dir else state_dir() / "archive"
            self.archive = RejectArchive(root, s.archive.quota_mb * 2**20, labels=tuple(s.archive.save),
                                         accept_every=s.archive.accept_every)

        # 4. PLC: the in-process simulator first (demo), then our client link to it.
        if s.plc.mode == "simulated" and self._sim is None:
            from service.sim.plc_sim import PlcSimulator

            rate = s.plc.sim_rate_hz
            if self._demo_rate == "auto":
                rate = self._fit_demo_rate(rate)
            elif self._demo_rate is not None:
                rate = float(self._demo_rate)
            self._sim = PlcSimulator(host=s.plc.host, port=s.plc.port, db=s.plc.db, rate=rate,
                                     watchdog_s=s.plc.sim_watchdog_s, manifest=self._demo_manifest)
            self._sim.start()
            self._own_sim = True
            log.info("plc_simulator_started", port=self._sim.port, rate_hz=rate)
        simulated = s.simulated_parts
        for component in ("camera", "plc"):
            self.metrics.simulated.labels(component=component).set(1 if component in simulated else 0)
        self.metrics.simulation_mixed.set(1 if s.mixed_simulation else 0)
        if s.mixed_simulation:  # allowed by the loader only with simulation.mix_with_real_hardware = true
            self._warn_mixed()
        self.plc = PlcLink(PlcLinkConfig.from_settings(s.plc))
        self.plc.set_status(ready=False, camera_ok=False, model_ok=True, gpu_active=gpu, fault=False,
                            simulated=bool(simulated))
        self.plc.start()

        # 5. Camera: grab thread delivers into on_event, which never blocks.
        self.camera = Camera(s.camera, on_event=self._on_camera_event, metrics=self.metrics)
        self.camera.start(require_camera=False)

        # 6. Threads.
        workers = [(f"inspect-{i}", functools.partial(self._worker, i)) for i in range(s.pipeline.workers)]
        for name, target in (*workers, ("control", self._control)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._pinger = notify.WatchdogPinger(self.healthy).start()
        notify.ready("inspecting")
        log.info("daemon_started", camera=s.camera.source, trigger=s.camera.trigger, plc=s.plc.mode,
                 plc_port=s.plc.port, queue_size=s.pipeline.queue_size, workers=s.pipeline.workers,
                 intra_op_threads=s.model.intra_op_threads)
        return self

    def stop(self, reason: str = "stop") -> None:
        """Stop within STOP_BUDGET_S: no new parts, drain the queue, camera closed, last results written."""
        if self._stopped.is_set():
            return
        t0 = time.monotonic()
        notify.stopping()
        log.info("daemon_stopping", reason=reason, open_parts=len(self.book), queued=self._jobs.qsize())
        self._stop.set()
        if self.camera is not None:
            self.camera.close()
        # Let the worker finish what is queued, bounded.
        deadline = t0 + STOP_BUDGET_S / 2
        while not self._jobs.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(self.settings.pipeline.workers):
            with contextlib.suppress(queue.Full):
                self._jobs.put_nowait(None)
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.plc is not None:  # PartIds the link announced that the stopped control loop never took
            self._answer_dropped_part_events()
            while (ev := self.plc.next_event(timeout=0)) is not None:
                if ev.kind == "part" and self.book.announce(ev.part_id, ev.at):
                    self.stats.parts += 1
        for p in self.book.drain():
            self._finish_claimed(p, Verdict.make_not_inspected(p.part_id, "shutdown", frame_id=p.frame_id))
        if self.plc is not None:
            self.plc.set_status(ready=False)
            self.plc.stop(timeout=max(0.5, t0 + STOP_BUDGET_S - 1.0 - time.monotonic()))
            self._sync_plc_drops()
        if self._pinger is not None:
            self._pinger.stop()
        if self.archive is not None:
            self.archive.close(timeout=1.0, grace=2.0)  # the writer never outlives stop() mid-encode
        if self._own_sim and self._sim is not None:
            self._sim.stop()
        if self.http is not None:
            self.http.stop()
        if self.ui is not None:
            self.ui.stop()
        self._stopped.set()
        log.info("daemon_stopped", seconds=round(time.monotonic() - t0, 3), **self.summary())

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def queue_depth(self) -> int:
        """Frames waiting for an inspection worker (the bounded queue of [pipeline] queue_size)."""
        return self._jobs.qsize()

    @property
    def stop_requested(self) -> bool:
        """True once a stop was asked for (request_stop(), a signal, or stop() itself)."""
        return self._stop.is_set()

    def healthy(self) -> bool:
        """For the systemd watchdog: the control loop runs and the worker is not stuck."""
        now = time.monotonic()
        if now - self._loop_beat > 5.0:
            return False
        return not any(now - since > 10.0 for since in list(self._worker_busy_since.values()))

    def ui_status(self) -> dict[str, Any]:
        """The daemon's side of the live view's /api/status (called on the view's thread)."""
        with self._stats_lock:
            counts = dict(self.stats.verdicts)
        model = self.model
        return {"parts": counts, "parts_announced": self.stats.parts,
                "camera_connected": bool(self.camera is not None and self.camera.connected),
                "plc_connected": bool(self.plc is not None and self.plc.connected),
                "provider": model.provider if model is not None else None,
                "gpu": bool(model is not None and model.provider in GPU_PROVIDERS),
                "provider_reason": getattr(model, "provider_reason", None),
                "model": {"sha256": model.sha256, "preset": model.preset} if model is not None else None,
                "simulated": list(self.settings.simulated_parts), "enabled": self._enabled,
                "uptime_s": round(time.monotonic() - self.stats.started, 1)}

    def summary(self) -> dict[str, Any]:
        out = {"parts": self.stats.parts, "inspected": self.stats.inspected, "overflow": self.stats.overflow,
               "skipped_closed": self.stats.skipped_closed, "skipped_no_time": self.stats.skipped_no_time,
               "late_results": self.book.late, **{f"verdict_{k}": v for k, v in self.stats.verdicts.items()}}
        if self._sim is not None:
            sim = self._sim.stats()
            out.update(sim_results=sim.get("results"), sim_accuracy=sim.get("accuracy"),
                       sim_watchdog_rejects=sim.get("watchdog_rejects"), sim_scored=sim.get("scored"))
        return out

    # ------------------------------------------------------------------ control loop

    def _warn_mixed(self) -> None:
        """The mixed line's warning (at start, then every simulation.warn_interval_s from the control loop)."""
        s = self.settings
        self._mixed_warned = time.monotonic()
        log.warning("simulation_mixed_with_real_hardware", simulated=list(s.simulated_parts),
                    camera=s.camera.source, plc=s.plc.mode, key="simulation.mix_with_real_hardware",
                    detail="a simulator shares the line with real hardware: verdicts are not of real parts "
                           "(camera emulator) or never reach the real line (PLC simulator); PLC status bit "
                           "Simulated = 1; for commissioning only")

    def _control(self) -> None:
        last_status = 0.0
        mixed = self.settings.mixed_simulation
        while not self._stop.is_set():
            self._loop_beat = now = time.monotonic()
            if mixed and now - self._mixed_warned >= self.settings.simulation.warn_interval_s:
                self._warn_mixed()
            self.plc.touch()
            ev = self.plc.next_event(timeout=0.02)
            if ev is not None:
                self._on_plc_event(ev)
            self._answer_dropped_part_events()
            for p in self.book.expired(time.monotonic()):
                reason = "timeout_no_frame" if p.arrival is None else "timeout_inspection"
                self._finish_claimed(p, Verdict.make_not_inspected(p.part_id, reason, frame_id=p.frame_id))
            if now - last_status >= 0.2:
                last_status = now
                self._sync_plc_drops()
                cam_ok = bool(self.camera.connected)
                self.metrics.set_plc_connected(self.plc.connected)
                self.plc.set_status(ready=cam_ok and self._enabled and not self._stop.is_set(), camera_ok=cam_ok,
                                    fault=not cam_ok)

    def _answer_dropped_part_events(self) -> None:
        """PartIds whose event the link dropped from its full queue (the loop fell behind): each is answered
        NotInspected "event_overflow" while the PLC still waits for it (within part_timeout_s of its
        detection), else counted in valve_inspect_plc_results_dropped_total{reason="event_overflow"}
        (the PLC's watchdog has rejected it by then). Never silently lost."""
        for ev in self.plc.take_dropped_parts():
            late = time.monotonic() - ev.at >= self.settings.pipeline.part_timeout_s
            log.warning("plc_part_event_dropped", part_id=ev.part_id, answered=not late,
                        age_ms=round((time.monotonic() - ev.at) * 1000.0, 1))
            if late or not self.book.announce(ev.part_id, ev.at):
                if late:
                    self.metrics.plc_results_dropped.labels(reason="event_overflow").inc()
                continue
            self.stats.parts += 1
            self._finish(ev.part_id, Verdict.make_not_inspected(ev.part_id, "event_overflow"))

    def _sync_plc_drops(self) -> None:
        """Mirror the link's dropped-result counts (by reason) into valve_inspect_plc_results_dropped_total."""
        for reason, n in self.plc.stats().get("dropped_by_reason", {}).items():
            seen = self._plc_drops_seen.get(reason, 0)
            if n > seen:
                self.metrics.plc_results_dropped.labels(reason=reason).inc(n - seen)
                self._plc_drops_seen[reason] = n

    def _on_plc_event(self, ev) -> None:
        if ev.kind == "enable":
            if ev.enable != self._enabled:
                log.info("plc_enable", enable=ev.enable)
            self._enabled = ev.enable
            return
        if ev.kind == "link":
            log.info("plc_link", connected=ev.connected)
            self.metrics.set_plc_connected(ev.connected)
            if ev.connected:  # every link-up after the first is a reconnect
                if self._plc_link_ups:
                    self.metrics.plc_reconnects.inc()
                self._plc_link_ups += 1
            return
        if ev.kind != "part":
            return
        self._enabled = ev.enable
        self._latest_part_id = ev.part_id
        self.stats.parts += 1
        if not self.book.announce(ev.part_id, ev.at):
            log.warning("duplicate_part_id", part_id=ev.part_id)
            return
        if not ev.enable:
            self._finish(ev.part_id, Verdict.make_not_inspected(ev.part_id, "inspection_disabled"))
            return
        if self.settings.camera.trigger == "software":
            # The part stands in front of the camera for trigger_window_ms after its PartId: firing later
            # would image whatever is there then. Waiting for the camera is bounded by that window too,
            # so a slow camera costs one part, not every part behind it in the PLC's queue.
            left = self.settings.pipeline.trigger_window_ms / 1000.0 - (time.monotonic() - ev.at)
            if left <= 0:
                log.warning("trigger_late", part_id=ev.part_id, late_ms=round(-left * 1000.0, 1))
                self._finish(ev.part_id, Verdict.make_not_inspected(ev.part_id, "trigger_late"))
                return
            try:
                self.camera.trigger(part_id=ev.part_id,
                                    timeout_s=min(left, self.settings.camera.grab_timeout_ms / 1000.0))
            except GrabTimeout as exc:
                log.warning("camera_not_ready", part_id=ev.part_id, error=str(exc))
                self._finish(ev.part_id, Verdict.make_not_inspected(ev.part_id, "camera_not_ready"))
            except (CameraError, RuntimeError) as exc:
                log.warning("trigger_failed", part_id=ev.part_id, error=str(exc))
                self._finish(ev.part_id, Verdict.make_not_inspected(ev.part_id, "trigger_failed"))

    # ------------------------------------------------------------------ camera callback (grab thread)

    def _on_camera_event(self, ev) -> None:
        trigger = self.settings.camera.trigger
        part_id = ev.part_id
        if part_id is None and trigger == "hardware":
            # The rule: a hardware-triggered frame belongs to the PartId read at its arrival
            # (the PLC writes PartId before it fires Line1). Only while that part still waits for a
            # frame: a second frame for it, or one after it closed, is dropped, never re-paired.
            latest = self._latest_part_id
            if latest is None or not self.book.waiting_for_frame(latest):
                self.stats.unpaired_frames += 1
                log.warning("frame_without_waiting_part", frame_id=getattr(ev, "frame_id", None),
                            latest_part_id=latest)
                return
            part_id = latest
        if not isinstance(ev, Frame):  # GrabFailure: that part cannot be inspected
            log.warning("grab_failed", part_id=part_id, kind=ev.kind, reason=ev.reason, frame_id=ev.frame_id)
            if part_id is not None:
                self._finish(part_id, Verdict.make_not_inspected(part_id, f"camera_{ev.kind}",
                                                                 frame_id=ev.frame_id or 0))
            return
        if part_id is not None and not self.book.frame_arrived(part_id, ev.arrival, ev.frame_id):
            log.warning("frame_for_closed_part", part_id=part_id, frame_id=ev.frame_id)
            return
        if part_id is None and trigger != "free-run":
            log.warning("frame_without_part", frame_id=ev.frame_id)
            return
        try:
            self._jobs.put_nowait(_Job(ev, part_id))
        except queue.Full:
            with self._stats_lock:
                self.stats.overflow += 1
            self.metrics.frames_dropped.inc()
            log.warning("inspection_overflow", part_id=part_id, frame_id=ev.frame_id,
                        queue_size=self.settings.pipeline.queue_size)
            if part_id is not None:
                self._finish(part_id, Verdict.make_not_inspected(part_id, "overflow", frame_id=ev.frame_id))

    # ------------------------------------------------------------------ inspection worker

    def _worker(self, index: int = 0) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                self._worker_beat = time.monotonic()
                if self._stop.is_set() and self._jobs.empty():
                    return
                continue
            if job is None:
                return
            if job.part_id is not None:
                left = self.book.time_left(job.part_id, time.monotonic())
                if left is None:
                    # Its part timed out while the frame waited (overload): the control loop has answered it.
                    # Inspecting it now would only take CPU from the parts that can still be answered.
                    with self._stats_lock:
                        self.stats.skipped_closed += 1
                    log.warning("frame_skipped_part_closed", part_id=job.part_id, frame_id=job.frame.frame_id)
                    continue
                expected = self._inspect_s
                if expected is not None and left < expected:
                    # It cannot finish before its deadline: answer it now and take a fresher frame, or
                    # every frame behind it in the queue would miss its deadline too.
                    with self._stats_lock:
                        self.stats.skipped_no_time += 1
                    log.warning("frame_skipped_no_time", part_id=job.part_id, frame_id=job.frame.frame_id,
                                left_ms=round(left * 1000.0, 1), expected_ms=round(expected * 1000.0, 1))
                    self._finish(job.part_id, Verdict.make_not_inspected(job.part_id, "overload",
                                                                         frame_id=job.frame.frame_id))
                    continue
            started = self._worker_busy_since[index] = time.monotonic()
            try:
                verdict, extras = self.inspect(job.frame, job.part_id or 0)
            except Exception as exc:  # never let one frame kill the loop
                log.exception("inspection_error", part_id=job.part_id, error=str(exc))
                verdict, extras = Verdict.make_not_inspected(job.part_id or 0, "inspection_error",
                                                             frame_id=job.frame.frame_id), None
            self._worker_busy_since.pop(index, None)
            self._worker_beat = done = time.monotonic()
            took = done - started  # a running estimate of one inspection, for the deadline check above
            self._inspect_s = took if self._inspect_s is None else 0.8 * self._inspect_s + 0.2 * took
            with self._stats_lock:
                self.stats.inspected += 1
            if job.part_id is None:  # free-run commissioning: no PartId to answer
                self._report(verdict, job.frame, extras, arrival=job.frame.arrival)
            else:
                self._finish(job.part_id, verdict, frame=job.frame, extras=extras)

    def _fit_demo_rate(self, most: float) -> float:
        """The embedded demo's part rate on this machine: ``most`` parts/s, or fewer where inspecting one of the
        demo's frames takes longer than DEMO_LOAD / ``most`` seconds (the median of 5, after the model's warm-up).

        The demo's simulated line should show the daemon inspecting its parts, not a CPU too slow for 4 parts/s
        answering most of them NotInspected. A real line's rate is its PLC's: this applies to the embedded demo
        only (``valve-inspect run`` without --config, or --demo-rate auto)."""
        import cv2
        import numpy as np

        from service.roi import extract

        folder = Path(self.settings.camera.images or "")  # a folder of frames, or one file (as the emulator takes)
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.glob("*") if p.suffix.lower() in (".bmp", ".png", ".tif", ".tiff"))
        image = None
        for path in files[:8]:  # the first frame with a valve in it: a frame without one never reaches the model
            candidate = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if candidate is None or candidate.ndim != 2 or candidate.dtype != np.uint8:
                continue
            try:
                extract(candidate, self.roi_params)
            except Exception:  # NoPartError, or a frame the ROI cannot read: try the next one
                continue
            image = candidate
            break
        if image is None:
            log.warning("demo_rate_not_measured", rate_hz=most, images=str(folder),
                        reason="no Mono8 frame with a valve among the first 8 files in camera.images")
            return most
        took = []
        try:
            for _ in range(5):
                t0 = time.monotonic()
                inspect_frame(Frame(image=image, frame_id=0, arrival=t0), 0, self.roi_params, self.model,
                              self.thresholds, unknown_threshold=self.unknown_threshold,
                              unknown_rule=self.settings.model.unknown_rule)
                took.append(time.monotonic() - t0)
        except Exception as exc:  # the line's workers answer such a frame NotInspected; here: keep the rate
            log.warning("demo_rate_not_measured", rate_hz=most, images=str(folder), error=str(exc),
                        reason="the inspection of a demo frame failed")
            return most
        one = sorted(took)[2]
        rate = min(most, max(DEMO_MIN_RATE_HZ, int(10.0 * DEMO_LOAD / one) / 10.0))
        if rate < most:
            log.warning("demo_rate_lowered", rate_hz=rate, default_hz=most, inspect_ms=round(one * 1000.0, 1),
                        reason=f"one inspection takes {one * 1000.0:.0f} ms on this machine: at {most:g} parts/s "
                               "the demo would answer parts NotInspected (overload)",
                        fix="valve-inspect run --demo-rate N sets the demo's rate; a real line's rate is its PLC's")
        else:
            log.info("demo_rate", rate_hz=rate, inspect_ms=round(one * 1000.0, 1))
        return rate

    def inspect(self, frame: Frame, part_id: int) -> tuple[Verdict, dict | None]:
        """One frame -> its Verdict (and what the archive needs); stage times go to the metrics."""
        return inspect_frame(frame, part_id, self.roi_params, self.model, self.thresholds,
                             observe=self.metrics.observe_stage, unknown_threshold=self.unknown_threshold,
                             unknown_rule=self.settings.model.unknown_rule)

    # ------------------------------------------------------------------ results

    def _finish(self, part_id: int, verdict: Verdict, frame: Frame | None = None, extras: dict | None = None) -> None:
        p = self.book.claim(part_id)
        if p is None:
            with self._stats_lock:
                self.stats.late_results += 1
            log.warning("late_result_dropped", part_id=part_id, verdict=verdict.label, reason=verdict.reason)
            return
        self._finish_claimed(p, verdict, frame, extras)

    def _finish_claimed(self, p: OpenPart, verdict: Verdict, frame: Frame | None = None,
                        extras: dict | None = None) -> None:
        arrival = frame.arrival if frame is not None else p.arrival
        t0 = time.monotonic()
        self.plc.publish(verdict, arrival=arrival)
        self.metrics.observe_stage("plc", time.monotonic() - t0)
        self._report(verdict, frame, extras, arrival=arrival if arrival is not None else p.announced)

    def _report(self, verdict: Verdict, frame: Frame | None, extras: dict | None, arrival: float | None) -> None:
        latency = time.monotonic() - arrival if arrival is not None else None
        self.metrics.record_verdict(verdict, latency_s=latency)
        with self._stats_lock:
            self.stats.verdicts[verdict.label] = self.stats.verdicts.get(verdict.label, 0) + 1
        timings = (extras or {}).get("timings", {})
        log.info("part", part_id=verdict.part_id, frame_id=verdict.frame_id, verdict=verdict.label,
                 defects=list(verdict.defects), reason=verdict.reason or None,
                 scores={d.name: round(getattr(verdict, d.score), 4) for d in DEFECTS_TABLE if d.score},
                 area_px={d.name: getattr(verdict, d.area) for d in DEFECTS_TABLE if d.area},
                 inspect_ms=round(verdict.inspect_ms, 2),
                 latency_ms=round(latency * 1000.0, 2) if latency is not None else None,
                 **{k: round(v, 2) for k, v in timings.items()})
        if self.live is not None:  # two reference stores; the view draws and encodes on its own thread
            self.live.put(verdict, frame.image if frame is not None else None, extras)
        if self.archive is not None and frame is not None and self.archive.wants(verdict):
            # By reference: the frame and the inspection's records are not modified after this; the archive's
            # thread draws the ROI overlay from them. submit() decides (save, or every Nth accept).
            self.archive.submit(frame.image, verdict, extras=extras, copy=False,
                                meta={"model_sha256": self.model.sha256 if self.model is not None else None})


# ------------------------------------------------------------------------------------ CLI


def _demo_rate(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not 0 < rate <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' or parts per second, > 0 and <= 1000")
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valve-inspect run",
                                description="Run the inspection daemon. Without --config: the embedded demo line "
                                            "(pylon emulator replaying synthetic frames, in-process PLC simulator, "
                                            "the shipped demo model, metrics on 127.0.0.1:9108).")
    p.add_argument("--config", "-c", help="TOML config file (see deploy/config.example.toml)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until "
                                                                 "SIGTERM/Ctrl-C)")
    p.add_argument("--demo-parts", type=int, default=24, help="demo: synthetic frames to render and replay")
    p.add_argument("--demo-rate", type=_demo_rate, default=None, metavar="auto|PARTS_PER_S",
                   help="the simulated PLC's part rate; 'auto' (the default without --config): [plc] sim_rate_hz "
                        f"(4 parts/s), or fewer where one inspection of a demo frame takes more than {DEMO_LOAD:g} / "
                        "sim_rate_hz seconds (about 88 ms at 4 parts/s); without it a config's simulated PLC runs "
                        "at its sim_rate_hz")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_config(args.config)
    except FatalError as exc:
        print(f"valve-inspect: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.demo_rate is not None and settings.plc.mode != "simulated":
        print("valve-inspect: --demo-rate sets the simulated PLC's part rate; the PLC configured here is real "
              f"([plc] mode = {settings.plc.mode!r}): its rate is the line's", file=sys.stderr)
        return 2
    configure_logging(settings.log.level, settings.log.format)
    demo_manifest = None
    demo_rate = args.demo_rate if args.demo_rate is not None else ("auto" if args.config is None else None)
    if settings.camera.source == "emulator" and not settings.camera.images:
        try:
            frames, classes = demo_frames(parts=args.demo_parts)
            frames = bmp_frames(frames)  # a camera's frame arrives without a decode (service.sim.demo.bmp_frames)
        except OSError as exc:
            print(f"valve-inspect: cannot prepare the demo's frames: {exc}", file=sys.stderr)
            return 1
        settings = settings.model_copy(update={"camera": settings.camera.model_copy(update={"images": str(frames)})})
        demo_manifest = classes * 10_000  # the emulator replays the folder in a loop
        if args.config is None and settings.archive.quota_mb > DEMO_ARCHIVE_QUOTA_MB:
            # the demo rejects about half its parts (~3 MB each): keep its cache footprint small
            settings = settings.model_copy(update={"archive": settings.archive.model_copy(
                update={"quota_mb": DEMO_ARCHIVE_QUOTA_MB})})
        log.info("demo_line", frames=str(frames), parts=len(classes), archive_quota_mb=settings.archive.quota_mb)
    daemon = Daemon(settings, demo_manifest=demo_manifest, demo_rate=demo_rate)

    def on_signal(signum, _frame):
        log.info("signal", signal=signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
    except FatalError as exc:
        log.error("fatal", error=str(exc), kind=type(exc).__name__)
        print(f"valve-inspect: {exc}", file=sys.stderr)
        daemon.stop("fatal")
        return exc.exit_code
    except (ValveInspectError, OSError) as exc:  # OSError: e.g. metrics.port already in use
        log.error("start_failed", error=str(exc), kind=type(exc).__name__)
        print(f"valve-inspect: {exc}", file=sys.stderr)
        daemon.stop("start_failed")
        return 1
    end = time.monotonic() + args.duration if args.duration else None
    try:
        while not daemon.wait(timeout=1.0):
            if end is not None and time.monotonic() >= end:
                break
    finally:
        daemon.stop("signal" if daemon.stop_requested else "duration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
