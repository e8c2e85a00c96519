"""The daemon's exceptions: what it recovers from and what stops it.

    ValveInspectError
    ├── RecoverableError            count, log, carry on (the part becomes NoPart/NotInspected)
    │   ├── CameraError             a grab failed, timed out, or the device went away: re-create
    │   │   ├── GrabTimeout
    │   │   ├── GrabFailed
    │   │   │   └── BadFrame    a frame of the wrong size or pixel format, or a truncated buffer
    │   │   └── CameraRemoved
    │   ├── PlcLinkError            the S7 connection dropped: reconnect with back-off
    │   └── NoPartError             the frame holds no inspectable valve: report NoPart
    │       ├── NoValveFound
    │       ├── ValveClipped
    │       └── ImplausibleRegion
    └── FatalError                  exit non-zero with a message that names the fix
        ├── ConfigError             invalid configuration (key and reason)
        ├── ModelError              model.onnx/model.json missing or inconsistent
        │   ├── ModelHashMismatch
        │   └── ModelContractError
        └── GpuRequiredError        require_gpu = true but ONNX Runtime fell back to the CPU
"""

from __future__ import annotations


class ValveInspectError(Exception):
    """Base of every error the daemon raises on purpose."""


class RecoverableError(ValveInspectError):
    """The daemon counts and logs these and keeps running."""


class CameraError(RecoverableError):
    pass


class GrabTimeout(CameraError):
    pass


class GrabFailed(CameraError):
    pass


class BadFrame(GrabFailed):
    """A buffer that arrived but is not the frame the daemon configured; ``reason`` names what is wrong."""

    REASONS = ("wrong_size", "wrong_pixel_format", "truncated")

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"BadFrame reason must be one of {self.REASONS}, not {reason!r}")
        super().__init__(message)
        self.reason = reason


class CameraRemoved(CameraError):
    pass


class PlcLinkError(RecoverableError):
    pass


class NoPartError(RecoverableError):
    """The frame holds no inspectable valve; ``reason`` is a short machine-readable tag."""

    reason = "no_part"


class NoValveFound(NoPartError):
    reason = "no_valve"


class ValveClipped(NoPartError):
    reason = "valve_clipped"


class ImplausibleRegion(NoPartError):
    reason = "implausible_region"


class FatalError(ValveInspectError):
    """The daemon stops with exit code 2 and this message."""

    exit_code = 2


class ConfigError(FatalError):
    pass


class ModelError(FatalError):
    pass


class ModelHashMismatch(ModelError):
    pass


class ModelContractError(ModelError):
    pass


class GpuRequiredError(FatalError):
    pass
