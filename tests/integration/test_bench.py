"""service.bench: the whole daemon path (emulator, in-process PLC simulator on a free 127.0.0.1 port, the shipped
model) at a low rate that the line keeps up with and at a rate far above its capacity."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import structlog

from service.bench import KEEP_UP_FRACTION, _rates, format_table, highest_sustained, main
from tests.helpers import REPO_ROOT
from tests.helpers.daemon_fixtures import clean_env, shipped_model

# alone: the overload rates assert that every part is answered before the PLC's watchdog, which a test running
# beside them on the same 2 cores can break (CI, 2026-11-30: one watchdog reject of 120 parts at 40 parts/s under
# pytest -n 2); README's command runs these in one process after the rest.
pytestmark = [pytest.mark.timeout(120), pytest.mark.alone]


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory) -> dict:
    """One bench run: 4, 40 and 200 parts/s, 3 s each after 1 s of warm-up (BMP replay, the default).

    The demo frames are rendered into a temporary XDG_CACHE_HOME, never into the user's cache folder."""
    if not shipped_model().is_file():
        pytest.skip("no shipped model (service/data/model.onnx)")
    saved = structlog.get_config()
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    cache = work / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        try:
            rc = main(["--rates", "4,40,200", "--seconds", "3", "--warmup", "1", "--threads", "1", "--json",
                       str(out), "--plot", str(out.with_suffix(".png"))])
        finally:
            structlog.configure(**saved)
    assert rc == 0
    result = json.loads(out.read_text())
    result["plot"] = out.with_suffix(".png")
    result["cache"] = cache
    return result


# What these tests assert holds on any machine, fast or slow, CPU or GPU: nothing depends on how many parts
# per second this machine can inspect. A faster machine keeps up at more rates; a slower one sheds more parts
# NotInspected; both must answer every part before the PLC's watchdog and report figures that agree.
ANSWERED_REASONS = {"trigger_late", "camera_not_ready", "overflow", "overload", "timeout_no_frame",
                    "timeout_inspection"}


def check_row_consistent(r: dict) -> None:
    """The JSON's figures for one rate agree with each other and with the falls-behind rule."""
    assert r["results"] + r["watchdog_rejects"] == r["produced"], r
    # a PartId the link never saw is never answered: it is a watchdog reject, and every other one was seen
    assert r["watchdog_rejects"] == r["watchdog_rejects_seen"] + r["plc_missed_part_ids"], r
    assert r["inspected"] + r["not_inspected"] == r["results"], r
    assert sum(r["not_inspected_reasons"].values()) >= 0 and r["overflow"] >= 0, r
    assert 0.0 <= r["sustained_parts_per_s"] <= r["inspected"] / r["seconds"] * 1.001, r  # seconds is rounded
    behind = bool(r["watchdog_rejects"] or r["overflow"] or r["not_inspected"]
                  or r["inspected"] < KEEP_UP_FRACTION * r["produced"])
    assert r["falls_behind"] == behind, r
    if r["latency_p50_ms"] is not None:
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"], r


def check_result_consistent(result: dict) -> None:
    """highest_sustained_rate is the highest rate that kept up (or None), and the table says the same."""
    rows = result["rates"]
    for r in rows:
        check_row_consistent(r)
    kept = [r["rate"] for r in rows if not r["falls_behind"]]
    assert result["highest_sustained_rate"] == (max(kept) if kept else None)
    assert result["highest_sustained_rate"] == highest_sustained(rows)
    table = format_table(rows).splitlines()
    for r in rows:
        line = next(t for t in table if t.split() and t.split()[0] == f"{r['rate']:g}")
        assert line.split()[1:4] == [str(r["produced"]), str(r["results"]), str(r["inspected"])], line
        assert line.endswith("FALLS BEHIND" if r["falls_behind"] else "keeps up"), line


def check_low_rate(low: dict, high: dict) -> None:
    """At the low rate every part is answered in time (inspected, or shed NotInspected with a reason: never
    left to the PLC's watchdog), and the line does at least as well as at the high rate: the fraction of parts
    inspected is no lower (5 points of tolerance) and it never inspects more parts per second than offered."""
    assert low["produced"] > 0 and low["watchdog_rejects"] == 0 and low["results"] == low["produced"], low
    assert set(low["not_inspected_reasons"]) <= ANSWERED_REASONS, low
    frac = low["inspected"] / low["produced"]
    assert frac >= high["inspected"] / high["produced"] - 0.05, (low, high)
    assert low["inspected"] > 0
    assert low["sustained_parts_per_s"] <= low["rate"] * 1.25, low  # 1 s of parts at most beyond the window


def test_low_rate_every_part_is_answered_with_figures(bench_result):
    """At 4 parts/s every part gets its result before the PLC's watchdog, the JSON carries rate, latency,
    stage and RSS figures, and they agree with each other and with the table."""
    rows = bench_result["rates"]
    low, high = rows[0], rows[2]
    assert low["rate"] == 4 and high["rate"] == 200
    check_low_rate(low, high)
    check_result_consistent(bench_result)
    for stage in ("roi", "infer", "segment"):
        assert low["stages"][stage]["p50_ms"] > 0
        assert low["stages"][stage]["p99_ms"] >= low["stages"][stage]["p50_ms"]
    assert low["peak_rss_mib"] > 0 and low["rss_mib"] > 0 and low["cpu_percent"] > 0
    # each verdict belongs to the frame it was given: the shipped model gets 22 of the 24 demo parts right
    # (a verdict paired with the wrong frame scores about 0.25). The simulator's own score by PartId only
    # agrees while no part was shed before its trigger (see service.bench), so it is checked only then.
    assert low["accuracy"] is not None and low["accuracy"] >= 0.75, low
    if not {"trigger_late", "camera_not_ready"} & set(low["not_inspected_reasons"]):
        assert low["plc_sim_accuracy"] is not None and low["plc_sim_accuracy"] >= 0.75, low


def test_bench_writes_its_frames_into_xdg_cache_home(bench_result):
    """The demo frames (and their BMP copies) went to the XDG_CACHE_HOME the fixture set, a temporary folder."""
    demo = bench_result["cache"] / "valve-inspect" / "demo"
    assert any(demo.glob("seed*/frames/*.png")) and any(demo.glob("seed*/frames-bmp/*.bmp")), demo


def _row(rate, produced, results, inspected, not_inspected=0, watchdog=0, overflow=0, reasons=None):
    r = {"rate": rate, "seconds": 3.0, "produced": produced, "results": results, "inspected": inspected,
         "watchdog_rejects": watchdog, "not_inspected": not_inspected, "overflow": overflow,
         "watchdog_rejects_seen": watchdog, "plc_missed_part_ids": 0,
         "not_inspected_reasons": reasons or ({"overload": not_inspected} if not_inspected else {}),
         "sustained_parts_per_s": inspected / 3.0, "latency_p50_ms": 50.0, "latency_p99_ms": 90.0,
         "stages": {s: {"p50_ms": 1.0, "p99_ms": 2.0} for s in ("roi", "infer", "segment")},
         "accuracy": 0.9, "peak_rss_mib": 500.0}
    r["falls_behind"] = bool(watchdog or overflow or not_inspected or inspected < KEEP_UP_FRACTION * produced)
    return r


def test_the_checks_hold_on_fast_and_slow_machines_and_catch_lost_parts():
    """The checks above, on made-up results: a fast machine (keeps up at 40/s too) and a slow one (sheds some
    parts at 4/s, NotInspected) both pass; a lost part at the low rate, a highest rate or table that disagrees
    with the rows, and figures that do not add up fail."""
    fast = {"rates": [_row(4, 12, 12, 12), _row(40, 120, 120, 120), _row(200, 300, 250, 150, 100, 50)]}
    fast["highest_sustained_rate"] = 40
    slow = {"rates": [_row(4, 12, 12, 9, 3), _row(40, 120, 120, 20, 100), _row(200, 300, 200, 10, 190, 100)]}
    slow["highest_sustained_rate"] = None
    for res in (fast, slow):
        check_result_consistent(res)
        check_low_rate(res["rates"][0], res["rates"][2])
    lost = _row(4, 12, 11, 11, watchdog=1)
    with pytest.raises(AssertionError):
        check_low_rate(lost, fast["rates"][2])
    with pytest.raises(AssertionError):
        check_result_consistent({**fast, "highest_sustained_rate": 4})
    bad = _row(4, 12, 12, 12)
    bad["not_inspected"] = 1  # figures that do not add up
    with pytest.raises(AssertionError):
        check_row_consistent(bad)
    liar = _row(4, 12, 12, 12)
    liar["falls_behind"] = True  # the rule says it kept up
    with pytest.raises(AssertionError):
        check_row_consistent(liar)


def test_rate_far_above_capacity_falls_behind(bench_result):
    """At 200 parts/s (above the PLC link's polling limit, 100 PartIds/s at poll_ms 10, on any machine) the line
    is reported as falling behind: watchdog rejects, overflow or too few results."""
    high = bench_result["rates"][2]
    assert high["rate"] == 200 and high["produced"] > 100
    assert high["falls_behind"]
    assert (high["watchdog_rejects"] > 0 or high["overflow"] > 0 or high["not_inspected"] > 0
            or high["inspected"] < 0.95 * high["produced"])
    assert "FALLS BEHIND" in format_table(bench_result["rates"])


def test_overload_degrades_gracefully_every_part_answered_in_time(bench_result):
    """At 40 parts/s (below the PLC link's polling limit) the line either keeps up or sheds load instead of
    collapsing: every part the link saw gets its result before the PLC's watchdog, and parts are still inspected
    (the shed ones are NotInspected at once: trigger_late, camera_not_ready, overflow or overload).

    A part period of 25 ms leaves the 10 ms poll little slack: on this shared 2-core machine a poll thread
    stalled for a part period now and then (CI 2026-12-01: one PartId of 108 overwritten before any poll read it;
    1 run in 3 alone, every run beside two trainings). Such a part is never announced, so never answered, and
    the PLC's watchdog rejects it, as docs/plc-interface.md specifies; the link counts it (plc_missed_part_ids,
    valve_inspect_plc_results_dropped_total{reason="part_id_missed"}). Those stay rare here."""
    mid = bench_result["rates"][1]
    assert mid["rate"] == 40 and mid["produced"] > 60
    assert mid["watchdog_rejects_seen"] == 0, mid
    assert mid["plc_missed_part_ids"] <= 0.05 * mid["produced"], mid
    assert mid["results"] + mid["plc_missed_part_ids"] == mid["produced"]
    assert mid["inspected"] > 0 and mid["sustained_parts_per_s"] > 0
    assert mid["inspected"] + mid["not_inspected"] == mid["results"]
    assert set(mid["not_inspected_reasons"]) <= ANSWERED_REASONS, mid


def test_bench_frames_are_bmp_copies_and_the_plot_is_written(bench_result):
    """The default replay uses BMP copies of the demo frames (no PNG decode in the emulator); --plot writes a PNG."""
    assert bench_result["frames"] == "bmp"
    plot = bench_result["plot"]
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bmp_frames_match_the_png_frames(tmp_path):
    """bmp_frames writes pixel-identical BMP copies once, reuses them, leaves no temporary file and writes again a
    copy cut short (by a killed process)."""
    import cv2
    import numpy as np

    from service.sim.demo import bmp_frames

    png_dir = tmp_path / "frames"
    png_dir.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)
    cv2.imwrite(str(png_dir / "000000.png"), img)
    out = bmp_frames(png_dir)
    bmp = out / "000000.bmp"
    assert np.array_equal(cv2.imread(str(bmp), cv2.IMREAD_UNCHANGED), img)
    mtime = bmp.stat().st_mtime_ns
    assert bmp_frames(png_dir) == out and bmp.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*.tmp"))
    bmp.write_bytes(bmp.read_bytes()[:100])
    assert bmp_frames(png_dir) == out and np.array_equal(cv2.imread(str(bmp), cv2.IMREAD_UNCHANGED), img)


def test_highest_sustained_and_rate_parsing():
    """The highest sustained rate ignores rates that fell behind; --rates rejects junk and non-positive rates."""
    rows = [{"rate": 4.0, "falls_behind": False}, {"rate": 8.0, "falls_behind": True},
            {"rate": 6.0, "falls_behind": False}]
    assert highest_sustained(rows) == 6.0
    assert highest_sustained(rows[1:2]) is None
    assert _rates("4, 8,12") == [4.0, 8.0, 12.0]
    for bad in ("x", "0", "-3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _rates(bad)


def test_bench_never_imports_torch():
    """Importing the bench (and so the daemon path it drives) does not import torch."""
    code = ("import sys, service.bench, service.app, service.infer, service.roi, service.segment, service.decide; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_bench_ui_serves_a_polling_client_during_the_window(tmp_path, monkeypatch, capsys):
    """--ui starts the live view on a free port and polls it once a second like an open tab: status and
    latest.jpg answered without errors, JPEGs encoded on the view's thread, every part still answered in time."""
    if not shipped_model().is_file():
        pytest.skip("no shipped model (service/data/model.onnx)")
    saved = structlog.get_config()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    try:
        rc = main(["--rates", "4", "--seconds", "3.5", "--warmup", "1", "--threads", "1", "--ui", "--json", str(out)])
    finally:
        structlog.configure(**saved)
    assert rc == 0
    result = json.loads(out.read_text())
    (row,) = result["rates"]
    check_row_consistent(row)
    assert result["ui"] is True and row["watchdog_rejects"] == 0, row
    ui = row["ui"]
    assert ui["errors"] == 0 and ui["status"]["requests"] >= 2 and ui["latest"]["requests"] >= 1, ui
    assert ui["jpeg_encodes"] >= ui["latest"]["requests"] and ui["bytes"] > 10_000, ui
    assert "live view at 4/s: status" in capsys.readouterr().out
