"""valve-inspect soak: the verdict logic on made-up samples, and a short real soak of one daemon."""

from __future__ import annotations

import pytest

from service.soak import analyse, run_soak


def samples(n: int = 60, rss=lambda i: 500.0, threads=lambda i: 20, fds=lambda i: 30, produced=lambda i: 4 * i,
            results=lambda i: 4 * i, queue=lambda i: 0) -> list[dict]:
    return [{"t": float(i), "rss_mib": rss(i), "threads": threads(i), "py_threads": 10, "fds": fds(i),
             "frame_queue": queue(i), "open_parts": 1, "plc_events": 0, "plc_results": 0,
             "produced": produced(i), "results": results(i), "watchdog_rejects": 0, "inspected": 4 * i,
             "not_inspected": 0} for i in range(n)]


FINAL = {"produced": 240, "results": 240, "watchdog_rejects": 0, "duplicate_results": 0}


def verdict(s, final=FINAL):
    return analyse(s, warmup=10, window=10, queue_size=4, event_queue_max=1024, final=final)


def test_a_flat_line_passes():
    """Constant RSS, threads and fds, parts flowing and all answered: every check passes."""
    v = verdict(samples())
    assert v["passed"] and v["rss_growth"] == 0.0, v


def test_rss_growth_of_5_percent_fails_and_4_passes():
    """Growth is the end median against the post-warm-up median: +5 % fails, +4 % passes."""
    assert not verdict(samples(rss=lambda i: 500.0 if i < 30 else 525.0))["checks"]["rss_growth_below_5_percent"]
    assert verdict(samples(rss=lambda i: 500.0 if i < 30 else 520.0))["checks"]["rss_growth_below_5_percent"]


def test_warm_up_growth_is_not_counted():
    """Memory that grows only during the warm-up (arenas, caches) is not a leak."""
    assert verdict(samples(rss=lambda i: 300.0 + 20 * i if i < 10 else 500.0))["passed"]


def test_growing_threads_or_fds_fail():
    """One more thread, or fds that keep growing, fail their checks."""
    assert not verdict(samples(threads=lambda i: 20 + (i > 40)))["checks"]["threads_constant"]
    assert not verdict(samples(fds=lambda i: 30 + i))["checks"]["fds_constant"]


def test_a_stall_is_stuck_and_a_full_queue_or_shedding_did_not_keep_up():
    """An interval with no new result is stuck; a frame queue full twice in a row, a watchdog reject or 1 %
    NotInspected means the rate was not sustained (kept_up), without being stuck."""
    assert not verdict(samples(results=lambda i: 4 * min(i, 40)))["checks"]["nothing_stuck"]
    full = verdict(samples(queue=lambda i: 4 if 30 <= i <= 31 else 0))["checks"]
    assert full["nothing_stuck"] and not full["kept_up"]
    assert verdict(samples(queue=lambda i: 4 if i == 30 else 0))["checks"]["kept_up"]
    assert not verdict(samples(), {**FINAL, "not_inspected": 3})["checks"]["kept_up"]  # 3 of 240 = 1.25 %
    assert verdict(samples(), {**FINAL, "not_inspected": 2})["checks"]["kept_up"]


def test_an_unanswered_or_twice_answered_part_fails():
    """A watchdog reject, a missing result or a duplicate result fails every_part_answered."""
    for final in ({**FINAL, "results": 239}, {**FINAL, "watchdog_rejects": 1}, {**FINAL, "duplicate_results": 1}):
        assert not verdict(samples(), final)["checks"]["every_part_answered"]


@pytest.mark.slow
@pytest.mark.alone  # every part answered at 4 parts/s: not beside another test on the same cores
def test_a_short_real_soak_answers_every_part_and_samples_the_process(tmp_path, monkeypatch):
    """20 s of one real daemon at 4 parts/s (emulator, PLC simulator, ONNX): every part answered, samples
    carry RSS, threads, fds and queue depths, and threads stay constant."""
    from service.sim.demo import bmp_frames, demo_frames

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    frames, classes = demo_frames(parts=8)
    out = run_soak(rate=4.0, duration=20.0, sample_every=1.0, warmup=6.0, window=5.0,
                   images=str(bmp_frames(frames)), classes=classes, threads=1)
    f, a = out["final"], out["analysis"]
    assert f["produced"] >= 60 and f["results"] == f["produced"] and f["watchdog_rejects"] == 0, f
    assert len(out["samples"]) >= 18
    assert all(s["rss_mib"] > 50 and s["threads"] > 3 and s["fds"] > 3 for s in out["samples"])
    assert a["checks"]["every_part_answered"] and a["checks"]["threads_constant"], a
