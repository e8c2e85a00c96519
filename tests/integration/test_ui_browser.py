"""The live view in a real browser: Debian's headless chromium loads the page served by the embedded demo
(``valve-inspect run``: the pylon camera emulator, the in-process snap7 PLC simulator, the shipped model)."""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers.daemon_fixtures import DaemonProcess, clean_env, wait_until

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900", "--virtual-time-budget=5000")


def chromium() -> str:
    """The chromium binary; under CI=true a missing one fails the test (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if IN_CI:
        pytest.fail("CI=true but chromium is missing: .ci/run must install Debian's chromium package")
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def browse(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "api/status", timeout=5) as r:
        return json.loads(r.read())


def test_live_view_in_a_real_browser(tmp_path):
    """The demo logs ui_serving with the page's URL; chromium renders the page with the last part's ROI overlay
    (a non-blank, coloured image where the picture goes), its verdict, the counts and the camera/PLC/provider
    health, and the DOM it ran its script on carries the same verdict as /api/status."""
    binary = chromium()
    env = clean_env(VALVE_INSPECT_UI__PORT="0", VALVE_INSPECT_METRICS__PORT="0",
                    XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    d = DaemonProcess(None, tmp_path, env, args=("--duration", "120", "--demo-parts", "8")).start()
    try:
        url = d.ui_url(timeout=90)
        assert url.startswith("http://127.0.0.1:")
        st = wait_until(lambda: (s := status(url))["image_part"] and s["rejects"] and s, 60, step=0.5)
        assert st, f"no inspected part with an image and a reject within 60 s\n{d.tail()}"
        assert st["camera_connected"] and st["plc_connected"] and st["provider"]
        shot = tmp_path / "live-view.png"
        run = browse(binary, url, tmp_path / "profile", f"--screenshot={shot}")
        assert shot.is_file(), run.stderr[-2000:]
        dom = browse(binary, url, tmp_path / "profile-dom", "--dump-dom").stdout
        after = status(url)
        # the embedded demo timed one inspection and runs its simulated line at a rate this machine keeps up with
        fitted = d.named("demo_rate") + d.named("demo_rate_lowered")
        started = d.named("plc_simulator_started")
        demo_line = d.named("demo_line")
    finally:
        d.kill()
    assert len(fitted) == 1 and fitted[0]["inspect_ms"] > 0 and 0.2 <= fitted[0]["rate_hz"] <= 4.0, fitted
    assert started and started[0]["rate_hz"] == fitted[0]["rate_hz"], started
    assert demo_line and demo_line[0]["frames"].endswith("frames-bmp"), demo_line  # replayed without a decode
    keep = os.environ.get("LIVE_VIEW_SCREENSHOT")  # a copy for a person to look at
    if keep:
        shutil.copyfile(shot, keep)

    # The DOM after the page's script ran: the verdict panel, the picture's source and the counts filled in.
    assert 'id="latest"' in dom and "api/parts/latest.jpg?part=" in dom, dom[-3000:]
    verdict = dom.split('id="verdict"', 1)[1].split("</p>", 1)[0]
    labels = {"ACCEPT", "REJECT", "NO PART", "NOT INSPECTED"}
    assert any(label in verdict for label in labels), verdict
    assert "waiting for the first part" not in verdict
    for word in ("connected", after["provider"], "not inspected", "api/parts/rejects/0.jpg"):
        assert word in dom, (word, dom[-4000:])

    # The screenshot: the picture's area (left column below the header) holds the overlay: not blank, with
    # colour (the saliency map) and the gray valve; the page's own background there would be one flat colour.
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img.shape[:2] == (900, 1280)
    view = img[60:580, 15:900]
    assert view.std() > 20, view.std()
    hsv = cv2.cvtColor(view, cv2.COLOR_BGR2HSV)
    coloured = ((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).mean()
    assert coloured > 0.001, coloured  # JET saliency (faint on a good part) and magenta masks
    gray_valve = ((hsv[..., 1] < 30) & (hsv[..., 2] > 120)).mean()
    assert gray_valve > 0.05, gray_valve
    text_panel = img[60:140, 915:1270]  # the verdict in large letters
    assert text_panel.std() > 10
    assert np.isfinite(view).all()
