"""Helpers the unit and integration tests share (plain modules, imported by name; fixtures are in conftest.py).

    daemon_fixtures   the line for ``valve-inspect run`` as a subprocess (LinePlc, running_daemon, ...) and
                      small helpers (write_toml, wait_until, clean_env, run_cli)
    daemon_doubles    test doubles for the daemon's camera, PLC link and model (FakeCamera, FakePlc, FakeModel)
                      and a Daemon wired with them (make_daemon)
    onnx_fixtures     small ONNX models that follow (or bend) the runtime's graph contract, without torch
    datasets          a tiny synthetic dataset in the ``folders`` format for the model side
"""

from pathlib import Path

#: The repository's root (tests/helpers/__init__.py is two folders below it).
REPO_ROOT = Path(__file__).resolve().parents[2]
