"""service.metrics (Prometheus) and service.logs (structlog): what operators and journald see."""

import io
import json
import logging
import urllib.error
import urllib.request

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from service.logs import configure_logging, get_logger
from service.metrics import LATENCY_BUCKETS, STAGES, Metrics
from service.records import DEFECTS, VERDICT_LABELS, Verdict


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


# -------------------------------------------------------------------------------------------- metrics


def test_every_label_exists_at_zero_before_any_event(metrics):
    """parts_total, defects_total and stage_seconds have every label value at 0 from the start."""
    for verdict in VERDICT_LABELS:
        assert metrics.value("valve_inspect_parts_total", {"verdict": verdict}) == 0.0
    for defect in DEFECTS:
        assert metrics.value("valve_inspect_defects_total", {"defect": defect}) == 0.0
    for stage in STAGES:
        assert metrics.value("valve_inspect_stage_seconds_count", {"stage": stage}) == 0.0
    for name in ("valve_inspect_frames_dropped_total", "valve_inspect_camera_failed_buffers_total",
                 "valve_inspect_camera_reconnects_total", "valve_inspect_plc_reconnects_total",
                 "valve_inspect_camera_connected", "valve_inspect_plc_connected",
                 "valve_inspect_part_latency_seconds_count"):
        assert metrics.value(name) == 0.0, name


def test_record_verdict_counts_verdicts_defects_and_latency(metrics):
    """Each verdict counts once under its label, each defect of a reject once, latency is observed."""
    metrics.record_verdict(Verdict(part_id=1, accept=True, inspect_ms=40.0))
    metrics.record_verdict(Verdict(part_id=2, reject_dirt=True, reject_scratch=True), latency_s=0.12)
    metrics.record_verdict(Verdict(part_id=3, reject_unknown=True))
    metrics.record_verdict(Verdict.make_no_part(4, "no_valve"))
    metrics.record_verdict(Verdict.make_not_inspected(5, "queue_full"))
    v = metrics.value
    assert [v("valve_inspect_parts_total", {"verdict": x}) for x in VERDICT_LABELS] == [1.0, 2.0, 1.0, 1.0]
    assert [v("valve_inspect_defects_total", {"defect": d}) for d in DEFECTS] == [1.0, 1.0, 0.0, 1.0]
    assert v("valve_inspect_part_latency_seconds_count") == 2.0
    assert v("valve_inspect_part_latency_seconds_sum") == pytest.approx(0.16)
    assert v("valve_inspect_part_latency_seconds_bucket", {"le": "0.05"}) == 1.0


def test_latency_buckets_span_10_ms_to_2_s():
    """The part-latency histogram resolves 10 ms .. 2 s."""
    assert LATENCY_BUCKETS[0] == 0.01 and 2.0 in LATENCY_BUCKETS and list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_stage_timing(metrics):
    """time_stage() and observe_stage() feed valve_inspect_stage_seconds{stage}; an unknown stage is refused."""
    with metrics.time_stage("infer"):
        pass
    metrics.observe_stage("grab", 0.02)
    assert metrics.value("valve_inspect_stage_seconds_count", {"stage": "infer"}) == 1.0
    assert metrics.value("valve_inspect_stage_seconds_sum", {"stage": "grab"}) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown stage 'decode'"):
        metrics.observe_stage("decode", 0.1)


def test_gauges_counters_and_model_info_in_the_exposition(metrics):
    """Connection gauges, the camera/PLC counters and model_info appear in the text exposition."""
    metrics.set_camera_connected(True)
    metrics.set_plc_connected(False)
    metrics.camera_failed_buffers.inc(2)
    metrics.camera_reconnects.inc()
    metrics.plc_reconnects.inc()
    metrics.frames_dropped.inc()
    metrics.set_model_info("ab12", "CPUExecutionProvider", "compact")
    text = generate_latest(metrics.registry).decode()
    assert "valve_inspect_camera_connected 1.0" in text
    assert "valve_inspect_plc_connected 0.0" in text
    assert "valve_inspect_camera_failed_buffers_total 2.0" in text
    assert "valve_inspect_camera_reconnects_total 1.0" in text
    assert "valve_inspect_plc_reconnects_total 1.0" in text
    assert "valve_inspect_frames_dropped_total 1.0" in text
    assert 'valve_inspect_model_info{preset="compact",provider="CPUExecutionProvider",sha256="ab12"} 1.0' in text


def test_two_instances_do_not_share_a_registry():
    """Metrics() on fresh registries can coexist (one per test, one per daemon)."""
    a, b = Metrics(), Metrics()
    a.record_verdict(Verdict(part_id=1, accept=True))
    assert b.value("valve_inspect_parts_total", {"verdict": "accept"}) == 0.0


def test_http_endpoint_serves_this_registry_and_stops(metrics):
    """start_http() serves /metrics over loopback; stop() closes the port and is idempotent."""
    metrics.record_verdict(Verdict(part_id=1, reject_ec=True))
    server = metrics.start_http("127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            body = resp.read().decode()
        assert resp.status == 200
        assert 'valve_inspect_parts_total{verdict="reject"} 1.0' in body
        assert 'valve_inspect_defects_total{defect="ec"} 1.0' in body
    finally:
        server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_http_port_in_use_is_a_clear_error(metrics):
    """A taken port fails with an OSError naming host:port and the metrics keys to change."""
    with metrics.start_http("127.0.0.1", 0) as first, pytest.raises(OSError, match="metrics.port"):
        Metrics().start_http("127.0.0.1", first.port)


# ----------------------------------------------------------------------------------------------- logs


@pytest.fixture
def restore_structlog():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "valve-inspect"]:
        root.removeHandler(h)


def test_json_lines_carry_event_level_logger_and_iso_timestamp(restore_structlog):
    """JSON format writes one object per line with event, level, logger name and an ISO UTC timestamp."""
    log = get_logger("service.test")  # created before configuration, as module loggers are
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log.info("part_done", part_id=7)
    log.debug("too_chatty")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["event"] == "part_done" and rec["part_id"] == 7
    assert rec["level"] == "info" and rec["logger"] == "service.test"
    assert rec["timestamp"].endswith("Z") and "T" in rec["timestamp"]


def test_standard_library_records_use_the_same_format(restore_structlog):
    """Records from the logging module (third-party libraries) come out as the same JSON lines."""
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    logging.getLogger("snap7.client").warning("connection %s lost", "plc")
    logging.getLogger("snap7.client").info("hidden")
    rec = json.loads(out.getvalue().strip())
    assert rec == {**rec, "event": "connection plc lost", "level": "warning", "logger": "snap7.client"}


def test_console_format_and_bad_level(restore_structlog):
    """Console format is one readable line per event; an unknown level is refused."""
    out = io.StringIO()
    configure_logging("debug", "console", stream=out)
    get_logger("service.x").debug("hello", n=1)
    assert "hello" in out.getvalue() and "n=1" in out.getvalue() and "service.x" in out.getvalue()
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("loud")


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_auto_format_is_console_at_a_terminal_and_json_elsewhere(restore_structlog):
    """fmt="auto" renders human-readable lines on a TTY and JSON lines on a pipe (journald, Docker)."""
    tty = _Terminal()
    assert configure_logging("info", "auto", stream=tty) == "console"
    get_logger("service.x").info("camera_connected", serial="0815")
    line = tty.getvalue()
    assert "camera_connected" in line and "0815" in line and not line.lstrip().startswith("{")
    pipe = io.StringIO()
    assert configure_logging("info", "auto", stream=pipe) == "json"
    get_logger("service.x").info("camera_connected", serial="0815")
    assert json.loads(pipe.getvalue())["serial"] == "0815"


def test_explicit_format_overrides_the_terminal_check(restore_structlog):
    """[log] format = json on a terminal gives JSON, console on a pipe gives plain (uncoloured) text."""
    tty = _Terminal()
    assert configure_logging("info", "json", stream=tty) == "json"
    get_logger("service.x").info("hello")
    assert json.loads(tty.getvalue())["event"] == "hello"
    pipe = io.StringIO()
    assert configure_logging("info", "console", stream=pipe) == "console"
    get_logger("service.x").info("hello")
    assert "hello" in pipe.getvalue() and "\x1b[" not in pipe.getvalue()
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure_logging("info", "xml", stream=pipe)


def test_capture_logs_sees_logger_name_and_fields(restore_structlog):
    """structlog.testing.capture_logs captures our loggers with their name and bound fields."""
    configure_logging("info", "json", stream=io.StringIO())
    log = get_logger("service.camera").bind(serial="0815-0000")
    with structlog.testing.capture_logs() as logs:
        log.warning("camera_failed_buffer", frame_id=3)
    assert logs == [{"logger": "service.camera", "serial": "0815-0000", "frame_id": 3,
                     "event": "camera_failed_buffer", "log_level": "warning"}]


def test_auto_format_on_a_real_terminal_and_a_pipe():
    """In a fresh process, the default format gives readable lines on a pseudo-terminal and JSON on a pipe."""
    import os
    import pty
    import subprocess
    import sys

    code = ("from service.logs import configure_logging, get_logger; configure_logging(); "
            "get_logger('service.x').info('camera_connected', serial='0815')")
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(piped.stdout)["event"] == "camera_connected"
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", code], stdout=follower, stderr=subprocess.PIPE, timeout=60)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    text = out.decode()
    assert proc.returncode == 0 and "camera_connected" in text and "0815" in text, text
    assert not text.lstrip().startswith("{") and "\x1b[" in text  # coloured console lines
