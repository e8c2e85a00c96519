"""Fixtures shared by tests/unit and tests/integration (pytest finds them here; no imports needed).

    tests/unit/          one process, test doubles, synthetic data (about 2 minutes on one core, service/ 20 s)
      service/  models/  the runtime's modules (no torch) and the model side's (torch)
    tests/integration/   the real things: the daemon as a subprocess, pylon's camera emulator, a Snap7 server,
                         promtool, systemd-analyze, chromium, the bench and the soak (fixtures: its conftest.py)
    tests/helpers/       plain modules both import (the line, ONNX toy models, a tiny dataset)

docs/testing.md says which file is where and why.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.sim.synth import render_part


@pytest.fixture(scope="module")
def valve_image() -> np.ndarray:
    """A rendered good valve (one per test module)."""
    image, _, _ = render_part(np.random.default_rng(5), "good")
    return image


# ------------------------------------------------------------------ no silent skips in CI

IN_CI = os.environ.get("CI", "").lower() == "true"
#: Skips CI may take, by a substring of their reason, each with why it is not a hole: none today. CI (.ci/run)
#: installs every tool and package the suite uses; anything else that skips there is a missing tool.
CI_EXPECTED_SKIPS: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure that names its reason, unless CI_EXPECTED_SKIPS explains it."""
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(key in reason for key in CI_EXPECTED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason}. CI must run every test: install what it needs in "
                       f".ci/run or the dev extra, or add the reason to CI_EXPECTED_SKIPS in tests/conftest.py "
                       f"with why it is not a hole")
