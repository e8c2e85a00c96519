"""The live view: a read-only web page of what the line sees, served by the daemon on its own threads.

    GET /                              one HTML page (no build step) that polls /api/status every second
    GET /api/status                    JSON: counts by verdict, camera/PLC/provider health, the last part
    GET /api/parts/latest.jpg          the last inspected part's overlay, cropped to the valve's ROI
    GET /api/parts/rejects/<n>.jpg     the n-th newest of the last rejects (n = 0 .. rejects - 1), a thumbnail

Only GET and HEAD (405 otherwise): nothing here controls the line. With a token ([ui] token) every
request must carry ``Authorization: Bearer <token>`` or ``?token=<token>`` (401 otherwise); binding
beyond loopback without one is refused by the configuration.

Serving never blocks the pipeline: the daemon hands each part over with :meth:`LiveParts.put`, which
only stores references (the frame, the verdict, the inspection's records) into a 1-slot "latest"
holder and, for a reject, a ring of the last few. Drawing the overlay (service.archive.part_overlay)
and JPEG encoding happen lazily, on the HTTP server's threads when a client asks, once per part
(cached by the part's sequence number), one encode at a time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as _dt
import hmac
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.archive import part_overlay
from service.logs import get_logger
from service.records import DEFECTS_TABLE, Verdict

log = get_logger(__name__)

REJECTS = 8  # reject thumbnails kept (references to their frames; encoded on request)
LATEST_MAX_SIDE = 1024
THUMB_MAX_SIDE = 320
JPEG_QUALITY = 85
_PAGE = Path(__file__).with_name("data") / "ui.html"
_REJECT_PATH = re.compile(r"^/api/parts/rejects/(\d{1,3})\.jpg$")


@dataclasses.dataclass(frozen=True, eq=False)
class LivePart:
    """One part as handed over by the daemon: references only, nothing copied or drawn."""

    seq: int
    verdict: Verdict
    image: np.ndarray | None
    extras: dict | None
    time: float  # unix time it was handed over

    def summary(self) -> dict[str, Any]:
        """The part for /api/status."""
        v = self.verdict
        slices = [{"class": s.get("class"), "p": round(float(s.get("p", 0.0)), 4)}
                  for s in (v.extra or {}).get("slices", []) if isinstance(s, dict)]
        return {"seq": self.seq, "part_id": v.part_id, "frame_id": v.frame_id, "verdict": v.label,
                "defects": list(v.defects), "reason": v.reason,
                "scores": {d.name: round(float(getattr(v, d.score)), 4) for d in DEFECTS_TABLE if d.score},
                "area_px": {d.name: int(getattr(v, d.area)) for d in DEFECTS_TABLE if d.area},
                "inspect_ms": round(v.inspect_ms, 2), "slices": slices, "has_image": self.image is not None,
                "time": _dt.datetime.fromtimestamp(self.time, tz=_dt.UTC).isoformat(timespec="milliseconds")}


class LiveParts:
    """The parts the live view shows: the latest one and a ring of the last ``rejects`` rejects.

    ``put`` is called by the daemon's inspecting and control threads and never blocks: an attribute
    store and a bounded deque append (both atomic under the GIL). Readers (the HTTP threads) take
    snapshots.
    """

    def __init__(self, rejects: int = REJECTS) -> None:
        if rejects < 1:
            raise ValueError(f"rejects must be >= 1, got {rejects}")
        self._seq = itertools.count(1)
        self._latest: LivePart | None = None
        self._latest_image: LivePart | None = None  # the last part that came with a frame
        self._rejects: collections.deque[LivePart] = collections.deque(maxlen=rejects)

    def put(self, verdict: Verdict, image: np.ndarray | None, extras: dict | None = None) -> None:
        """Hand over one finished part (by reference: the caller must not modify the arrays afterwards)."""
        part = LivePart(next(self._seq), verdict, image, extras, time.time())
        self._latest = part
        if image is not None:
            self._latest_image = part
            if verdict.label == "reject":
                self._rejects.append(part)

    def latest(self) -> LivePart | None:
        """The last part handed over (with or without a frame)."""
        return self._latest

    def latest_image(self) -> LivePart | None:
        """The last part handed over with its frame."""
        return self._latest_image

    def rejects(self) -> list[LivePart]:
        """The last rejects, newest first."""
        for _ in range(3):
            try:
                return list(reversed(tuple(self._rejects)))
            except RuntimeError:  # appended to while copied
                continue
        return []


class _JpegCache:
    """(kind, part seq) -> JPEG bytes, the last few. Encodes run one at a time on one thread of their own
    (bounded CPU for the view; the frame-sized temporaries stay in one allocator arena instead of one per
    HTTP connection thread)."""

    def __init__(self, size: int = 2 * REJECTS + 4) -> None:
        self._size = size
        self._data: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-encode")
        self.encoded = 0

    def get(self, kind: str, part: LivePart, max_side: int) -> bytes:
        key = (kind, part.seq)
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            data = self._encoder.submit(self._encode, part, max_side).result()
            self.encoded += 1
            self._data[key] = data
            while len(self._data) > self._size:
                self._data.popitem(last=False)
            return data

    @staticmethod
    def _encode(part: LivePart, max_side: int) -> bytes:
        img, _ = part_overlay(part.image, part.verdict, part.extras, max_side=max_side)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ValueError(f"JPEG encoding failed for an overlay of shape {img.shape}")
        return buf.tobytes()

    def close(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=True)


class LiveView:
    """The HTTP side: serves the page, the status and the images from ``parts`` and ``status``.

    Args:
        parts: the LiveParts the daemon puts into.
        status: called per /api/status request, returns the daemon's side (counts, health, provider).
        token: when non-empty, required on every request.
    """

    def __init__(self, parts: LiveParts, status: Callable[[], dict[str, Any]], token: str = "") -> None:
        self.parts = parts
        self.status = status
        self.token = token
        self.cache = _JpegCache()
        self.page = _PAGE.read_bytes()

    def status_json(self) -> dict[str, Any]:
        out = dict(self.status())
        last = self.parts.latest()
        shown = self.parts.latest_image()
        out["last_part"] = last.summary() if last is not None else None
        out["image_part"] = shown.summary() if shown is not None else None
        out["rejects"] = [{"index": i, **p.summary()} for i, p in enumerate(self.parts.rejects())]
        out["time"] = _dt.datetime.now(tz=_dt.UTC).isoformat(timespec="milliseconds")
        return out

    def authorised(self, headers: Any, query: dict[str, list[str]]) -> bool:
        if not self.token:
            return True
        offered = ""
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered = auth[len("Bearer "):].strip()
        elif query.get("token"):
            offered = query["token"][0]
        return hmac.compare_digest(offered.encode("utf-8"), self.token.encode("utf-8"))


def _handler(view: LiveView) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "valve-inspect-ui"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = 30  # seconds an idle keep-alive connection (and its thread) may stay

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass  # no access log on stdout: the journal is for the line

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, obj: Any, extra: dict[str, str] | None = None) -> None:
            self._send(code, json.dumps(obj).encode("utf-8"), "application/json", extra)

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if not view.authorised(self.headers, query):
                self._json(401, {"error": "token required: Authorization: Bearer <token> or ?token=<token>"},
                           {"WWW-Authenticate": 'Bearer realm="valve-inspect"'})
                return
            path = url.path
            if path in ("/", "/index.html"):
                self._send(200, view.page, "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; img-src 'self'; "
                                                       "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})
            elif path == "/api/status":
                self._json(200, view.status_json())
            elif path == "/api/parts/latest.jpg":
                part = view.parts.latest_image()
                if part is None:
                    self._json(404, {"error": "no part with an image yet"})
                    return
                self._send(200, view.cache.get("latest", part, LATEST_MAX_SIDE), "image/jpeg",
                           {"X-Part-Id": str(part.verdict.part_id)})
            elif m := _REJECT_PATH.match(path):
                rejects = view.parts.rejects()
                n = int(m.group(1))
                # ?part=<seq> (the page's cache-buster) names the part itself: a reject that arrived since
                # the page read /api/status shifts the indexes, not the picture.
                wanted = [r for r in rejects if query.get("part") == [str(r.seq)]]
                if not wanted and n >= len(rejects):
                    self._json(404, {"error": f"reject {n} not held (held: {len(rejects)})"})
                    return
                part = wanted[0] if wanted else rejects[n]
                self._send(200, view.cache.get("thumb", part, THUMB_MAX_SIDE), "image/jpeg",
                           {"X-Part-Id": str(part.verdict.part_id)})
            else:
                self._json(404, {"error": f"no such page: {path}"})

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            try:
                self._serve()
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # a bad part must not take the view down
                log.error("ui_request_failed", path=self.path.split("?")[0], error=repr(exc))
                try:
                    self._json(500, {"error": "internal error (see the daemon's log)"})
                except OSError:
                    pass

        do_HEAD = do_GET  # noqa: N815

        def _read_only(self) -> None:
            self._json(405, {"error": "the live view is read-only (GET, HEAD)"}, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only  # noqa: N815

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:  # an IPv6 address, e.g. "::1"
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


@dataclasses.dataclass
class UiServer:
    """The running live view; ``stop()`` closes the socket and joins the thread (idempotent)."""

    host: str
    port: int
    view: LiveView
    _server: _Server = dataclasses.field(repr=False)
    _thread: threading.Thread = dataclasses.field(repr=False)
    _stopped: bool = dataclasses.field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        self.view.cache.close()


def start_ui(host: str, port: int, parts: LiveParts, status: Callable[[], dict[str, Any]],
             token: str = "") -> UiServer:
    """Serve the live view at http://host:port/ on a daemon thread (port 0: any free port).

    Raises:
        OSError: the port is taken (the message names host:port and the [ui] keys).
    """
    view = LiveView(parts, status, token)
    try:
        server = _Server((host, port), _handler(view))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve the live view on {host}:{port}: {exc.strerror}; choose another "
                                 "ui.port or set ui.enabled = false") from exc
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="ui-http",
                              daemon=True)
    thread.start()
    return UiServer(host=host, port=server.server_address[1], view=view, _server=server, _thread=thread)
