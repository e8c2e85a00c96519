"""The model side's errors: one base class, so that ``valve-model`` turns any of them into a message.

    ValveModelError                     a user error the command explains (data, options, a run); exit 2
    ├── DataError (ValueError)          here: the user's data (missing folder, empty class, unreadable file)
    ├── TrainError (ValueError)         models.recipe: the training's options or run directory
    ├── EvalError (ValueError)          models.evaluate: the run, the options or the device
    ├── ExportError                     models.export: missing run, bad metrics path, unsupported opset
    │   └── ParityError                 ONNX Runtime and the torch reference disagree; exit 1 (exit_code)
    ├── UsageError                      models.build_dataset: the arguments or the folders
    ├── BenchError (ValueError)         models.experiments.saliency_bench: bad options, a missing run
    ├── UnknownError                    models.unknown: the fit/calibration frames, a model that has the score
    └── ResultsError (RuntimeError)     models.experiments.results: the doc's markers, a missing report

Each command still catches its own errors and says ``valve-model <command>: error: ...``; what escapes
a command is caught by ``models.cli`` (same message, exit 2, or the error's own ``exit_code``: export's
ParityError exits 1), so a user error never ends in a traceback. The runtime's errors are
``service.errors`` (``ValveInspectError``); the names differ on purpose (``service.errors.ModelError``
is the daemon's "model.onnx is missing or inconsistent"). Each subclass keeps the built-in base it had
(``ValueError``, ``RuntimeError``), so code that caught those still does.
"""

from __future__ import annotations


class ValveModelError(Exception):
    """Base of every error the model side raises on purpose: ``valve-model`` prints it and exits 2."""


class DataError(ValveModelError, ValueError):
    """A problem with the user's data (missing folder, empty class, unreadable file, ...)."""
