"""``valve-inspect bench``: the whole daemon path at increasing part rates.

For each rate the real Daemon runs in-process: the pylon camera emulator replaying the demo frames
(service.sim.demo.demo_frames), the in-process PLC simulator (a real Snap7 server on a free 127.0.0.1 port,
``rate`` parts/s, its own watchdog), the PLC link, ROI -> ONNX -> Otsu -> decide, results written back to
the simulator. Metrics HTTP and the reject archive are off; the Metrics object has a fresh registry.
The live view is off unless ``--ui``: then it serves on a free port and a client thread does what an
open browser tab does, once a second during the window: GET /api/status, the last part's
/api/parts/latest.jpg and any new reject thumbnails (``ui`` in the figures: requests, bytes, response
times, JPEG encodes). No torch anywhere on this path.

How each rate is measured:

* The simulator starts with Enable = 0 (no parts). Once the daemon is up and its PLC link is connected,
  Enable = 1 and parts flow; the first ``--warmup`` seconds are not counted.
* The window: the parts the simulator creates during the next ``--seconds`` (by PartId; part i has
  PartId i+1). After the window the line keeps running for the simulator's watchdog time (+0.5 s) so
  that every window part is resolved, then the daemon is stopped (``Daemon.stop()``).
* From the simulator's per-part outcomes (what the "PLC" saw) for the window parts:
  produced, results (a result arrived before the watchdog), watchdog rejects (no result in time),
  NotInspected results; inspected = results that are an inspection (Accept / Reject / NoPart).
* overflow: the daemon's ``stats.overflow`` during the window (queue full -> NotInspected at once).
* daemon_inspected: window parts the daemon itself finished with an inspection verdict (whether or not the
  result reached the PLC before its watchdog); plc_late_results: results the simulator received after its
  watchdog had already rejected the part (from the window start to the end of the drain; JSON only).
* plc_missed_part_ids: window PartIds the PLC link's polls never saw (the simulator wrote the next one before
  a poll read it: the poll thread stalled longer than a part period); each is a watchdog reject, by the
  interface's contract (docs/plc-interface.md, "PartId"). watchdog_rejects_seen: the watchdog rejects of parts
  the daemon did see, so did not answer in time (JSON only).
* sustained parts/s = inspected / seconds.
* Latencies are recorded per part by a Daemon subclass overriding ``_report`` (called once per result,
  right after it was published to the PLC): part latency = frame arrival -> result written (announce ->
  result for parts that never got a frame), and the worker's per-stage timings (roi, infer, segment).
  p50/p99 are exact (numpy percentiles) over the window's parts.
* accuracy: each inspected window part scored against the ground truth of the frame it was given. The
  emulator replays file k on the camera's k-th frame (frame_id k, modulo the 24 files), whatever PartId it
  was triggered for; when parts are shed before their trigger (``trigger_late``, ``camera_not_ready``)
  later frames serve later PartIds, so the simulator's own score (by PartId, ``plc_sim_accuracy`` in the
  JSON) is only meaningful while no part is shed. On a line the camera images the part in front of it.
* cpu_percent: CPU time of the whole process (every thread: camera, PLC link, the simulator's Snap7
  server, workers) during the window / its wall time; 200 % = both cores of this machine.
* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the rate (process peak so far, MiB), and
  ``rss_mib``, the resident set while the line still runs, at the end of the window (``/proc/self/status``).
  Every rate starts a new Daemon in the same process, so the peak creeps up over the first rates
  (allocator arenas of the threads of earlier daemons): a single long run is the leak test
  (docs/performance.md: flat at about 0.5 GB over 1,765 parts).

A rate "falls behind" when any window part got a watchdog reject, any overflow or NotInspected, or
inspected < 95 % of produced.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.app import Daemon
from service.errors import FatalError, ValveInspectError
from service.logs import configure_logging
from service.metrics import Metrics
from service.records import Verdict
from service.sim.demo import bmp_frames, demo_frames

DEFAULT_RATES = (4.0, 8.0, 12.0, 16.0, 20.0, 23.0)
STAGES = ("roi", "infer", "segment")
KEEP_UP_FRACTION = 0.95


class BenchDaemon(Daemon):
    """The Daemon, recording each result as it is reported: (part_id, label, reason, latency_s, timings)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[int, str, str, float | None, dict[str, float], int, bool, tuple[str, ...]]] = []
        self._rec_lock = threading.Lock()

    def _report(self, verdict: Verdict, frame, extras: dict | None, arrival: float | None) -> None:
        latency = time.monotonic() - arrival if arrival is not None else None
        timings = dict((extras or {}).get("timings", {}))
        with self._rec_lock:
            self.records.append((verdict.part_id, verdict.label, verdict.reason or "", latency, timings,
                                 verdict.frame_id, bool(verdict.accept), tuple(verdict.defects)))
        super()._report(verdict, frame, extras, arrival)


def _quantiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024.0


def bench_settings(*, rate: float, plc_port: int, images: str, model: str | None, threads: int | None,
                   workers: int | None = None, queue_size: int | None = None, ui: bool = False):
    """Demo-default Settings for one bench run (no environment, no metrics HTTP, no archive; the live view on a
    free port with ``ui``, else off)."""
    from service.config import load_config

    s = load_config(None, env={})
    model_upd: dict[str, Any] = {}
    if model:
        model_upd["path"] = str(model)
    if threads is not None:
        model_upd["intra_op_threads"] = threads
    pipeline_upd: dict[str, Any] = {} if workers is None else {"workers": workers}
    if queue_size is not None:
        pipeline_upd["queue_size"] = queue_size
    return s.model_copy(update={
        "pipeline": s.pipeline.model_copy(update=pipeline_upd),
        "camera": s.camera.model_copy(update={"source": "emulator", "images": images, "trigger": "software"}),
        "plc": s.plc.model_copy(update={"mode": "simulated", "host": "127.0.0.1", "port": plc_port,
                                        "sim_rate_hz": rate}),
        "model": s.model.model_copy(update=model_upd),
        "metrics": s.metrics.model_copy(update={"enabled": False}),
        "archive": s.archive.model_copy(update={"enabled": False}),
        "ui": s.ui.model_copy(update={"enabled": ui, "host": "127.0.0.1", "port": 0}),
    })


class UiClient:
    """An open live-view tab, as a thread: every ``period`` s GET /api/status, then latest.jpg when the part in
    the picture changed and the thumbnails of new rejects (what service/data/ui.html does)."""

    def __init__(self, url: str, period: float = 1.0) -> None:
        self.url = url
        self.period = period
        self.times_ms: dict[str, list[float]] = {"status": [], "latest": [], "thumb": []}
        self.bytes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-ui-client", daemon=True)

    def _get(self, kind: str, path: str) -> bytes | None:
        import urllib.request

        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                body = r.read()
        except OSError:
            self.errors += 1
            return None
        self.times_ms[kind].append((time.perf_counter() - t0) * 1e3)
        self.bytes += len(body)
        return body

    def _run(self) -> None:
        shown, thumbs = None, set()
        while not self._stop.wait(self.period):
            body = self._get("status", "api/status")
            if body is None:
                continue
            st = json.loads(body)
            part = st.get("image_part")
            if part and part["seq"] != shown:
                shown = part["seq"]
                self._get("latest", f"api/parts/latest.jpg?part={shown}")
            for r in st.get("rejects", []):
                if r["seq"] not in thumbs:
                    thumbs.add(r["seq"])
                    self._get("thumb", f"api/parts/rejects/{r['index']}.jpg?part={r['seq']}")

    def start(self) -> UiClient:
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(10.0)
        out: dict[str, Any] = {"bytes": self.bytes, "errors": self.errors}
        for kind, ts in self.times_ms.items():
            p50, _ = _quantiles(ts)
            out[kind] = {"requests": len(ts), "p50_ms": None if p50 is None else round(p50, 2),
                         "max_ms": round(max(ts), 2) if ts else None}
        return out


def run_rate(rate: float, *, seconds: float, warmup: float, images: str, classes: list[str],
             model: str | None = None, threads: int | None = None, workers: int | None = None,
             queue_size: int | None = None, connect_timeout: float = 30.0, ui: bool = False) -> dict[str, Any]:
    """One rate: start the line, warm up, measure ``seconds``, drain, stop; returns the figures (with ``ui``,
    the live view serves a polling client during the window)."""
    from prometheus_client import CollectorRegistry

    from service.sim.plc_sim import PlcSimulator, verdict_correct

    probe = bench_settings(rate=rate, plc_port=1, images=images, model=model, threads=threads, workers=workers,
                           queue_size=queue_size)
    sim = PlcSimulator(host="127.0.0.1", port=0, db=probe.plc.db, rate=rate, watchdog_s=probe.plc.sim_watchdog_s,
                       manifest=classes * 10_000, enable=False, report_every=0)
    sim.start()
    daemon: BenchDaemon | None = None
    try:
        settings = bench_settings(rate=rate, plc_port=sim.port, images=images, model=model, threads=threads,
                                  workers=workers, queue_size=queue_size, ui=ui)
        daemon = BenchDaemon(settings, metrics=Metrics(CollectorRegistry()), plc_simulator=sim)
        daemon.start()
        end = time.monotonic() + connect_timeout
        while not (daemon.plc.connected and daemon.camera.connected):
            if time.monotonic() > end:
                raise ValveInspectError(f"bench: the PLC link or the camera did not come up within "
                                        f"{connect_timeout} s")
            time.sleep(0.05)
        if ui and daemon.ui is None:
            raise ValveInspectError("bench --ui: the live view did not start (see ui_unavailable in the log)")
        sim.set_enable(True)
        time.sleep(warmup)
        st0 = sim.stats()
        n0, overflow0, late0 = st0["parts"], daemon.stats.overflow, st0["late_results"]
        encoded0 = daemon.ui.view.cache.encoded if ui else 0
        client = UiClient(daemon.ui.url).start() if ui else None
        t0, cpu0 = time.monotonic(), time.process_time()
        time.sleep(seconds)
        n1, overflow1 = sim.stats()["parts"], daemon.stats.overflow
        ui_figures = None
        if client is not None:
            ui_figures = {**client.stop(), "jpeg_encodes": daemon.ui.view.cache.encoded - encoded0}
        measured = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        rss_now = _rss_mib()
        time.sleep(sim.watchdog_s + 0.5)  # every window part resolved (result or the PLC's watchdog)
        late = sim.stats()["late_results"] - late0
        missed_ids = set(daemon.plc.missed_part_ids())  # PartIds the link's polls never saw
    finally:
        if daemon is not None:
            daemon.stop("bench")
        sim.stop()

    window = range(n0, n1)  # part indices; PartId = index + 1
    outcomes = [o for o in list(sim.outcomes) if o.index in window]
    produced = n1 - n0
    watchdog = sum(1 for o in outcomes if o.got == "timeout")
    missed = sum(1 for i in window if i + 1 in missed_ids)
    watchdog_seen = sum(1 for o in outcomes if o.got == "timeout" and o.index + 1 not in missed_ids)
    results = sum(1 for o in outcomes if o.got != "timeout")
    not_inspected = sum(1 for o in outcomes if o.got == "not_inspected")
    inspected = results - not_inspected
    scored = [o.correct for o in outcomes if o.correct is not None and o.got not in ("timeout", "not_inspected")]
    ids = {i + 1 for i in window}
    recs = [r for r in daemon.records if r[0] in ids]
    lat_p50, lat_p99 = _quantiles([r[3] * 1e3 for r in recs if r[3] is not None and r[1] != "not_inspected"])
    stages = {}
    for st in STAGES:
        p50, p99 = _quantiles([r[4][f"{st}_ms"] for r in recs if f"{st}_ms" in r[4]])
        stages[st] = {"p50_ms": p50, "p99_ms": p99}
    overflow = overflow1 - overflow0
    daemon_inspected = sum(1 for r in recs if r[1] != "not_inspected")
    replay = [verdict_correct(classes[r[5] % len(classes)], r[6], r[7]) for r in recs if r[1] != "not_inspected"]
    reasons: dict[str, int] = {}
    for r in recs:
        if r[1] == "not_inspected":
            reasons[r[2]] = reasons.get(r[2], 0) + 1
    behind = bool(watchdog or overflow or not_inspected or inspected < KEEP_UP_FRACTION * produced)
    return {
        "rate": rate, "seconds": round(measured, 3), "produced": produced, "results": results,
        "inspected": inspected, "watchdog_rejects": watchdog, "not_inspected": not_inspected,
        "plc_missed_part_ids": missed, "watchdog_rejects_seen": watchdog_seen,
        "not_inspected_reasons": reasons, "overflow": overflow, "daemon_inspected": daemon_inspected,
        "plc_late_results": late,
        "sustained_parts_per_s": inspected / measured if measured > 0 else 0.0,
        "latency_p50_ms": lat_p50, "latency_p99_ms": lat_p99, "stages": stages,
        "accuracy": (sum(replay) / len(replay)) if replay else None,
        "plc_sim_accuracy": (sum(scored) / len(scored)) if scored else None,
        "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_mib": None if rss_now is None else round(rss_now, 1),
        "falls_behind": behind,
        "cpu_percent": round(100.0 * cpu / measured, 1) if measured > 0 else None,
        "provider": daemon.model.provider if daemon.model is not None else None,
        "ui": ui_figures,
    }


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'rate/s':>6} {'made':>5} {'res':>5} {'insp':>5} {'wdog':>5} {'ovfl':>5} {'n/i':>5} {'sust/s':>7} "
            f"{'lat50':>6} {'lat99':>6} {'roi50':>6} {'roi99':>6} {'inf50':>6} {'inf99':>6} {'seg50':>6} "
            f"{'seg99':>6} {'cpu%':>5} {'acc':>5} {'peakMiB':>7}  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        st = r["stages"]
        lines.append(
            f"{r['rate']:>6g} {r['produced']:>5} {r['results']:>5} {r['inspected']:>5} {r['watchdog_rejects']:>5} "
            f"{r['overflow']:>5} {r['not_inspected']:>5} {r['sustained_parts_per_s']:>7.2f} "
            f"{_fmt(r['latency_p50_ms']):>6} {_fmt(r['latency_p99_ms']):>6} "
            f"{_fmt(st['roi']['p50_ms']):>6} {_fmt(st['roi']['p99_ms']):>6} "
            f"{_fmt(st['infer']['p50_ms']):>6} {_fmt(st['infer']['p99_ms']):>6} "
            f"{_fmt(st['segment']['p50_ms']):>6} {_fmt(st['segment']['p99_ms']):>6} {_fmt(r.get('cpu_percent'), '.0f'):>5} "
            f"{_fmt(r['accuracy'], '.2f'):>5} {r['peak_rss_mib']:>7.1f}  "
            f"{'FALLS BEHIND' if r['falls_behind'] else 'keeps up'}")
    lines.append("(latencies in ms: frame arrival -> result written, and per stage; wdog = PLC watchdog rejects, "
                 "ovfl = queue overflow, n/i = NotInspected; cpu% = process CPU / wall, 100 per core; acc = "
                 "verdicts right against the ground truth of the frame each part was given; peakMiB = the process's peak RSS "
                 "so far, which only grows over the rates of one run: the JSON's rss_mib is the resident set at the "
                 "end of each rate)")
    return "\n".join(lines)


def highest_sustained(rows: list[dict[str, Any]]) -> float | None:
    ok = [r["rate"] for r in rows if not r["falls_behind"]]
    return max(ok) if ok else None


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--rates {text!r}: comma-separated numbers, e.g. 4,8,12") from exc
    if not rates or any(not 0 < r <= 1000 for r in rates):
        raise argparse.ArgumentTypeError(f"--rates {text!r}: each rate must be in (0, 1000] parts/s")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valve-inspect bench",
                                description="Benchmark the whole daemon path (pylon emulator -> ROI -> ONNX -> "
                                            "Otsu -> verdict -> in-process PLC simulator) at increasing part rates.")
    p.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES),
                   help="comma-separated part rates (parts/s), default %(default)s")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per rate (default 15)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds per rate not counted (default 2)")
    p.add_argument("--threads", type=int, default=None, help="model.intra_op_threads (default: the config's)")
    p.add_argument("--workers", type=int, default=None, help="pipeline.workers (default: the config's)")
    p.add_argument("--queue-size", type=int, default=None, help="pipeline.queue_size (default: the config's)")
    p.add_argument("--frames", choices=("bmp", "png"), default="bmp",
                   help="file type the emulator replays: bmp (default; no decode, like a camera's DMA) or png "
                        "(the emulator decodes each frame on the same cores)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write latency p50/p99 and sustained parts/s against the offered rate (needs matplotlib)")
    p.add_argument("--model", default=None, help="model.onnx (default: the shipped demo model)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write all figures to OUT")
    p.add_argument("--ui", action="store_true",
                   help="serve the live view during each rate, polled once a second by a client thread like an "
                        "open browser tab (status, latest.jpg, new reject thumbnails)")
    p.add_argument("--log-level", default="error", choices=("debug", "info", "warning", "error"),
                   help="daemon log level during the bench (default error; logs go to stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        print("valve-inspect bench: --seconds must be > 0 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.model and not Path(args.model).is_file():
        print(f"valve-inspect bench: --model {args.model} is not a file", file=sys.stderr)
        return 2
    configure_logging(args.log_level, "console", stream=sys.stderr)
    frames, classes = demo_frames()
    if args.frames == "bmp":
        frames = bmp_frames(frames)
    rows: list[dict[str, Any]] = []
    for rate in args.rates:
        print(f"bench: {rate:g} parts/s for {args.seconds:g} s (+{args.warmup:g} s warm-up)...", file=sys.stderr,
              flush=True)
        try:
            rows.append(run_rate(rate, seconds=args.seconds, warmup=args.warmup, images=str(frames),
                                 classes=classes, model=args.model, threads=args.threads, workers=args.workers,
                                 queue_size=args.queue_size, ui=args.ui))
        except (FatalError, ValveInspectError, OSError) as exc:
            print(f"valve-inspect bench: {exc}", file=sys.stderr)
            return 1
    print(format_table(rows))
    for r in rows:
        if r.get("ui"):
            u = r["ui"]
            print(f"live view at {r['rate']:g}/s: status {u['status']['requests']} req p50 {_fmt(u['status']['p50_ms'])} "
                  f"ms, latest.jpg {u['latest']['requests']} req p50 {_fmt(u['latest']['p50_ms'])} ms, thumbnails "
                  f"{u['thumb']['requests']}, {u['jpeg_encodes']} JPEG encodes, {u['bytes'] / 1024:.0f} KiB, "
                  f"{u['errors']} errors")
    best = highest_sustained(rows)
    print(f"highest rate sustained: {'none' if best is None else f'{best:g} parts/s'}"
          f" (provider {rows[0]['provider'] if rows else '-'})")
    if args.json_out:
        out = {"rates": rows, "highest_sustained_rate": best, "seconds": args.seconds, "warmup": args.warmup,
               "threads": args.threads, "workers": args.workers, "queue_size": args.queue_size,
               "frames": args.frames, "model": args.model, "ui": args.ui,
               "keep_up_fraction": KEEP_UP_FRACTION, "cpu_count": os.cpu_count()}
        Path(args.json_out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    if args.plot:
        plot_rates(rows, args.plot, title=f"valve-inspect bench ({args.frames} replay, workers {args.workers or 'cfg'}, "
                                          f"threads {args.threads if args.threads is not None else 'cfg'})")
    return 0


def plot_rates(rows: list[dict[str, Any]] | dict[str, list[dict[str, Any]]], path: str | Path,
               title: str = "valve-inspect bench",
               reference_fps: tuple[tuple[float, str], ...] = ((18.22, "paper, RTX 2080: 18.22 FPS"),
                                                               (23.0, "camera: 23 fps"))) -> Path:
    """Latency p50/p99 (frame -> PLC) and sustained parts/s against the offered part rate.

    ``rows``: one bench run's rows, or {label: rows} to draw several configurations in one figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib is in the dev/train extras, not the runtime image
        raise SystemExit(f"valve-inspect bench --plot needs matplotlib ({exc}); pip install matplotlib") from None
    series = rows if isinstance(rows, dict) else {"": rows}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_rates: list[float] = []
    for n, (label, rs) in enumerate(series.items()):
        color = f"C{n}"
        prefix = f"{label}: " if label else ""
        rates = [r["rate"] for r in rs]
        all_rates += rates
        for key, name, style in (("latency_p50_ms", "p50", "o-"), ("latency_p99_ms", "p99", "s--")):
            pts = [(r["rate"], r[key]) for r in rs if r[key] is not None]
            if pts:
                ax1.plot(*zip(*pts, strict=True), style, color=color, label=f"{prefix}latency {name}")
        ax2.plot(rates, [r["sustained_parts_per_s"] for r in rs], "o-", color=color,
                 label=f"{prefix}inspected parts/s")
    ax1.axhline(100.0, color="red", lw=0.8, ls=":", label="target p99 100 ms")
    ax1.set_xlabel("offered part rate (parts/s)")
    ax1.set_ylabel("frame arrival -> PLC write (ms)")
    ax1.set_yscale("log")
    lo, hi = min(all_rates), max(all_rates)
    ax2.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="offered")
    for fps, label in reference_fps:
        for ax in (ax1, ax2):
            ax.axvline(fps, color="gray", lw=0.8, ls=":")
        ax2.axhline(fps, color="gray", lw=0.8, ls=":")
        ax2.annotate(label, (lo, fps), fontsize=7, va="bottom")
    ax2.set_xlabel("offered part rate (parts/s)")
    ax2.set_ylabel("sustained inspected parts/s")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    sys.exit(main())
