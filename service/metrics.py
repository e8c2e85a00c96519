"""Every Prometheus metric the daemon exports, in one place.

    metrics = Metrics()                          # its own CollectorRegistry (or pass one)
    metrics.record_verdict(verdict, latency_s=0.084)
    with metrics.time_stage("infer"): ...
    server = metrics.start_http("127.0.0.1", 9108); ...; server.stop()

Exported (Grafana's queries use these names):

    valve_inspect_parts_total{verdict}              accept | reject | no_part | not_inspected
    valve_inspect_defects_total{defect}             dirt | scratch | ec | unknown (per rejected part)
    valve_inspect_stage_seconds{stage}              histogram: grab | roi | infer | segment | plc
    valve_inspect_part_latency_seconds              histogram: PartId seen -> verdict written
    valve_inspect_unknown_ratio                     histogram: per inspected part, its highest slice unknown
                                                    score / the threshold in use (>= 1: RejectUnknown); only
                                                    for a model with the score; a drifting line shows here first
    valve_inspect_frames_dropped_total              frames not waited for (inference behind, queue full)
    valve_inspect_camera_connected                  1 / 0
    valve_inspect_camera_failed_buffers_total       buffers the camera delivered incomplete
    valve_inspect_camera_grab_timeouts_total        triggered frames (or free-run frames) that never came
    valve_inspect_camera_bad_frames_total{reason}   frames that arrived wrong: wrong_size | wrong_pixel_format | truncated
    valve_inspect_camera_reconnects_total           the camera re-created after it was lost
    valve_inspect_plc_connected                     1 / 0
    valve_inspect_plc_reconnects_total              the S7 link re-established after it dropped
    valve_inspect_model_info{sha256,provider,preset} 1
    valve_inspect_simulated{component}              camera | plc: 1 when that part of the line is a simulator
    valve_inspect_simulation_mixed                  1 when a simulator runs beside real hardware
                                                    ([simulation] mix_with_real_hardware; alert on it)

Every label value is created at zero up front, so rates and dashboards work before the first
event (and a missing series means a missing exporter, not "no rejects yet").
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from service.records import DEFECTS, VERDICT_LABELS, Verdict

STAGES = ("grab", "roi", "infer", "segment", "plc")

#: Per-stage durations: 0.5 ms (a ROI cut) .. 2.5 s (a stuck grab).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Whole-part latency: 10 ms .. 2 s (the PLC's verdict deadline), finer where the demo line sits.
LATENCY_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
#: unknown score / threshold: most good parts sit well below 1; >= 1 is RejectUnknown
UNKNOWN_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0, 10.0)


@dataclass
class MetricsServer:
    """The running /metrics endpoint; ``stop()`` closes the socket and joins the thread (idempotent)."""

    host: str
    port: int
    _server: object = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Metrics:
    """The daemon's metrics on one CollectorRegistry (a fresh one per instance unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r = self.registry
        self.parts = Counter("valve_inspect_parts", "Parts by verdict.", ["verdict"], registry=r)
        self.defects = Counter("valve_inspect_defects", "Rejected parts by defect class (a part may count "
                               "for several).", ["defect"], registry=r)
        self.stage_seconds = Histogram("valve_inspect_stage_seconds", "Time spent per pipeline stage.",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.part_latency = Histogram("valve_inspect_part_latency_seconds", "PartId seen -> verdict written.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.unknown_ratio = Histogram("valve_inspect_unknown_ratio", "Per inspected part: its highest slice "
                                       "unknown-defect score divided by the threshold in use (>= 1 rejects the "
                                       "part as RejectUnknown).", buckets=UNKNOWN_BUCKETS, registry=r)
        self.frames_dropped = Counter("valve_inspect_frames_dropped", "Frames not waited for because "
                                      "inference fell behind (the part is reported NotInspected).", registry=r)
        self.camera_connected = Gauge("valve_inspect_camera_connected", "1 while the camera is open and "
                                      "grabbing.", registry=r)
        self.camera_failed_buffers = Counter("valve_inspect_camera_failed_buffers", "Buffers the camera "
                                             "delivered incomplete or failed.", registry=r)
        self.camera_bad_frames = Counter("valve_inspect_camera_bad_frames", "Frames that arrived but are not "
                                         "the configured Mono8 frame (the part is reported NotInspected).",
                                         ["reason"], registry=r)
        self.camera_grab_timeouts = Counter("valve_inspect_camera_grab_timeouts", "Expected frames that did "
                                            "not arrive within camera.grab_timeout_ms.", registry=r)
        self.camera_reconnects = Counter("valve_inspect_camera_reconnects", "Times the camera was re-created "
                                         "after it was lost.", registry=r)
        self.plc_connected = Gauge("valve_inspect_plc_connected", "1 while the PLC link is up.", registry=r)
        self.plc_reconnects = Counter("valve_inspect_plc_reconnects", "Times the PLC link was re-established "
                                      "after it dropped.", registry=r)
        self.plc_results_dropped = Counter("valve_inspect_plc_results_dropped", "Results the PLC link did not "
                                           "write (link down, announced before a reconnect, ...): the PLC's "
                                           "watchdog counts those parts as rejected.", ["reason"], registry=r)
        self.model_info = Info("valve_inspect_model", "The loaded model: sha256 of model.onnx, ONNX Runtime "
                               "provider in use, architecture preset.", registry=r)
        self.simulated = Gauge("valve_inspect_simulated", "1 when this part of the line is a simulator "
                               "(camera: the pylon emulator; plc: the in-process PLC simulator).", ["component"],
                               registry=r)
        self.simulation_mixed = Gauge("valve_inspect_simulation_mixed", "1 when a simulator runs beside real "
                                      "hardware (simulation.mix_with_real_hardware): verdicts of simulated "
                                      "frames reach a real PLC, or real verdicts a simulated one.", registry=r)
        for component in ("camera", "plc"):
            self.simulated.labels(component=component)
        for reason in ("wrong_size", "wrong_pixel_format", "truncated"):
            self.camera_bad_frames.labels(reason=reason)
        for verdict in VERDICT_LABELS:
            self.parts.labels(verdict=verdict)
        for defect in DEFECTS:
            self.defects.labels(defect=defect)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    # ---------------------------------------------------------------------------------- recording

    def record_verdict(self, verdict: Verdict, latency_s: float | None = None) -> None:
        """Count one part: its verdict, each defect of a reject, and its latency.

        Args:
            verdict: the part's Verdict.
            latency_s: PartId seen -> verdict written; None = verdict.inspect_ms when that is > 0
                (nothing is observed otherwise).
        """
        self.parts.labels(verdict=verdict.label).inc()
        for defect in verdict.defects:
            self.defects.labels(defect=defect).inc()
        if verdict.unknown_ratio is not None:
            self.unknown_ratio.observe(verdict.unknown_ratio)
        if latency_s is None and verdict.inspect_ms > 0:
            latency_s = verdict.inspect_ms / 1000.0
        if latency_s is not None:
            self.part_latency.observe(latency_s)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        self.stage_seconds.labels(stage=stage).observe(seconds)

    @contextlib.contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """``with metrics.time_stage("infer"): ...`` observes the block's duration (also when it raises)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=stage).observe(time.perf_counter() - t0)

    def set_camera_connected(self, connected: bool) -> None:
        self.camera_connected.set(1 if connected else 0)

    def set_plc_connected(self, connected: bool) -> None:
        self.plc_connected.set(1 if connected else 0)

    def set_model_info(self, sha256: str, provider: str, preset: str) -> None:
        self.model_info.info({"sha256": sha256, "provider": provider, "preset": preset})

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value from this registry (tests, the bench), e.g. value("valve_inspect_parts_total",
        {"verdict": "accept"})."""
        return self.registry.get_sample_value(name, labels or {})

    # ---------------------------------------------------------------------------------------- HTTP

    def start_http(self, host: str = "127.0.0.1", port: int = 9108) -> MetricsServer:
        """Serve this registry at http://host:port/metrics on a daemon thread (port 0: any free port).

        Raises:
            OSError: the port is taken (message names host:port and the [metrics] keys).
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose another "
                                     "metrics.port or set metrics.enabled = false") from exc
        return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)
