"""``valve-inspect soak``: one daemon at a fixed part rate for a long time, sampled for growth.

The same line as ``valve-inspect bench`` (service.bench): the real Daemon in-process, the pylon camera
emulator replaying the demo frames (BMP), the in-process PLC simulator on a free 127.0.0.1 port, ONNX
Runtime on the CPU, no metrics HTTP, no archive. Unlike the bench, one Daemon runs for the whole
duration (the bench starts a new one per rate, so its process peak creeps over the first rates; that is
the bench's own allocator arenas, not the daemon: a soak is the leak test).

Every ``--sample-every`` seconds it records: resident set (``VmRSS``), threads (``/proc/self/status``),
open file descriptors (``/proc/self/fd``), the frame queue's depth, the open parts in the part book,
the PLC link's event and result queues, and the counters (parts produced, results, inspected,
NotInspected, watchdog rejects).

The verdict (``analyse``):

* growth: the median RSS of the last ``--window`` seconds against the median of the first ``--window``
  seconds after ``--warmup``; pass when < 5 %. Threads and fds must not grow at all.
* nothing stuck: parts kept being produced and answered in every sample interval after the warm-up.
* kept up (the rate was sustained, not shed): no PLC watchdog reject, NotInspected under 1 % of the
  parts, and the frame queue never full at two samples in a row. An overloaded line sheds parts by
  design (NotInspected at once); this check says whether the rate was within its capacity.
* every part answered: after the end, once the simulator's watchdog has passed, every produced part got
  a result (no watchdog reject) and none got two.

The simulator's per-part outcome records (a deque, 100,000 by default, which the bench reads) are the
bench's own memory, not the daemon's: the soak needs only the simulator's counters, so it keeps the last
``--sim-records`` (1,000 by default) and ``bench_overhead_mib`` estimates what they hold at most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.app import Daemon
from service.bench import bench_settings
from service.errors import FatalError, ValveInspectError
from service.logs import configure_logging
from service.metrics import Metrics
from service.sim.demo import bmp_frames, demo_frames

GROWTH_LIMIT = 0.05
#: bytes per outcome record the simulator keeps (PartOutcome: a dataclass of 8 small fields, in a deque)
OUTCOME_BYTES = 200


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mib() -> float | None:
    kib = _proc_status("VmRSS")
    return None if kib is None else kib / 1024.0


def _fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def sample(daemon: Daemon, sim: Any, t0: float) -> dict[str, Any]:
    """One sample of the running line (cheap: a few /proc reads and counters)."""
    st = sim.stats()
    link = daemon.plc.stats()
    return {
        "t": round(time.monotonic() - t0, 2), "rss_mib": _rss_mib(), "threads": _proc_status("Threads"),
        "py_threads": threading.active_count(), "fds": _fds(), "frame_queue": daemon.queue_depth,
        "open_parts": len(daemon.book), "plc_events": daemon.plc.events.qsize(),
        "plc_results": link.get("queue_depth"), "produced": st["parts"], "results": st["results"],
        "watchdog_rejects": st["watchdog_rejects"], "inspected": daemon.stats.inspected,
        "not_inspected": daemon.stats.verdicts.get("not_inspected", 0),
    }


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def analyse(samples: list[dict[str, Any]], *, warmup: float, window: float, queue_size: int,
            event_queue_max: int, final: dict[str, Any]) -> dict[str, Any]:
    """The soak's verdict from its samples (see the module docstring)."""
    after = [s for s in samples if s["t"] >= warmup]
    first = [s["rss_mib"] for s in after if s["t"] < warmup + window and s["rss_mib"] is not None]
    end_t = samples[-1]["t"] if samples else 0.0
    last = [s["rss_mib"] for s in after if s["t"] > end_t - window and s["rss_mib"] is not None]
    base, tail = _median(first), _median(last)
    growth = (tail - base) / base if base and tail is not None else None
    slope = None
    if len(after) >= 3:
        t = np.array([s["t"] for s in after], dtype=np.float64)
        r = np.array([s["rss_mib"] for s in after], dtype=np.float64)
        slope = float(np.polyfit(t / 3600.0, r, 1)[0])  # MiB per hour after the warm-up
    stalls = [b["t"] for a, b in zip(after, after[1:], strict=False)
              if b["produced"] == a["produced"] or b["results"] == a["results"]]
    full = [b["t"] for a, b in zip(after, after[1:], strict=False)
            if (a["frame_queue"] >= queue_size and b["frame_queue"] >= queue_size)
            or (a["plc_events"] >= event_queue_max and b["plc_events"] >= event_queue_max)]
    threads = sorted({s["threads"] for s in after if s["threads"] is not None})
    fds = sorted({s["fds"] for s in after if s["fds"] is not None})
    answered = final["produced"] > 0 and final["results"] == final["produced"] and final["watchdog_rejects"] == 0
    shed = final.get("not_inspected", 0) / final["produced"] if final["produced"] else 0.0
    checks = {
        "rss_growth_below_5_percent": growth is not None and growth < GROWTH_LIMIT,
        "threads_constant": len(threads) == 1,
        "fds_constant": len(fds) <= 1 or (max(fds) - min(fds)) <= 2,  # a transient socket or /proc handle
        "nothing_stuck": not stalls,
        "every_part_answered": answered and final["duplicate_results"] == 0,
        "kept_up": not full and final["watchdog_rejects"] == 0 and shed < 0.01,
    }
    return {
        "rss_base_mib": base, "rss_end_mib": tail, "rss_growth": growth, "rss_slope_mib_per_h": slope,
        "rss_max_mib": max((s["rss_mib"] for s in after if s["rss_mib"] is not None), default=None),
        "threads": threads, "fds": fds, "stalled_at": stalls[:10], "queues_full_at": full[:10],
        "not_inspected_share": round(shed, 4),
        "bench_overhead_mib": round(min(final["produced"], final.get("sim_records", final["produced"]))
                                   * OUTCOME_BYTES / 2**20, 2),
        "checks": checks, "passed": all(checks.values()),
    }


def run_soak(*, rate: float, duration: float, sample_every: float, warmup: float, window: float, images: str,
             classes: list[str], model: str | None = None, threads: int | None = None, workers: int | None = None,
             progress=None, connect_timeout: float = 30.0, sim_records: int = 1000) -> dict[str, Any]:
    """Run one daemon at ``rate`` parts/s for ``duration`` seconds; returns samples, totals and the verdict."""
    from prometheus_client import CollectorRegistry

    from service.sim.plc_sim import PlcSimulator

    probe = bench_settings(rate=rate, plc_port=1, images=images, model=model, threads=threads, workers=workers)
    # the simulator scores part i against manifest[i]: as many entries as parts can come, no more (a list of
    # millions of strings would be the bench's own memory, not the daemon's)
    repeats = int(rate * (duration + 60.0) / max(1, len(classes))) + 2
    sim = PlcSimulator(host="127.0.0.1", port=0, db=probe.plc.db, rate=rate, watchdog_s=probe.plc.sim_watchdog_s,
                       manifest=classes * repeats, enable=False, report_every=0, keep_outcomes=sim_records)
    sim.start()
    daemon: Daemon | None = None
    samples: list[dict[str, Any]] = []
    try:
        settings = bench_settings(rate=rate, plc_port=sim.port, images=images, model=model, threads=threads,
                                  workers=workers)
        daemon = Daemon(settings, metrics=Metrics(CollectorRegistry()), plc_simulator=sim)
        daemon.start()
        end = time.monotonic() + connect_timeout
        while not (daemon.plc.connected and daemon.camera.connected):
            if time.monotonic() > end:
                raise ValveInspectError(f"soak: the PLC link or the camera did not come up within {connect_timeout} s")
            time.sleep(0.05)
        t0 = time.monotonic()
        sim.set_enable(True)
        next_t = t0
        while True:
            now = time.monotonic()
            if now - t0 >= duration:
                break
            next_t += sample_every
            time.sleep(max(0.0, next_t - now))
            samples.append(sample(daemon, sim, t0))
            if progress is not None:
                progress(samples[-1])
        sim.set_enable(False)  # no new parts; every open one is answered or times out
        time.sleep(sim.watchdog_s + 1.0)
        st = sim.stats()
        final = {"produced": st["parts"], "results": st["results"], "watchdog_rejects": st["watchdog_rejects"],
                 "duplicate_results": st["duplicate_results"], "late_results": st["late_results"],
                 "accuracy": st["accuracy"], "inspected": daemon.stats.inspected,
                 "not_inspected": daemon.stats.verdicts.get("not_inspected", 0),
                 "verdicts": dict(daemon.stats.verdicts), "provider": daemon.model.provider,
                 "sim_records": sim_records}
    finally:
        if daemon is not None:
            daemon.stop("soak")
        sim.stop()
    verdict = analyse(samples, warmup=warmup, window=window, queue_size=settings.pipeline.queue_size,
                      event_queue_max=1024, final=final)
    return {"rate": rate, "duration_s": duration, "sample_every_s": sample_every, "warmup_s": warmup,
            "window_s": window, "threads_setting": threads, "workers": workers, "cpu_count": os.cpu_count(),
            "final": final, "analysis": verdict, "samples": samples}


def format_report(out: dict[str, Any]) -> str:
    a, f = out["analysis"], out["final"]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"soak: {out['rate']:g} parts/s for {out['duration_s']:g} s, one daemon ({f['provider']})",
        f"  parts produced {f['produced']}, results {f['results']}, inspected {f['inspected']}, "
        f"watchdog rejects {f['watchdog_rejects']}, duplicates {f['duplicate_results']}, verdicts {f['verdicts']}",
        f"  RSS after {out['warmup_s']:g} s warm-up: {fmt(a['rss_base_mib'])} MiB -> {fmt(a['rss_end_mib'])} MiB at the "
        f"end (growth {fmt(None if a['rss_growth'] is None else 100 * a['rss_growth'], '.2f')} %, slope "
        f"{fmt(a['rss_slope_mib_per_h'], '.2f')} MiB/h, max {fmt(a['rss_max_mib'])} MiB; the simulator's own "
        f"records ~{a['bench_overhead_mib']} MiB)",
        f"  threads {a['threads']}, open fds {a['fds']}",
    ]
    for name, ok in a["checks"].items():
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}")
    lines.append("soak " + ("passed" if a["passed"] else "FAILED"))
    return "\n".join(lines)


def plot_soak(out: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = out["samples"]
    t = [x["t"] / 60.0 for x in s]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(t, [x["rss_mib"] for x in s])
    axes[0].axvline(out["warmup_s"] / 60.0, color="gray", ls=":", lw=0.8, label="end of warm-up")
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].legend(fontsize=7)
    axes[1].plot(t, [x["threads"] for x in s], label="threads")
    axes[1].plot(t, [x["fds"] for x in s], label="open fds")
    axes[1].legend(fontsize=7)
    axes[2].plot(t, [x["frame_queue"] for x in s], label="frame queue")
    axes[2].plot(t, [x["open_parts"] for x in s], label="open parts")
    axes[2].plot(t, [x["plc_results"] for x in s], label="PLC result queue")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.suptitle(f"valve-inspect soak: {out['rate']:g} parts/s, {out['duration_s'] / 60:.0f} min, one daemon",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valve-inspect soak",
                                description="Run one daemon (pylon emulator, in-process PLC simulator, ONNX on the "
                                            "CPU) at a fixed part rate for a long time, sampling RSS, threads, open "
                                            "fds and queue depths; pass when RSS grows < 5 %% after the warm-up, "
                                            "nothing is stuck and every part is answered.")
    p.add_argument("--rate", type=float, default=4.0, help="parts per second (default 4)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800 = 30 min)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--warmup", type=float, default=120.0, help="seconds before the baseline (default 120)")
    p.add_argument("--window", type=float, default=120.0,
                   help="seconds of samples for the baseline and the end medians (default 120)")
    p.add_argument("--threads", type=int, default=None, help="model.intra_op_threads (default: the config's)")
    p.add_argument("--workers", type=int, default=None, help="pipeline.workers (default: the config's)")
    p.add_argument("--model", default=None, help="model.onnx (default: the shipped demo model)")
    p.add_argument("--sim-records", type=int, default=1000,
                   help="per-part outcome records the PLC simulator keeps (default 1000; the soak reads only its "
                        "counters, and the records are the bench's memory, not the daemon's)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the samples and verdict")
    p.add_argument("--plot", default=None, metavar="PNG", help="RSS, threads/fds and queues over time")
    p.add_argument("--log-level", default="error", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.rate <= 1000 or args.duration <= 0 or args.sample_every <= 0 or args.warmup < 0 \
            or args.window <= 0:
        print("valve-inspect soak: --rate in (0, 1000], --duration, --sample-every and --window > 0, "
              "--warmup >= 0", file=sys.stderr)
        return 2
    if args.sim_records < 0:
        print("valve-inspect soak: --sim-records must be >= 0", file=sys.stderr)
        return 2
    if args.warmup + 2 * args.window > args.duration:
        print(f"valve-inspect soak: --duration {args.duration:g} s is too short for --warmup {args.warmup:g} s plus "
              f"two --window of {args.window:g} s (baseline and end)", file=sys.stderr)
        return 2
    configure_logging(args.log_level, "console", stream=sys.stderr)
    frames, classes = demo_frames()
    frames = bmp_frames(frames)

    def progress(s: dict[str, Any]) -> None:
        if int(s["t"]) % 60 < args.sample_every:
            print(f"soak: t={s['t']:.0f} s rss={s['rss_mib']:.1f} MiB threads={s['threads']} fds={s['fds']} "
                  f"parts={s['produced']} results={s['results']} queue={s['frame_queue']}", file=sys.stderr, flush=True)

    try:
        out = run_soak(rate=args.rate, duration=args.duration, sample_every=args.sample_every, warmup=args.warmup,
                       window=args.window, images=str(frames), classes=classes, model=args.model,
                       threads=args.threads, workers=args.workers, progress=progress, sim_records=args.sim_records)
    except (FatalError, ValveInspectError, OSError) as exc:
        print(f"valve-inspect soak: {exc}", file=sys.stderr)
        return 1
    print(format_report(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    if args.plot:
        plot_soak(out, args.plot)
    return 0 if out["analysis"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
