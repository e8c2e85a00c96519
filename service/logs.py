"""Logging: structlog, configured once, one JSON object per line on stdout (journald keeps it).

    configure_logging(level="info", fmt="json")     # once, at start-up ([log] section)
    log = get_logger(__name__)                       # anywhere, also at import time
    log.info("camera_connected", serial="0815-0000")

A JSON line: ``{"event": "camera_connected", "serial": "0815-0000", "level": "info",
"logger": "service.camera", "timestamp": "2025-01-01T12:00:00.000000Z"}``. ``fmt="console"``
renders the same fields for humans. Records from the standard library's ``logging`` (e.g.
python-snap7) go through the same renderer, so stdout stays one format.

Loggers are not cached, so configure_logging() may come after get_logger() and
structlog.testing.capture_logs() sees every logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
import structlog.tracebacks

LEVELS = ("debug", "info", "warning", "error")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog (and route the standard library's logging through it).

    Args:
        level: debug | info | warning | error; lower levels are dropped cheaply.
        fmt: "json" (one object per line) or "console" (human-readable, no colours).
        stream: where lines go; default sys.stdout.
    """
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in ("json", "console"):
        raise ValueError(f"log format {fmt!r} is not 'json' or 'console'")
    numeric = getattr(logging, level.upper())
    out = sys.stdout if stream is None else stream
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(sort_keys=False)
        # Tracebacks as structured JSON, without local variables (large arrays, secrets).
        tail: list[Any] = [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tail = []
    structlog.configure(
        processors=[*_shared_processors(), structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Standard library records (third-party libraries) -> same renderer, same stream.
    handler = logging.StreamHandler(out)
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
