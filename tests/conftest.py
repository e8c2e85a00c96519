"""Fixtures shared by tests/unit and tests/integration (pytest finds them here; no imports needed).

    tests/unit/          one process, test doubles, synthetic data (about 2 minutes on one core, service/ 20 s)
      service/  models/  the runtime's modules (no torch) and the model side's (torch)
    tests/integration/   the real things: the daemon as a subprocess, pylon's camera emulator, a Snap7 server,
                         promtool, systemd-analyze, chromium, the bench and the soak (fixtures: its conftest.py)
    tests/helpers/       plain modules both import (the line, ONNX toy models, a tiny dataset)

docs/testing.md says which file is where and why.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.sim.synth import render_part


@pytest.fixture(scope="module")
def valve_image() -> np.ndarray:
    """A rendered good valve (one per test module)."""
    image, _, _ = render_part(np.random.default_rng(5), "good")
    return image
