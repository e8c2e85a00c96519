"""valve-model's dispatcher and the model side's error tree (models.errors)."""

import sys
import types

import pytest

from models import cli
from models.errors import DataError, ValveModelError


def _command(monkeypatch, exc: Exception) -> None:
    """Register a command 'fake' whose main raises ``exc``."""
    def main(argv):
        raise exc

    monkeypatch.setitem(sys.modules, "fake_command", types.SimpleNamespace(main=main))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command:main", "raises"))


def test_a_model_error_that_escapes_a_command_is_a_message_and_exit_2(monkeypatch, capsys):
    """A ValveModelError out of a command prints 'valve-model <command>: error: <message>' and returns 2."""
    _command(monkeypatch, DataError("cannot read image x.png"))
    assert cli.main(["fake", "--opt"]) == 2
    assert capsys.readouterr().err == "valve-model fake: error: cannot read image x.png\n"


def test_an_escaping_error_keeps_its_own_exit_code(monkeypatch, capsys):
    """Export's ParityError (exit_code 1) escaping a command exits 1, its ExportError base exits 2."""
    from models.export import ExportError, ParityError

    _command(monkeypatch, ParityError("ONNX Runtime and torch disagree"))
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == "valve-model fake: error: ONNX Runtime and torch disagree\n"
    _command(monkeypatch, ExportError("no run"))
    assert cli.main(["fake"]) == 2


def test_other_exceptions_are_bugs_and_propagate(monkeypatch):
    """An exception outside the tree is not turned into a message."""
    _command(monkeypatch, KeyError("bug"))
    with pytest.raises(KeyError):
        cli.main(["fake"])


def test_the_model_side_errors_share_one_base_and_keep_their_builtin_bases():
    """Every model-side error is a ValveModelError and still what it was (ValueError, RuntimeError, ...)."""
    from models.build_dataset import UsageError
    from models.evaluate import EvalError
    from models.experiments.results.protocol import ResultsError
    from models.experiments.saliency_bench import BenchError
    from models.export import ExportError, ParityError
    from models.train import TrainError
    from models.unknown import UnknownError

    for cls, builtin in ((DataError, ValueError), (TrainError, ValueError), (EvalError, ValueError),
                         (ExportError, Exception), (ParityError, ExportError), (UsageError, Exception),
                         (BenchError, ValueError), (ResultsError, RuntimeError), (UnknownError, Exception)):
        assert issubclass(cls, ValveModelError) and issubclass(cls, builtin), cls
