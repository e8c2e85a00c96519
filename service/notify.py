"""sd_notify(3) without libsystemd: tell systemd we are ready, alive, stopping.

    notify.ready("inspecting")           # Type=notify: the unit is "started" only now
    notify.watchdog()                    # WatchdogSec=: ping at least every watchdog_period()
    notify.status("camera lost, reconnecting")
    notify.stopping()

Each call sends one datagram to ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the
abstract namespace) and returns True when it was sent. Without ``$NOTIFY_SOCKET`` (not started by
systemd, or NotifyAccess=none) every call is a no-op returning False. A send that fails (socket
gone, systemd restarting) is logged once and returns False; it never raises into the daemon.

Watchdog: systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) from ``WatchdogSec=``.
watchdog_period() is half of it, as sd_watchdog_enabled(3) recommends. Ping from the loop whose
progress proves health (or use WatchdogPinger with a health check), never from a free-running
timer, or a hung pipeline stays "alive".
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

from service.logs import get_logger

log = get_logger(__name__)
_warned: set[str] = set()


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    if addr.startswith("/"):
        return addr
    if addr not in _warned:
        _warned.add(addr)
        log.warning("notify_socket_unsupported", notify_socket=addr,
                    hint="only AF_UNIX paths and '@abstract' names are supported")
    return None


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. "READY=1\\nSTATUS=up") to systemd; False when there is nobody to tell."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), addr)
    except OSError as exc:
        key = f"{addr}:{exc.errno}"
        if key not in _warned:
            _warned.add(key)
            log.warning("sd_notify_failed", notify_socket=addr.replace("\0", "@"), error=str(exc))
        return False
    return True


def _clean(text: str) -> str:
    return " ".join(text.split())  # STATUS= is one line


def ready(status_text: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """READY=1 (optionally with STATUS=): start-up is complete."""
    msg = "READY=1"
    if status_text:
        msg += f"\nSTATUS={_clean(status_text)}"
    return notify(msg, env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: we are alive; systemd restarts the unit when these stop for WatchdogSec."""
    return notify("WATCHDOG=1", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: an orderly shutdown has begun."""
    return notify("STOPPING=1", env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """STATUS=<text>: the line ``systemctl status`` shows."""
    return notify(f"STATUS={_clean(text)}", env)


def watchdog_period(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of $WATCHDOG_USEC), or None when the watchdog is off.

    None also when $WATCHDOG_PID names another process (the variable was inherited, not meant for us)
    or $WATCHDOG_USEC is not a positive integer.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000.0


class WatchdogPinger:
    """A thread that sends WATCHDOG=1 every watchdog_period() while ``healthy()`` returns True.

    When ``healthy()`` is False (or raises) it skips the ping, so systemd restarts a stuck daemon.
    start() does nothing when the watchdog is off. stop() is idempotent.
    """

    def __init__(self, healthy: Callable[[], bool], env: Mapping[str, str] | None = None,
                 period_s: float | None = None) -> None:
        self._healthy = healthy
        self._env = dict(os.environ if env is None else env)
        self.period_s = watchdog_period(self._env) if period_s is None else period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    def start(self) -> WatchdogPinger:
        if self.period_s is None or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self.period_s is not None
        while not self._stop.wait(self.period_s):
            try:
                ok = bool(self._healthy())
            except Exception:  # a failing health check is "unhealthy", not a dead pinger
                log.exception("watchdog_health_check_failed")
                ok = False
            if ok:
                watchdog(self._env)
                self.pings += 1
            else:
                self.skipped += 1
                if self.skipped == 1 or self.skipped % 10 == 0:
                    log.warning("watchdog_ping_skipped", reason="unhealthy", skipped=self.skipped)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
