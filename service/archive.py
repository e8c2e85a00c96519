"""The reject archive: full frame, saliency/mask overlay and a JSON sidecar for each archived part.

For every part whose verdict label is archived (by default ``reject`` and ``not_inspected``) three
files are written into one flat directory:

    <stem>.png           the full camera frame, lossless
    <stem>_overlay.png   the valve's ROI (the frame cropped to the valve's rectangle + a margin; the whole
                         frame when no valve was found), downscaled when big, + saliency colour map + mask
                         contours (magenta) + slice outlines (white) + a caption with part, verdict and scores
    <stem>.json          the verdict (every field, ``extra`` included), file names, time, caller's meta

    stem = <UTC time YYYYmmddTHHMMSS.ffffffZ>_p<part id>_f<frame id>_<label>[-<defect>...]
    e.g.   20261124T031805.123456Z_p1234_f56_reject-dirt-scratch

so names sort by time. The directory is kept under ``quota_bytes``: before an entry is written its
PNGs are encoded in memory, and the oldest entries (by name, i.e. time) are deleted until it fits.
Files that do not look like archive entries are neither counted nor deleted.

Nothing here may stop the daemon: ``write`` returns False and counts the failure (disk full,
read-only directory, bad input, ...) instead of raising; ``submit`` hands the work to a background
thread through a bounded queue and returns at once, counting a drop when the queue is full. The overlay
is drawn on that thread from the inspection's own records (``extras``: the slice batch, the prediction,
the masks; :func:`part_overlay`), so the inspecting thread never maps saliency onto the frame.
``close()`` writes what is queued, then stops the thread. Counters: ``stats()``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as _dt
import json
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.logs import get_logger
from service.records import VERDICT_LABELS, Verdict

log = get_logger(__name__)

DEFAULT_LABELS = ("reject", "not_inspected")
FRAME_SUFFIX = ".png"
OVERLAY_SUFFIX = "_overlay.png"
SIDECAR_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"
MASK_BGR = (255, 0, 255)  # magenta: not in the JET colour map
OUTLINE_BGR = (255, 255, 255)
UNKNOWN_BGR = (0, 255, 255)  # yellow: the slices whose unknown score reached the threshold
#: The overlay's crop around the valve's rectangle, on every side, in valve diameters.
ROI_MARGIN = 0.25
STEM_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z_p-?\d+_f-?\d+_(?:" + "|".join(VERDICT_LABELS)
                     + r")(?:-[a-z0-9]+)*)(_overlay\.png|\.png|\.json)$")


def _stem_time(ts: float) -> str:
    t = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return t.strftime("%Y%m%dT%H%M%S.") + f"{t.microsecond:06d}Z"


def entry_stem(verdict: Verdict, ts: float) -> str:
    """The sortable file stem for a verdict archived at unix time ``ts``."""
    tag = verdict.label
    if verdict.label == "reject" and verdict.defects:
        tag += "-" + "-".join(verdict.defects)
    return f"{_stem_time(ts)}_p{int(verdict.part_id)}_f{int(verdict.frame_id)}_{tag}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


# ---------------------------------------------------------------------------------------- overlay


def render_overlay(image: np.ndarray, saliency: np.ndarray | None = None, mask: np.ndarray | None = None,
                   outlines: Iterable[np.ndarray] | None = None, *, max_side: int = 1280, alpha: float = 0.55,
                   caption: str | None = None, highlight: Iterable[np.ndarray] | None = None) -> np.ndarray:
    """Frame + saliency colour map + mask contours + outlines -> BGR uint8 image, downscaled to ``max_side``.

    Args:
        image: (H, W) uint8 gray (or (H, W, 3) BGR) frame.
        saliency: (H, W) float in [0, 1] in frame coordinates, or None. Blended as a JET colour map
            with per-pixel opacity alpha * saliency, so low saliency leaves the frame gray.
        mask: (H, W) bool in frame coordinates, or None; its outer contours are drawn in magenta.
        outlines: polygons ((n, 2) x, y in frame pixels), e.g. the slice rectangles, drawn in white.
        highlight: polygons drawn thick in yellow over the outlines (the slices found unknown).
        max_side: the overlay's longest side at most (a 2448x2048 frame becomes 1280x1071 by default).
    Raises:
        ValueError: shapes do not match the frame.
    """
    if image.ndim == 3 and image.shape[2] == 3:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 2:
        gray = image
    else:
        raise ValueError(f"frame must be (H, W) gray or (H, W, 3) BGR, got shape {image.shape}")
    if gray.dtype != np.uint8:
        gray = np.clip(gray, 0, 255).astype(np.uint8)
    h, w = gray.shape
    for name, arr in (("saliency", saliency), ("mask", mask)):
        if arr is not None and arr.shape != (h, w):
            raise ValueError(f"{name} has shape {arr.shape}, the frame is {(h, w)}: map it to frame coordinates")
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else gray
    out = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)

    if saliency is not None:
        sal = np.asarray(saliency, dtype=np.float32)
        if scale < 1.0:  # the maps are smooth (upsampled from the feature grid): linear is enough, and fast
            sal = cv2.resize(sal, size, interpolation=cv2.INTER_LINEAR)
        sal = np.clip(np.nan_to_num(sal, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        colour = cv2.applyColorMap(cv2.convertScaleAbs(sal, alpha=255.0), cv2.COLORMAP_JET)
        a = cv2.cvtColor(cv2.convertScaleAbs(sal, alpha=255.0 * alpha), cv2.COLOR_GRAY2BGR)  # opacity 0..255
        out = cv2.add(cv2.multiply(out, 255 - a, scale=1 / 255), cv2.multiply(colour, a, scale=1 / 255))

    if outlines is not None:
        polys = [np.rint(np.asarray(p, dtype=np.float64).reshape(-1, 2) * scale).astype(np.int32).reshape(-1, 1, 2)
                 for p in outlines]
        if polys:
            cv2.polylines(out, polys, isClosed=True, color=OUTLINE_BGR, thickness=1, lineType=cv2.LINE_AA)
    if highlight is not None:
        polys = [np.rint(np.asarray(p, dtype=np.float64).reshape(-1, 2) * scale).astype(np.int32).reshape(-1, 1, 2)
                 for p in highlight]
        if polys:
            cv2.polylines(out, polys, isClosed=True, color=UNKNOWN_BGR, thickness=3, lineType=cv2.LINE_AA)

    if mask is not None:
        m = np.asarray(mask).astype(np.uint8)
        if scale < 1.0:
            m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if contours:
            cv2.drawContours(out, contours, -1, MASK_BGR, thickness=2, lineType=cv2.LINE_AA)

    if caption:
        font, fs, th = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, out.shape[1] / 1600), 1
        (tw, tht), base = cv2.getTextSize(caption, font, fs, th)
        cv2.rectangle(out, (0, 0), (min(out.shape[1], tw + 8), tht + base + 8), (0, 0, 0), thickness=-1)
        cv2.putText(out, caption, (4, tht + 4), font, fs, (255, 255, 255), th, cv2.LINE_AA)
    return out


def part_overlay(image: np.ndarray, verdict: Verdict, extras: dict | None = None, *, max_side: int = 1280,
                 margin: float = ROI_MARGIN) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """One part's overlay, cropped to the valve's ROI -> (BGR image, the crop (x0, y0, x1, y1) in frame pixels).

    Args:
        image: the (H, W) uint8 frame.
        verdict: for the caption.
        extras: what service.pipeline.inspect_frame returns beside the verdict (``batch``: the SliceBatch,
            ``pred``: the Prediction, ``masks``: (n, S, S) per-slice masks); None for a part without a valve
            (NoPart) or never inspected: then the whole frame, downscaled, and crop None.
        max_side, margin: the overlay's longest side at most; the crop's margin around the valve's rotated
            rectangle, in valve diameters.
    """
    caption = caption_for(verdict)
    if not extras or extras.get("batch") is None:
        return render_overlay(image, max_side=max_side, caption=caption), None
    batch = extras["batch"]
    box = batch.bounding_box(margin)
    x0, y0, x1, y1 = box
    sal = mask = None
    if extras.get("pred") is not None:
        sal = batch.roi_to_box(batch.assemble(np.asarray(extras["pred"].saliency, dtype=np.float32)), box)
    if extras.get("masks") is not None:
        mask = batch.roi_to_box(batch.assemble(np.asarray(extras["masks"]) > 0), box, interpolation="nearest")
    outlines = batch.slice_polygons() - np.array([x0, y0], dtype=np.float32)
    highlight = [outlines[i] for i in verdict.unknown_slices if 0 <= i < len(outlines)]
    return render_overlay(image[y0:y1, x0:x1], sal, mask, outlines, max_side=max_side, caption=caption,
                          highlight=highlight or None), box


def outlines_box(outlines: Iterable[np.ndarray], shape: tuple[int, ...],
                 margin: float = ROI_MARGIN) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1): the frame rectangle around ``outlines`` grown by ``margin`` x their shorter side,
    clipped to a frame of ``shape``; None without outlines."""
    pts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in outlines]
    if not pts:
        return None
    allp = np.concatenate(pts)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    pad = margin * float(min(hi - lo))
    h, w = shape[:2]
    x0, y0 = max(0, int(np.floor(lo[0] - pad))), max(0, int(np.floor(lo[1] - pad)))
    x1, y1 = min(w, int(np.ceil(hi[0] + pad)) + 1), min(h, int(np.ceil(hi[1] + pad)) + 1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def caption_for(verdict: Verdict) -> str:
    """One line for the overlay: part, verdict, defects and scores."""
    what = verdict.label + (f" {'+'.join(verdict.defects)}" if verdict.defects else "")
    ratio = verdict.unknown_ratio
    unknown = f"  unknown {ratio:.2f}x" if ratio is not None else ""
    return (f"part {verdict.part_id} frame {verdict.frame_id}  {what}  dirt {verdict.score_dirt:.2f} "
            f"scratch {verdict.score_scratch:.2f} ec {verdict.score_ec:.2f}{unknown}")


# ---------------------------------------------------------------------------------------- archive


@dataclasses.dataclass
class _Job:
    image: np.ndarray
    verdict: Verdict
    saliency: np.ndarray | None
    mask: np.ndarray | None
    outlines: list[np.ndarray] | None
    meta: dict | None
    ts: float
    extras: dict | None = None


_STOP = object()


class RejectArchive:
    """Writes archived parts to ``root`` under ``quota_bytes``, in a background thread.

    Args:
        root: the archive directory (created when missing; a failure is logged, and writes then fail
            and are counted, but the daemon carries on).
        quota_bytes: the most bytes the archive's entries may take; oldest entries are deleted first.
        labels: which verdict labels are archived (``Verdict.label``: accept, reject, no_part, not_inspected).
        accept_every: also archive every Nth accepted part (a sample of good parts for retraining); 0 = none.
            Ignored when "accept" is in ``labels``.
        queue_size: parts waiting for the writer at most; more are dropped (counted).
        overlay_max_side: the overlay's longest side at most, in pixels.
        png_compression: 0-9, OpenCV's PNG compression level for both PNGs (higher = smaller, slower).
        start: start the writer thread now (tests pass False to fill the queue deterministically).
    """

    def __init__(self, root: str | Path, quota_bytes: int, *, labels: Sequence[str] = DEFAULT_LABELS,
                 queue_size: int = 32, overlay_max_side: int = 1280, png_compression: int = 3,
                 start: bool = True, accept_every: int = 0) -> None:
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes <= 0:
            raise ValueError(f"archive quota_bytes must be a positive integer, got {quota_bytes!r}")
        if queue_size < 1:
            raise ValueError(f"archive queue_size must be >= 1, got {queue_size!r}")
        if not 0 <= png_compression <= 9:
            raise ValueError(f"archive png_compression must be 0..9, got {png_compression!r}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.labels = frozenset(labels)
        if isinstance(accept_every, bool) or not isinstance(accept_every, int) or accept_every < 0:
            raise ValueError(f"archive accept_every must be an integer >= 0, got {accept_every!r}")
        self.accept_every = accept_every
        self._accepts_seen = 0  # accepted parts offered to wants(), for accept_every
        self.overlay_max_side = overlay_max_side
        self._png_params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)]
        self._lock = threading.Lock()  # counters
        self._disk_lock = threading.Lock()  # index + files: write() may be called from any thread
        self._counts = {"queued": 0, "written": 0, "write_errors": 0, "dropped": 0, "skipped": 0,
                        "deleted": 0, "deleted_bytes": 0}
        self._stems: list[str] = []  # sorted (= oldest first)
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._abandon = threading.Event()  # set by close() after its timeout: drop what is still queued
        self._thread: threading.Thread | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as exc:
            log.error("archive_unavailable", root=str(self.root), error=str(exc),
                      fix="check the archive directory exists, is writable and its disk is mounted")
        if start:
            self.start()

    # ------------------------------------------------------------------------------ public

    def start(self) -> None:
        """Start the background writer (idempotent)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._worker, name="reject-archive", daemon=True)
            self._thread.start()

    def wants(self, verdict: Verdict) -> bool:
        """Whether parts with this verdict may be archived (its label is saved, or a sample of accepts is)."""
        return verdict.label in self.labels or (verdict.label == "accept" and self.accept_every > 0)

    def _keeps(self, verdict: Verdict) -> str | None:
        """Why this part is archived ("save", "accept_every") or None; each accepted part offered advances the
        accept_every count (submit and write call it once per part)."""
        if verdict.label in self.labels:
            return "save"
        if verdict.label == "accept" and self.accept_every:
            with self._lock:
                self._accepts_seen += 1
                return "accept_every" if self._accepts_seen % self.accept_every == 0 else None
        return None

    def submit(self, image: np.ndarray, verdict: Verdict, *, saliency: np.ndarray | None = None,
               mask: np.ndarray | None = None, outlines: Iterable[np.ndarray] | None = None,
               meta: dict | None = None, copy: bool = True, timestamp: float | None = None,
               extras: dict | None = None) -> bool:
        """Queue a part for the writer; True when queued. Never blocks, never raises.

        ``extras`` (the inspection's batch, prediction and masks, see :func:`part_overlay`) is taken by
        reference, never copied: the overlay is drawn from it on the writer's thread. Without it,
        ``saliency``/``mask`` are frame-sized maps and the overlay is cropped around ``outlines``.

        Verdicts whose label is not archived are skipped (False, counted as ``skipped``); a full
        queue or a closed archive drops the part (False, counted as ``dropped``). With ``copy`` the
        arrays are copied, so the caller may reuse its buffers; pass False only for arrays nobody
        will modify afterwards. ``timestamp`` (unix time) defaults to now.
        """
        try:
            kept = self._keeps(verdict)
            if kept is None:
                self._count("skipped")
                return False
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
                self._count("write_errors")
                log.error("archive_bad_frame", part_id=verdict.part_id,
                          got=f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}",
                          fix="pass the camera frame as an (H, W) uint8 array")
                return False
            if self._closed:
                self._count("dropped")
                log.warning("archive_drop", part_id=verdict.part_id, reason="archive closed")
                return False
            cp = (lambda a: None if a is None else np.array(a, copy=True)) if copy else (lambda a: a)
            job = _Job(image=cp(image), verdict=verdict, saliency=cp(saliency), mask=cp(mask),
                       outlines=None if outlines is None else [np.array(p, dtype=np.float64) for p in outlines],
                       meta={**(meta or {}), "kept": kept}, ts=time.time() if timestamp is None else timestamp,
                       extras=extras)
            with self._lock:
                self._pending += 1
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self._done()
                self._count("dropped")
                log.warning("archive_drop", part_id=verdict.part_id, reason="queue full",
                            queue_size=self._queue.maxsize)
                return False
            self._count("queued")
            return True
        except Exception as exc:  # never let archiving take the pipeline down
            self._count("write_errors")
            log.error("archive_submit_failed", error=repr(exc))
            return False

    def write(self, image: np.ndarray, verdict: Verdict, *, saliency: np.ndarray | None = None,
              mask: np.ndarray | None = None, outlines: Iterable[np.ndarray] | None = None,
              meta: dict | None = None, timestamp: float | None = None, extras: dict | None = None) -> bool:
        """Write one entry now (in the calling thread); True when written. Never raises.

        Failures (disk full, read-only or missing directory, an entry larger than the quota, bad
        arrays) are logged, counted as ``write_errors`` and leave no partial files behind. When only
        the overlay cannot be rendered, the frame and sidecar are still written (the sidecar says why).
        """
        ts = time.time() if timestamp is None else timestamp
        part = getattr(verdict, "part_id", None)
        try:
            return self._write(image, verdict, saliency, mask, outlines, meta, ts, extras)
        except Exception as exc:
            self._count("write_errors")
            log.error("archive_write_failed", part_id=part, root=str(self.root), error=repr(exc),
                      fix="check free space and permissions of the archive directory")
            return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued part is written (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is None else min(remaining, 0.5))
            return True

    def close(self, timeout: float | None = 30.0, grace: float = 5.0) -> bool:
        """Write what is queued within ``timeout``, then stop the writer; later submits are dropped.

        Parts still queued after ``timeout`` are dropped (counted) and the writer is joined for up to
        ``grace`` more seconds, the time to finish the write in progress: the writer thread never outlives
        close() in the middle of an encode (a thread inside OpenCV at interpreter exit can abort the
        process). True when everything queued was written.
        """
        if self._closed:
            return self._pending == 0
        self._closed = True
        if self._thread is None:  # never started: start it so the queue is written
            self._thread = threading.Thread(target=self._worker, name="reject-archive", daemon=True)
            self._thread.start()
        flushed = self.flush(timeout)
        if not flushed:
            self._abandon.set()  # the writer drops what is still queued after its current write
            log.warning("archive_close_timeout", pending=self._pending)
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join(grace)
        if not self._thread.is_alive():  # a submit that raced with close() landed behind the stop marker
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    self._done()
                    self._count("dropped")
        else:
            log.error("archive_writer_did_not_stop", grace_s=grace)
        ok = flushed and not self._thread.is_alive() and self._pending == 0
        log.info("archive_closed", **self.stats())
        return ok

    def stats(self) -> dict[str, int]:
        """Counters since start (queued, written, write_errors, dropped, skipped, deleted, deleted_bytes)
        and gauges (pending, entries, used_bytes, quota_bytes)."""
        with self._lock:
            out = dict(self._counts)
            out["pending"] = self._pending
        with self._disk_lock:
            out["entries"] = len(self._stems)
            out["used_bytes"] = self._used
        out["quota_bytes"] = self.quota_bytes
        return out

    def entries(self) -> list[str]:
        """The archive's entry stems, oldest first."""
        with self._disk_lock:
            return list(self._stems)

    def __enter__(self) -> RejectArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._abandon.is_set():  # close() ran out of time: drop, do not start another encode
                self._done()
                self._count("dropped")
                continue
            try:
                self.write(job.image, job.verdict, saliency=job.saliency, mask=job.mask, outlines=job.outlines,
                           meta=job.meta, timestamp=job.ts, extras=job.extras)
            except Exception as exc:  # write() does not raise; belt and braces for the thread
                log.error("archive_worker_error", error=repr(exc))
            finally:
                self._done()

    def _scan(self) -> None:
        """Index existing entries (grouped by stem) and remove temporary files a crash left behind."""
        sizes: dict[str, int] = {}
        with os.scandir(self.root) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False):
                    continue
                if e.name.startswith(TMP_PREFIX):
                    try:
                        os.unlink(e.path)
                    except OSError:
                        pass
                    continue
                m = STEM_RE.match(e.name)
                if m:
                    try:
                        size = e.stat(follow_symlinks=False).st_size
                    except OSError:  # deleted meanwhile
                        continue
                    sizes[m.group(1)] = sizes.get(m.group(1), 0) + size
        with self._disk_lock:
            self._sizes = sizes
            self._stems = sorted(sizes)
            self._used = sum(sizes.values())
        log.info("archive_opened", root=str(self.root), entries=len(sizes), used_bytes=self._used,
                 quota_bytes=self.quota_bytes)

    def _encode(self, img: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".png", img, self._png_params)
        if not ok:
            raise ValueError(f"PNG encoding failed for an image of shape {img.shape} {img.dtype}")
        return buf.tobytes()

    def _write(self, image: np.ndarray, verdict: Verdict, saliency: np.ndarray | None, mask: np.ndarray | None,
               outlines: Iterable[np.ndarray] | None, meta: dict | None, ts: float,
               extras: dict | None = None) -> bool:
        if not isinstance(image, np.ndarray) or image.size == 0 or image.dtype != np.uint8:
            raise ValueError(f"frame must be a non-empty uint8 array, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        frame_png = self._encode(image)
        overlay_error = None
        box = None
        try:
            if extras is not None:
                overlay, box = part_overlay(image, verdict, extras, max_side=self.overlay_max_side)
            else:
                overlay, box = self._framed_overlay(image, verdict, saliency, mask, outlines)
            overlay_png = self._encode(overlay)
        except Exception as exc:
            overlay_png = None
            overlay_error = repr(exc)
            log.warning("archive_overlay_failed", part_id=verdict.part_id, error=overlay_error)

        with self._disk_lock:
            stem = entry_stem(verdict, ts)
            while stem in self._sizes:  # same microsecond, same part: keep names unique and ordered
                ts += 1e-6
                stem = entry_stem(verdict, ts)
            names = {"frame": stem + FRAME_SUFFIX}
            if overlay_png is not None:
                names["overlay"] = stem + OVERLAY_SUFFIX
            sidecar = {
                "time": _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat(),
                "part_id": verdict.part_id, "frame_id": verdict.frame_id, "label": verdict.label,
                "defects": list(verdict.defects), "reason": verdict.reason,
                "verdict": dataclasses.asdict(verdict), "files": names,
                "frame_shape": list(image.shape), "overlay_box": list(box) if box else None,
                "overlay_error": overlay_error, "meta": meta or {},
            }
            sidecar_bytes = json.dumps(sidecar, indent=1, default=_jsonable).encode("utf-8")
            blobs = [(names["frame"], frame_png)]
            if overlay_png is not None:
                blobs.append((names["overlay"], overlay_png))
            blobs.append((stem + SIDECAR_SUFFIX, sidecar_bytes))  # last: its presence marks a complete entry
            need = sum(len(b) for _, b in blobs)
            if need > self.quota_bytes:
                self._count("write_errors")
                log.error("archive_entry_exceeds_quota", part_id=verdict.part_id, entry_bytes=need,
                          quota_bytes=self.quota_bytes, fix="raise the archive quota")
                return False
            self._evict(self.quota_bytes - need)
            written: list[Path] = []
            try:
                for name, data in blobs:
                    final = self.root / name
                    tmp = self.root / f"{TMP_PREFIX}{name}"
                    written.append(tmp)
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, final)
                    written[-1] = final
            except OSError as exc:
                for p in written:
                    try:
                        p.unlink()
                    except OSError:
                        pass
                self._count("write_errors")
                log.error("archive_write_failed", part_id=verdict.part_id, root=str(self.root), error=str(exc),
                          errno=exc.errno, fix="free disk space or fix the archive directory's permissions")
                return False
            bisect.insort(self._stems, stem)
            self._sizes[stem] = need
            self._used += need
        self._count("written")
        log.debug("archive_written", part_id=verdict.part_id, stem=stem, bytes=need)
        return True

    def _framed_overlay(self, image: np.ndarray, verdict: Verdict, saliency: np.ndarray | None,
                        mask: np.ndarray | None, outlines: Iterable[np.ndarray] | None
                        ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """The overlay from frame-sized maps, cropped around ``outlines`` (the whole frame without them)."""
        polys = None if outlines is None else [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in outlines]
        h, w = image.shape[:2]
        for name, arr in (("saliency", saliency), ("mask", mask)):
            if arr is not None and arr.shape != (h, w):
                raise ValueError(f"{name} has shape {arr.shape}, the frame is {(h, w)}: map it to frame coordinates")
        box = outlines_box(polys, image.shape) if polys else None
        if box is None:
            return render_overlay(image, saliency, mask, polys, max_side=self.overlay_max_side,
                                  caption=caption_for(verdict)), None
        x0, y0, x1, y1 = box
        polys = [p - np.array([x0, y0], dtype=np.float64) for p in polys]
        sal = None if saliency is None else saliency[y0:y1, x0:x1]
        msk = None if mask is None else mask[y0:y1, x0:x1]
        return render_overlay(image[y0:y1, x0:x1], sal, msk, polys,
                              max_side=self.overlay_max_side, caption=caption_for(verdict)), box

    def _evict(self, budget: int) -> None:
        """Delete the oldest entries until the archive uses at most ``budget`` bytes (call with _disk_lock)."""
        while self._stems and self._used > budget:
            stem = self._stems.pop(0)
            size = self._sizes.pop(stem)
            self._used -= size
            for suffix in (SIDECAR_SUFFIX, OVERLAY_SUFFIX, FRAME_SUFFIX):
                try:
                    (self.root / (stem + suffix)).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("archive_delete_failed", file=stem + suffix, error=str(exc))
            self._count("deleted")
            self._count("deleted_bytes", size)
            log.debug("archive_deleted", stem=stem, bytes=size)
