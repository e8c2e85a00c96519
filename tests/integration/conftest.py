"""Fixtures for the integration tests (pytest finds them here; no imports needed); valve_image is in
tests/conftest.py.

The helpers behind them are tests.helpers.daemon_fixtures (render_line_frames, build_inspection_model,
LinePlc, running_daemon, ...).
"""

from __future__ import annotations

import pytest

from tests.helpers.daemon_fixtures import (
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
