"""service.bench: the whole daemon path (emulator, in-process PLC simulator on a free 127.0.0.1 port, the shipped
model) at a low rate that the line keeps up with and at a rate far above its capacity."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import structlog

from service.bench import _rates, format_table, highest_sustained, main
from tests.service.daemon_fixtures import REPO_ROOT, clean_env, shipped_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory) -> dict:
    """One bench run: 4 parts/s and 200 parts/s, 3 s each after 1 s of warm-up."""
    if not shipped_model().is_file():
        pytest.skip("no shipped model (service/data/model.onnx)")
    saved = structlog.get_config()
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    try:
        rc = main(["--rates", "4,200", "--seconds", "3", "--warmup", "1", "--threads", "1", "--json", str(out)])
    finally:
        structlog.configure(**saved)
    assert rc == 0
    return json.loads(out.read_text())


def test_low_rate_is_sustained_with_figures(bench_result):
    """At 4 parts/s every part is inspected in time and the JSON carries rate, latency, stage and RSS figures."""
    low = bench_result["rates"][0]
    assert low["rate"] == 4
    assert low["produced"] > 0 and low["results"] == low["produced"]
    assert low["sustained_parts_per_s"] > 0
    assert low["watchdog_rejects"] == 0 and low["overflow"] == 0 and low["not_inspected"] == 0
    assert not low["falls_behind"]
    assert low["latency_p50_ms"] > 0 and low["latency_p99_ms"] >= low["latency_p50_ms"]
    for stage in ("roi", "infer", "segment"):
        assert low["stages"][stage]["p50_ms"] > 0
        assert low["stages"][stage]["p99_ms"] >= low["stages"][stage]["p50_ms"]
    assert low["peak_rss_mib"] > 0
    assert bench_result["highest_sustained_rate"] == 4


def test_rate_far_above_capacity_falls_behind(bench_result):
    """At 200 parts/s the line is reported as falling behind: watchdog rejects, overflow or too few results."""
    high = bench_result["rates"][1]
    assert high["rate"] == 200 and high["produced"] > 100
    assert high["falls_behind"]
    assert (high["watchdog_rejects"] > 0 or high["overflow"] > 0 or high["not_inspected"] > 0
            or high["inspected"] < 0.95 * high["produced"])
    assert "FALLS BEHIND" in format_table(bench_result["rates"])


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
