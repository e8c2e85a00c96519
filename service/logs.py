"""Logging: structlog, configured once: one JSON object per line on stdout for journald and Docker,
human-readable lines at a terminal.

    configure_logging(level="info", fmt="auto")     # once, at start-up ([log] section)
    log = get_logger(__name__)                       # anywhere, also at import time
    log.info("camera_connected", serial="0815-0000")

A JSON line: ``{"event": "camera_connected", "serial": "0815-0000", "level": "info",
"logger": "service.camera", "timestamp": "2025-01-01T12:00:00.000000Z"}``. ``fmt="console"``
renders the same fields for humans (in colour at a terminal); ``fmt="auto"`` (the default) picks
"console" when the stream is a TTY and "json" otherwise (journald, Docker, a pipe). Records from the standard library's ``logging`` (e.g.
python-snap7) go through the same renderer, so stdout stays one format.

Loggers are not cached, so configure_logging() may come after get_logger() and
structlog.testing.capture_logs() sees every logger.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog
import structlog.tracebacks

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


def resolve_format(fmt: str, stream: TextIO) -> str:
    """"auto" -> "console" when ``stream`` is a terminal, else "json"; "json"/"console" stay as they are."""
    if fmt != "auto":
        return fmt
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


#: one lock per stream for every writer of lines to it (structlog's and the standard library's handler)
_STREAM_LOCKS: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _stream_lock(stream: TextIO) -> threading.RLock:
    with _LOCKS_GUARD:
        return _STREAM_LOCKS.setdefault(id(stream), threading.RLock())


class _LineLogger(structlog.PrintLogger):
    """structlog's PrintLogger, but each line goes out in one write, newline included, under the stream's lock
    that the standard library's handler holds too. (PrintLogger's print() writes the message and its newline in
    two calls under a lock of its own, so a python-snap7 record from another thread could land between them:
    two JSON objects on one line, then an empty line, seen in a CI run's daemon log.)"""

    def msg(self, message: str) -> None:
        with _stream_lock(self._file):  # looked up here, so a copy or an unpickled logger writes as well
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog (and route the standard library's logging through it).

    Args:
        level: debug | info | warning | error; lower levels are dropped cheaply.
        fmt: "json" (one object per line), "console" (human-readable; colours when ``stream`` is a
            terminal) or "auto" (console at a terminal, else json).
        stream: where lines go; default sys.stdout.

    Returns:
        The format in use, "json" or "console".
    """
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    numeric = getattr(logging, level.upper())
    out = sys.stdout if stream is None else stream
    fmt = resolve_format(fmt, out)
    lock = _stream_lock(out)
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(sort_keys=False)
        # Tracebacks as structured JSON, without local variables (large arrays, secrets).
        tail: list[Any] = [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=resolve_format("auto", out) == "console")
        tail = []
    structlog.configure(
        processors=[*_shared_processors(), structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _LineLogger(out),
        cache_logger_on_first_use=False,
    )
    # Standard library records (third-party libraries) -> same renderer, same stream.
    handler = logging.StreamHandler(out)
    handler.lock = lock  # emit() (one write of the line and its terminator) and flush() under the same lock
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name, *tail],
    ))
    handler.set_name("valve-inspect")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "valve-inspect"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return fmt


class _NamedLogger:
    """A logger bound to ``logger=name`` that resolves structlog's configuration at each call.

    (structlog.get_logger(logger=...) is not possible: ``logger`` is wrap_logger's own argument.)
    """

    __slots__ = ("_name", "_context")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **values: Any) -> _NamedLogger:
        return _NamedLogger(self._name, {**self._context, **values})

    def __getattr__(self, method: str) -> Any:
        return getattr(structlog.get_logger().bind(logger=self._name, **self._context), method)

    def __repr__(self) -> str:
        return f"<logger {self._name}>"


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry ``logger=name``; safe to create at import time."""
    return _NamedLogger(name)
