"""Shared pieces for the tests that run ``valve-inspect run`` as a subprocess against a real line.

* :class:`LinePlc`: the PLC, played by the test process: a ``snap7.server.Server`` serving DB100
  (50 bytes) on 127.0.0.1. It increments PlcHeartbeat every 100 ms, holds Enable, writes PartIds and
  records every result and status write *as it lands* (the server's write event fires after the
  bytes are in the DB and before the write is acknowledged, so no result can be overwritten unseen).
  Everything is decoded with ``snap7.util`` getters at the literal offsets of docs/plc-interface.md,
  independently of ``service.plc``.
* :class:`DaemonProcess` / :func:`running_daemon`: the daemon as a subprocess (``python -m service.cli
  run --config FILE``), JSON log on stdout into a file, always killed in a ``finally``.
* What the session fixtures in tests/integration/conftest.py build: ``line_frames``
  (:func:`render_line_frames`, 16 synthetic parts, 4 of each class, rendered once by
  ``service.sim.synth.write_dataset``) and
  ``inspection_model`` (:func:`build_inspection_model`: the shipped, trained demo model when
  service/data/model.onnx exists; otherwise an *untrained* compact IRA-CNN exported in a subprocess,
  good for plumbing only: ``inspection_model.trained`` is False and the verdict-vs-manifest checks skip).

torch is never imported into the test process: the untrained model is built and exported by
subprocesses (``valve-model export``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from snap7 import util as s7util
from snap7.server import EVC_CLIENT_ADDED, EVC_DATA_WRITE, Server
from snap7.type import SrvArea

import service
from service.sim.synth import read_manifest, write_dataset
from tests.helpers import REPO_ROOT

HOST = "127.0.0.1"

# ------------------------------------------------------------------ the interface, as the spec writes it
# docs/plc-interface.md, "Layout" (deliberately literal: these tests check service.plc, not reuse it)
DB_NUMBER = 100
DB_SIZE = 50
ENABLE = (0, 0)  # byte, bit
PLC_HEARTBEAT = 2  # Int
PART_ID = 4  # DInt
VISION_HEARTBEAT = 8  # Int
STATUS_BYTE = 10
STATUS_BITS = {"ready": 0, "camera_ok": 1, "model_ok": 2, "gpu_active": 3, "fault": 4, "simulated": 5}
RESULT_SEQ = 12  # DInt
RESULT_PART_ID = 16  # DInt
FRAME_ID = 20  # DInt
VERDICT_BYTE = 24
VERDICT_BITS = {"accept": 0, "reject_dirt": 1, "reject_scratch": 2, "reject_ec": 3, "reject_unknown": 4,
                "no_part": 5, "not_inspected": 6}
DIRT_AREA_PX, SCRATCH_AREA_PX = 26, 30  # DInt
SCORE_DIRT, SCORE_SCRATCH, SCORE_EC, INSPECT_MS = 34, 38, 42, 46  # Real
#: manifest class -> the one verdict bit the trained model must set for it
EXPECTED_BIT = {"good": "accept", "dirt": "reject_dirt", "scratch": "reject_scratch", "ec": "reject_ec"}

SEED = 7101  # not a seed the demo model was trained on
PARTS = 16


def free_port() -> int:
    """A port that was free a moment ago. Racy (another process may take it before it is bound again): only
    for a port nothing should listen on. Servers bind port 0 and report the port they got instead: LinePlc,
    PlcSimulator(port=0), and the daemon's metrics (metrics.port = 0, read back by DaemonProcess.metrics_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (its last value)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(step)


# ------------------------------------------------------------------- bars derived from held-out figures

def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k)."""
    return sum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(max(k, -1) + 1))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided lower confidence bound of a binomial rate from k successes in n (bisection, no scipy)."""
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(100):  # P(X >= k | p) rises with p: find where it crosses alpha
        mid = (lo + hi) / 2
        if 1.0 - binom_cdf(k - 1, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def held_out_bar(k: int, n: int, m: int, alpha: float = 0.01) -> int:
    """The least number right of m parts that a model with held-out k/n reaches with probability >= 1 - alpha."""
    p = clopper_pearson_lower(k, n, alpha)
    return max(b for b in range(m + 1) if binom_cdf(b - 1, m, p) <= alpha)


# ----------------------------------------------------------------------------------------- the PLC


@dataclass(frozen=True)
class Result:
    """One result write (bytes 12..49) as the PLC sees it, decoded at the spec's offsets."""

    t: float
    seq: int
    part_id: int
    frame_id: int
    bits: dict[str, bool]
    areas_px: tuple[int, int]  # dirt, scratch
    scores: tuple[float, float, float]  # dirt, scratch, ec
    inspect_ms: float
    raw: bytes = field(repr=False)

    @property
    def set_bits(self) -> list[str]:
        return [name for name, on in self.bits.items() if on]

    @property
    def kind(self) -> str:
        """The verdict kind: accept | reject | no_part | not_inspected | invalid (not exactly one kind)."""
        rejects = [b for b in self.set_bits if b.startswith("reject_")]
        kinds = [k for k in ("accept", "no_part", "not_inspected") if self.bits[k]] + (["reject"] if rejects else [])
        return kinds[0] if len(kinds) == 1 else "invalid"


@dataclass(frozen=True)
class StatusWrite:
    """One status write (bytes 8..11): VisionHeartbeat and the bits at 10.0..10.5."""

    t: float
    heartbeat: int
    ready: bool
    camera_ok: bool
    model_ok: bool
    gpu_active: bool
    fault: bool
    simulated: bool


def decode_result(db: bytes, t: float) -> Result:
    buf = bytearray(db)
    bits = {name: bool(s7util.get_bool(buf, VERDICT_BYTE, bit)) for name, bit in VERDICT_BITS.items()}
    return Result(t=t, seq=s7util.get_dint(buf, RESULT_SEQ), part_id=s7util.get_dint(buf, RESULT_PART_ID),
                  frame_id=s7util.get_dint(buf, FRAME_ID), bits=bits,
                  areas_px=(s7util.get_dint(buf, DIRT_AREA_PX), s7util.get_dint(buf, SCRATCH_AREA_PX)),
                  scores=tuple(float(s7util.get_real(buf, o)) for o in (SCORE_DIRT, SCORE_SCRATCH, SCORE_EC)),
                  inspect_ms=float(s7util.get_real(buf, INSPECT_MS)), raw=bytes(buf[RESULT_SEQ:DB_SIZE]))


def decode_status(db: bytes, t: float) -> StatusWrite:
    buf = bytearray(db)
    bits = {name: bool(s7util.get_bool(buf, STATUS_BYTE, bit)) for name, bit in STATUS_BITS.items()}
    return StatusWrite(t=t, heartbeat=s7util.get_int(buf, VISION_HEARTBEAT), **bits)


class LinePlc:
    """The line's PLC for one test: DB100 on a real snap7 Server at 127.0.0.1:``port``.

    ``stop_server()`` / ``start_server()`` pull and re-plug the cable (same port, same DB contents);
    the PLC program (heartbeat) keeps running meanwhile, as a real PLC would.
    """

    def __init__(self, port: int | None = None, heartbeat_s: float = 0.1) -> None:
        self.port = port or 0  # 0: the first start_server() binds a free port and keeps it for restarts
        self.heartbeat_s = heartbeat_s
        self._db = bytearray(DB_SIZE)
        self._server: Server | None = None
        self._lock = threading.Lock()  # the DB writes of the PLC program; taken before the area lock
        self._rec = threading.Lock()  # the recorded writes
        self.results: list[Result] = []
        self.statuses: list[StatusWrite] = []
        self.clients_added = 0
        self._probes = 0  # clients_so_far()'s own connections, in clients_added too
        self.illegal_writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> LinePlc:
        self.start_server()
        self._thread = threading.Thread(target=self._program, name="line-plc", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.stop_server()

    def start_server(self) -> None:
        if self._server is not None:
            return
        server = Server(log=False)
        server.register_area(SrvArea.DB, DB_NUMBER, self._db)
        server.set_events_callback(self._on_event)
        server.start_to(HOST, self.port)
        if self.port == 0:
            self.port = server.server_socket.getsockname()[1]
        self._server = server

    def stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> LinePlc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the DB

    @contextlib.contextmanager
    def _area(self) -> Iterator[bytearray]:
        server = self._server
        if server is None:
            yield self._db
            return
        server.lock_area(SrvArea.DB, DB_NUMBER)
        try:
            yield self._db
        finally:
            server.unlock_area(SrvArea.DB, DB_NUMBER)

    def snapshot(self) -> bytes:
        with self._area() as db:
            return bytes(db)

    def _program(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                self._heartbeat = ((self._heartbeat + 1 + 0x8000) & 0xFFFF) - 0x8000
                with self._area() as db:
                    s7util.set_int(db, PLC_HEARTBEAT, self._heartbeat)

    def set_enable(self, on: bool) -> None:
        with self._lock, self._area() as db:
            s7util.set_bool(db, ENABLE[0], ENABLE[1], on)

    def announce(self, part_id: int) -> float:
        """Write a new PartId (as the PLC does before the part's trigger); returns the time."""
        with self._lock, self._area() as db:
            s7util.set_dint(db, PART_ID, part_id)
        return time.monotonic()

    def set_result_seq(self, seq: int) -> None:
        """Put ResultSeq into the DB as a previous vision run (or a PLC restart) left it."""
        with self._lock, self._area() as db:
            s7util.set_dint(db, RESULT_SEQ, seq)

    def set_vision_heartbeat(self, value: int) -> None:
        """Put VisionHeartbeat into the DB as a previous vision run left it."""
        with self._lock, self._area() as db:
            s7util.set_int(db, VISION_HEARTBEAT, value)

    def _on_event(self, ev: Any) -> None:
        # The server's client thread: after the write landed in the DB, before it is acknowledged.
        if ev.EvtCode == EVC_CLIENT_ADDED:
            with self._rec:
                self.clients_added += 1
            return
        if ev.EvtCode != EVC_DATA_WRITE or ev.EvtParam2 != DB_NUMBER:
            return
        start, size = int(ev.EvtParam3), int(ev.EvtParam4)
        now = time.monotonic()
        db = self.snapshot()
        with self._rec:
            if start < 8:
                self.illegal_writes += 1
            if start <= VISION_HEARTBEAT < start + size:
                self.statuses.append(decode_status(db, now))
            if start <= RESULT_SEQ < start + size:
                self.results.append(decode_result(db, now))

    # ---------------------------------------------------------------- what the test reads

    def clients_so_far(self) -> int:
        """The connections made before this call, once every one of them has been counted (probes not).

        The server accepts connections one at a time in arrival order and counts each (EVC_CLIENT_ADDED)
        before it starts the thread that answers it, so once a probe client's handshake is answered every
        earlier connection, even one whose process has exited, has been counted: no sleep. ``clients_added``
        itself counts the probes too.
        """
        import snap7

        probe = snap7.client.Client()
        with self._rec:
            self._probes += 1
        try:
            probe.connect(HOST, 0, 1, self.port)
            with self._rec:
                return self.clients_added - self._probes
        finally:
            probe.disconnect()

    def recorded(self) -> tuple[list[Result], list[StatusWrite]]:
        with self._rec:
            return list(self.results), list(self.statuses)

    def results_for(self, part_id: int) -> list[Result]:
        with self._rec:
            return [r for r in self.results if r.part_id == part_id]

    def wait_result(self, part_id: int, timeout: float) -> Result | None:
        """The first result written for ``part_id`` (None after ``timeout`` s)."""
        got = wait_until(lambda: self.results_for(part_id), timeout, step=0.005)
        return got[0] if got else None

    def wait_status(self, predicate: Callable[[StatusWrite], bool], timeout: float) -> StatusWrite | None:
        def find() -> StatusWrite | None:
            with self._rec:
                return next((s for s in reversed(self.statuses) if predicate(s)), None)

        return wait_until(find, timeout, step=0.02)

    def run_part(self, part_id: int, timeout: float = 8.0) -> Result | None:
        """Announce ``part_id`` and wait for its result, as the line's PLC program does."""
        self.announce(part_id)
        return self.wait_result(part_id, timeout)


# --------------------------------------------------------------------------------------- the daemon


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without anything that would reconfigure the daemon behind the test's back."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("VALVE_INSPECT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                                        "WATCHDOG_PID", "STATE_DIRECTORY")}
    env["PYLON_CAMEMU"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def daemon_config(path: Path, *, images: Path, plc_port: int, model: str | Path, metrics_port: int = 0,
                  archive_dir: Path | None = None, unknown_rule: str | None = None,
                  **overrides: dict[str, Any]) -> Path:
    """A client-mode config for the test line: emulator replaying ``images``, our PLC at 127.0.0.1:plc_port.

    The camera emulator feeding an S7 peer is a mixed line (a commissioning set-up), so the config says
    ``[simulation] mix_with_real_hardware = true``; without it the daemon refuses to start.
    """
    sections: dict[str, dict[str, Any]] = {
        "camera": {"source": "emulator", "images": images, "trigger": "software", "grab_timeout_ms": 2000,
                   "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "plc": {"mode": "client", "host": HOST, "port": plc_port, "db": DB_NUMBER, "poll_ms": 10,
                "heartbeat_timeout_s": 3.0, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "model": {"path": str(model), "providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
        "pipeline": {"queue_size": 4, "part_timeout_s": 3.0, "trigger_window_ms": 1000},  # loaded CI boxes
        "metrics": {"enabled": True, "host": HOST, "port": metrics_port},
        "ui": {"enabled": True, "host": HOST, "port": 0},  # the live view on a free port (ui_serving logs it)
        "archive": {"enabled": archive_dir is not None, "dir": str(archive_dir or path.parent / "archive")},
        "log": {"level": "info", "format": "json"},
        "simulation": {"mix_with_real_hardware": True},
    }
    if unknown_rule is not None:  # [model] unknown_rule ("model" is this function's model path)
        sections["model"]["unknown_rule"] = unknown_rule
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return write_toml(path, sections)


class DaemonProcess:
    """``valve-inspect run --config FILE`` as a subprocess; stdout (the JSON log) and stderr go to files."""

    def __init__(self, config: Path | None, workdir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.err_path = workdir / "daemon.err"
        self.env = env if env is not None else clean_env()
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        config = () if self.config is None else ("--config", str(self.config))  # None: the embedded demo
        cmd = [sys.executable, "-m", "service.cli", "run", *config, *self.args]
        with open(self.log_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, cwd=REPO_ROOT,
                                         stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[dict]:
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def metrics_port(self, timeout: float = 10.0) -> int:
        """The port the daemon's metrics endpoint bound (config metrics.port = 0), from its metrics_serving log
        event's url: no port is picked beforehand and released for the daemon to race for."""
        ev = self.wait_event("metrics_serving", timeout)
        if ev is None:
            pytest.fail(f"the daemon did not log metrics_serving within {timeout} s\n{self.tail()}")
        return int(ev["url"].rstrip("/").rsplit(":", 1)[1].split("/")[0])

    def ui_url(self, timeout: float = 10.0) -> str:
        """The live view's URL (config ui.port = 0), from the daemon's ui_serving log event."""
        ev = self.wait_event("ui_serving", timeout)
        if ev is None:
            pytest.fail(f"the daemon did not log ui_serving within {timeout} s\n{self.tail()}")
        return ev["url"]

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event]

    def wait_event(self, event: str, timeout: float) -> dict | None:
        """The first ``event`` in the log, waiting up to ``timeout`` s (None sooner if the process exits)."""
        end = time.monotonic() + timeout
        while True:
            exited = not self.alive()
            found = self.named(event)
            if found:
                return found[0]
            if exited or time.monotonic() >= end:
                return None
            time.sleep(0.05)

    def tail(self, n: int = 40) -> str:
        text = ""
        for p in (self.log_path, self.err_path):
            if p.exists():
                lines = p.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
                text += f"--- {p.name} (last {len(lines)} lines)\n" + "\n".join(lines) + "\n"
        return text

    def terminate(self, timeout: float = 10.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code or None if it did not exit within ``timeout``, seconds taken)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5.0)


@contextlib.contextmanager
def running_daemon(config: Path, workdir: Path, env: dict[str, str] | None = None,
                   ready_timeout: float = 45.0) -> Iterator[DaemonProcess]:
    """Start the daemon and wait for ``daemon_started``; it is killed on the way out whatever happened."""
    d = DaemonProcess(config, workdir, env).start()
    try:
        started = d.wait_event("daemon_started", ready_timeout)
        if started is None:
            pytest.fail(f"the daemon did not log daemon_started within {ready_timeout} s "
                        f"(exit code {d.proc.poll()})\n{d.tail()}")
        yield d
    finally:
        d.kill()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``python -m service.cli ARGS`` to completion (killed after ``timeout``)."""
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), cwd=REPO_ROOT, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def scrape(port: int, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def samples(metrics: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in metrics.items() if n == name}


# ------------------------------------------------------------------------------------ session fixtures


@dataclass(frozen=True)
class LineFrames:
    root: Path
    frames: Path
    classes: list[str]


@dataclass(frozen=True)
class ModelUnderTest:
    """config_value: what goes into [model] path ("" = the shipped model); trained: verdicts are meaningful."""

    path: Path
    config_value: str
    trained: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def shipped_model() -> Path:
    return Path(service.__file__).resolve().parent / "data" / "model.onnx"


def render_line_frames(root: Path) -> LineFrames:
    """16 synthetic parts (4 good, 4 dirt, 4 scratch, 4 ec, shuffled) under ``root`` (conftest's line_frames)."""
    rows = write_dataset(root, PARTS, seed=SEED, mix="good=1,dirt=1,scratch=1,ec=1")
    return LineFrames(root=root, frames=root / "frames", classes=[r["class"] for r in rows])


def build_inspection_model(tmp_path_factory) -> ModelUnderTest:
    """The shipped demo model when present (trained), else an untrained compact model for plumbing tests
    (conftest's inspection_model)."""
    shipped = shipped_model()
    if shipped.is_file() and shipped.with_suffix(".json").is_file():
        return ModelUnderTest(path=shipped, config_value="", trained=True)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("no shipped model (service/data/model.onnx) and no torch to export an untrained one")
    work = tmp_path_factory.mktemp("untrained")
    run = work / "run"
    run.mkdir()
    build = ("import torch; from models.ira_cnn import build_model, preset_config; "
             "from models.checkpoint import save_weights; torch.manual_seed(0); "
             f"save_weights({str(run / 'model.safetensors')!r}, build_model(preset_config('compact')))")
    out = work / "model" / "model.onnx"
    env = clean_env()
    for cmd in ([sys.executable, "-c", build],
                [sys.executable, "-m", "models.cli", "export", "--run", str(run), "--out", str(out)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return ModelUnderTest(path=out, config_value=str(out), trained=False)


def manifest_classes(root: Path) -> list[str]:
    return [r["class"] for r in read_manifest(root)]


def dark_frame(path: Path, width: int = 2448, height: int = 2048, seed: int = 0) -> Path:
    """An empty fixture: the background only (dark, sensor noise), no valve."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(10.0, 2.0, (height, width)), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return path
