"""Fixtures shared by the tests in tests/service (pytest finds them here; no imports needed).

The helpers behind them stay importable from their modules: tests.service.daemon_fixtures
(render_line_frames, build_inspection_model, LinePlc, running_daemon, ...) and tests.service.test_app
(the daemon's test doubles).
"""

from __future__ import annotations

import numpy as np
import pytest

from service.sim.synth import render_part
from tests.service.daemon_fixtures import (
    LineFrames,
    ModelUnderTest,
    build_inspection_model,
    render_line_frames,
)


@pytest.fixture(scope="session")
def line_frames(tmp_path_factory) -> LineFrames:
    """16 synthetic parts (4 good, 4 dirt, 4 scratch, 4 ec, shuffled), rendered once per session."""
    return render_line_frames(tmp_path_factory.mktemp("line"))


@pytest.fixture(scope="session")
def inspection_model(tmp_path_factory) -> ModelUnderTest:
    """The shipped demo model when present (trained), else an untrained compact model for plumbing tests."""
    return build_inspection_model(tmp_path_factory)


@pytest.fixture(scope="module")
def valve_image() -> np.ndarray:
    """A rendered good valve (one per test module)."""
    image, _, _ = render_part(np.random.default_rng(5), "good")
    return image
