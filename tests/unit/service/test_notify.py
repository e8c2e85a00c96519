"""service.notify: sd_notify datagrams to a real AF_UNIX socket, and the watchdog period."""

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from service import notify


@pytest.fixture
def sock_path(tmp_path):
    """A short socket path (AF_UNIX paths are limited to 107 bytes)."""
    base = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="vi-"))
    return str(base / "n.sock")


@pytest.fixture
def listener(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(2.0)
    yield s
    s.close()


def recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_without_notify_socket_every_call_is_a_no_op():
    """With $NOTIFY_SOCKET unset, ready/watchdog/status/stopping return False and do not raise."""
    env: dict[str, str] = {}
    assert notify.ready("x", env=env) is False
    assert notify.watchdog(env=env) is False
    assert notify.status("x", env=env) is False
    assert notify.stopping(env=env) is False


def test_messages_reach_a_socket_path(listener, sock_path):
    """ready, status, watchdog and stopping send systemd's key=value datagrams to the socket path."""
    env = {"NOTIFY_SOCKET": sock_path}
    assert notify.ready("inspecting", env=env)
    assert recv(listener) == "READY=1\nSTATUS=inspecting"
    assert notify.status("camera lost,\nreconnecting", env=env)
    assert recv(listener) == "STATUS=camera lost, reconnecting"
    assert notify.watchdog(env=env)
    assert recv(listener) == "WATCHDOG=1"
    assert notify.stopping(env=env)
    assert recv(listener) == "STOPPING=1"


def test_environment_is_read_when_no_mapping_is_given(listener, sock_path, monkeypatch):
    """Without an env argument the helpers read os.environ's NOTIFY_SOCKET."""
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    assert notify.ready()
    assert recv(listener) == "READY=1"


def test_abstract_namespace_socket():
    """An '@name' NOTIFY_SOCKET addresses the Linux abstract namespace."""
    name = f"valve-inspect-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2.0)
        assert notify.watchdog(env={"NOTIFY_SOCKET": "@" + name})
        assert recv(s) == "WATCHDOG=1"


def test_send_failure_returns_false_instead_of_raising(sock_path):
    """A NOTIFY_SOCKET that nobody listens on gives False; the daemon keeps running."""
    assert notify.ready(env={"NOTIFY_SOCKET": sock_path}) is False
    assert notify.watchdog(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_period_is_half_of_watchdog_usec():
    """WATCHDOG_USEC=5000000 gives a 2.5 s ping period; unset, invalid or another process's PID gives None."""
    assert notify.watchdog_period({"WATCHDOG_USEC": "5000000"}) == 2.5
    assert notify.watchdog_period({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}) == 2.5
    assert notify.watchdog_period({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_period({}) is None
    assert notify.watchdog_period({"WATCHDOG_USEC": "soon"}) is None
    assert notify.watchdog_period({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pinger_pings_only_while_healthy(listener, sock_path):
    """WatchdogPinger sends WATCHDOG=1 each period while healthy() is True and skips when it is False."""
    healthy = [True]
    pinger = notify.WatchdogPinger(lambda: healthy[0], env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "60000"})
    assert pinger.period_s == pytest.approx(0.03)
    pinger.start()
    try:
        assert recv(listener) == "WATCHDOG=1"
        healthy[0] = False
        deadline = time.monotonic() + 2.0
        while pinger.skipped < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pinger.skipped >= 2
    finally:
        pinger.stop()
    pinger.stop()
    assert notify.WatchdogPinger(lambda: True, env={}).start().period_s is None  # watchdog off: no thread
