"""The model side's errors: one base class, so that ``valve-model`` turns any of them into a message.

    ValveModelError                     a user error the command explains (data, options, a run); exit 2
    ├── DataError (ValueError)          here: the user's data (missing folder, empty class, unreadable file)
    ├── TrainError (ValueError)         models.train: the training's options or run directory
    ├── BenchError (ValueError)         models.experiments.saliency_bench: bad options, a missing run
    └── ResultsError (RuntimeError)     models.experiments.results: the doc's markers, a missing report

Each command still catches its own errors and says ``valve-model <command>: error: ...``; what escapes
a command is caught by ``models.cli`` (same message, exit 2), so a user error never ends in a
traceback. The runtime's errors are ``service.errors`` (``ValveInspectError``); the names differ on
purpose (``service.errors.ModelError`` is the daemon's "model.onnx is missing or inconsistent").
Each subclass keeps the built-in base it had (``ValueError``, ``RuntimeError``), so code that
caught those still does.
"""

from __future__ import annotations


class ValveModelError(Exception):
    """Base of every error the model side raises on purpose: ``valve-model`` prints it and exits 2."""


class DataError(ValveModelError, ValueError):
    """A problem with the user's data (missing folder, empty class, unreadable file, ...)."""
