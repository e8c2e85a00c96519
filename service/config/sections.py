"""The configuration's sections, one pydantic model per TOML table ([camera], [roi], [plc], [model], [pipeline],
[metrics], [ui], [archive], [log], [simulation]), each checking its own keys, and the facts they check
against (GPU_PROVIDERS, MANAGED_FEATURES, the PLC's default ports). ``service.config.settings`` puts them
together; the package docstring (``service.config``) says how a file and the environment become them."""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.plc.layout import DB_RANGE, DEFAULT_DB, ISO_ON_TCP_PORT, RACK_RANGE, SIMULATOR_PORT, SLOT_RANGE
from service.roi import THRESHOLD_MAX, THRESHOLD_MIN

#: plc.port = 0 resolves to these (defined in service.plc.layout).
PLC_CLIENT_PORT = ISO_ON_TCP_PORT
PLC_SIMULATED_PORT = SIMULATOR_PORT

#: Camera nodes the [camera] section owns; setting them in camera.features would fight it.
MANAGED_FEATURES = {
    "Width": "camera.width",
    "Height": "camera.height",
    "PixelFormat": "camera.width/height (the daemon always grabs Mono8)",
    "TriggerSelector": "camera.trigger",
    "TriggerMode": "camera.trigger",
    "TriggerSource": "camera.trigger",
    "TestImageSelector": "camera.images",
    "ImageFileMode": "camera.images",
    "ImageFilename": "camera.images",
}

#: load_config() sets this while it validates a config *file*: then a real line is the default.
_LINE_FILE: contextvars.ContextVar[bool] = contextvars.ContextVar("valve_inspect_line_file", default=False)

_GENICAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: ONNX Runtime providers that run on a GPU, the one list for config validation and service.infer:
#: require_gpu accepts a session only when its first provider is one of these.
GPU_PROVIDERS = frozenset({
    "CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider",
    "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider",
})


def _field_error(key: str, message: str) -> ValueError:
    """A ValueError whose message starts with ``key:`` so the report can name the full key path."""
    return ValueError(f"{key}: {message}")


def _expand(value: str) -> str:
    return os.path.expanduser(value) if value else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)


# --------------------------------------------------------------------------------------------- camera


class CameraSettings(_Section):
    """[camera]: the Basler camera, or the pylon camera emulator replaying images."""

    source: Literal["emulator", "pylon"] | None = Field(
        None, description="default: 'pylon' with a config file, 'emulator' for the embedded demo")
    serial: str = ""
    images: str = ""
    trigger: Literal["software", "hardware", "free-run"] = "software"
    pfs_file: str = ""
    features: dict[str, bool | int | float | str] = Field(default_factory=dict)
    width: int = Field(2448, ge=1, le=4096)
    height: int = Field(2048, ge=1, le=4096)
    grab_timeout_ms: int = Field(2000, ge=10, le=60_000)
    reconnect_min_s: float = Field(0.5, gt=0, le=300)
    reconnect_max_s: float = Field(10.0, gt=0, le=3600)

    @field_validator("images", "pfs_file")
    @classmethod
    def _expand_paths(cls, v: str) -> str:
        return _expand(v.strip())

    @field_validator("features")
    @classmethod
    def _check_features(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _GENICAM_NAME.match(name):
                raise _field_error(f"features.{name}", "not a GenICam feature name (letters, digits, '_')")
            owner = MANAGED_FEATURES.get(name)
            if owner is not None:
                raise _field_error(f"features.{name}", f"set by the daemon from {owner}; remove it from features")
        return v

    @model_validator(mode="after")
    def _cross(self) -> CameraSettings:
        if self.source is None:  # frozen model: resolve the default once (a file means a real line)
            object.__setattr__(self, "source", "pylon" if _LINE_FILE.get() else "emulator")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise _field_error("reconnect_min_s", f"must be <= reconnect_max_s ({self.reconnect_min_s} > "
                                                  f"{self.reconnect_max_s})")
        if self.source == "pylon" and self.images:
            raise _field_error("images", "only used with source = 'emulator' (the camera emulator replaying "
                                         "images); set it to \"\" for a real camera, or set source = 'emulator'")
        if self.source == "emulator" and self.trigger == "hardware":
            raise _field_error("trigger", "'hardware' needs a real camera wired to Line1; the emulator has no "
                                          "trigger input: use 'software' or 'free-run'")
        if self.images and not Path(self.images).exists():
            raise _field_error("images", f"{self.images} does not exist (a PNG/TIFF/BMP file or a folder of "
                                         "them; \"\" = synthetic demo frames)")
        if self.pfs_file and not Path(self.pfs_file).is_file():
            raise _field_error("pfs_file", f"{self.pfs_file} is not a file (save one with pylon Viewer: "
                                           "File > Save Features)")
        return self


# ------------------------------------------------------------------------------------------------ roi


class RoiSettings(_Section):
    """[roi]: fixed-threshold binarisation, the valve's rotated bounding box, the ROI and its slices.

    ``service.roi.RoiParams.from_settings`` turns it into the ROI stage's parameters (the grid from
    the sizes); Settings builds them while validating, so both checks always agree.
    """

    threshold: int = Field(40, ge=THRESHOLD_MIN, le=THRESHOLD_MAX, description="pixels > threshold are the valve; 0 and 255 "
                                                           "would make every or no pixel the valve")
    roi_width: int = Field(768, ge=1, le=4096)
    roi_height: int = Field(384, ge=1, le=4096)
    slice_size: int = Field(192, ge=8, le=4096)
    length_range: tuple[float, float] = (600.0, 960.0)
    diameter_range: tuple[float, float] = (300.0, 480.0)
    max_angle_deg: float = Field(15.0, ge=0, le=45)
    min_fill: float = Field(0.85, gt=0, le=1)
    min_region_area: int = Field(5000, ge=1)
    border_margin: int = Field(2, ge=0, le=1024)

    @model_validator(mode="after")
    def _cross(self) -> RoiSettings:
        for key, size in (("roi_width", self.roi_width), ("roi_height", self.roi_height)):
            if size % self.slice_size:
                raise _field_error(key, f"{size} is not a multiple of slice_size ({self.slice_size})")
        for key, (lo, hi) in (("length_range", self.length_range), ("diameter_range", self.diameter_range)):
            if not 0 < lo < hi:
                raise _field_error(key, f"[{lo}, {hi}] must be two sizes in pixels with 0 < min < max")
        return self


# ------------------------------------------------------------------------------------------------ plc


class PlcSettings(_Section):
    """[plc]: the S7 link (``client``) or the in-process simulator (``simulated``)."""

    mode: Literal["simulated", "client"] | None = Field(
        None, description="default: 'client' with a config file, 'simulated' for the embedded demo")
    host: str = Field("", description="the PLC's address (required for client); simulated: 127.0.0.1")
    port: int = Field(0, ge=0, le=65535, description="0 = 102 for client, 1102 for simulated")
    rack: int = Field(0, ge=RACK_RANGE[0], le=RACK_RANGE[1])
    slot: int = Field(1, ge=SLOT_RANGE[0], le=SLOT_RANGE[1])
    db: int = Field(DEFAULT_DB, ge=DB_RANGE[0], le=DB_RANGE[1])
    poll_ms: int = Field(10, ge=1, le=10_000)
    heartbeat_timeout_s: float = Field(3.0, gt=0, le=600)
    reconnect_min_s: float = Field(0.5, gt=0, le=300)
    reconnect_max_s: float = Field(10.0, gt=0, le=3600)
    sim_rate_hz: float = Field(4.0, gt=0, le=1000)
    sim_watchdog_s: float = Field(2.0, gt=0, le=600)

    @field_validator("host")
    @classmethod
    def _strip_host(cls, v: str) -> str:
        return v.strip()

    @model_validator(mode="after")
    def _cross(self) -> PlcSettings:
        if self.mode is None:  # frozen model: resolve the default once (a file means a real line)
            object.__setattr__(self, "mode", "client" if _LINE_FILE.get() else "simulated")
        if self.mode == "simulated" and not self.host:
            object.__setattr__(self, "host", "127.0.0.1")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise _field_error("reconnect_min_s", f"must be <= reconnect_max_s ({self.reconnect_min_s} > "
                                                  f"{self.reconnect_max_s})")
        if self.mode == "client" and not self.host:
            raise _field_error("host", "mode = 'client' (a real PLC; the default with a config file) needs the "
                                       "PLC's IP address or host name, e.g. host = \"192.168.0.1\"; "
                                       "for the simulator set mode = 'simulated'")
        if self.heartbeat_timeout_s * 1000.0 <= self.poll_ms:
            raise _field_error("heartbeat_timeout_s", f"must be longer than poll_ms ({self.poll_ms} ms)")
        if self.port == 0:
            port = PLC_CLIENT_PORT if self.mode == "client" else PLC_SIMULATED_PORT
            object.__setattr__(self, "port", port)  # frozen model: resolve the "auto" port once
        return self


# ---------------------------------------------------------------------------------------------- model


class Thresholds(_Section):
    """Per-class probability thresholds: a slice is rejected for a class at or above its threshold."""

    dirt: float = Field(0.5, gt=0, le=1)
    scratch: float = Field(0.5, gt=0, le=1)
    ec: float = Field(0.5, gt=0, le=1)


class ModelSettings(_Section):
    """[model]: the ONNX model and ONNX Runtime's session."""

    path: str = ""
    providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                 min_length=1)
    require_gpu: bool = False
    intra_op_threads: int = Field(0, ge=0, le=256)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    #: the unknown-defect score's threshold (models.unknown); 0 = model.json's calibrated one. > 0 only for a
    #: model with the score (refused otherwise at start-up); a large value (e.g. 1e9) switches the check off.
    unknown_threshold: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: which anomalous slices are unknown (service.decide rule 7): "unexplained" = those no known class rejects
    #: (RejectUnknown stays the unexplained anomaly), "any" = all of them (RejectUnknown beside known defects too)
    unknown_rule: Literal["unexplained", "any"] = "unexplained"

    @field_validator("path")
    @classmethod
    def _expand_path(cls, v: str) -> str:
        return _expand(v.strip())

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not name.endswith("ExecutionProvider"):
                raise _field_error(f"providers[{i}]", f"{name!r} is not an ONNX Runtime provider name "
                                                      "(e.g. 'CUDAExecutionProvider', 'CPUExecutionProvider')")
        if len(set(v)) != len(v):
            raise _field_error("providers", "lists a provider twice")
        return v

    @model_validator(mode="after")
    def _cross(self) -> ModelSettings:
        if self.require_gpu and not any(p in GPU_PROVIDERS for p in self.providers):
            raise _field_error("require_gpu", "true, but providers lists no GPU provider "
                                              f"({', '.join(sorted(GPU_PROVIDERS))})")
        if self.path and not Path(self.path).is_file():
            raise _field_error("path", f"{self.path} is not a file (\"\" = the shipped demo model)")
        return self


# ------------------------------------------------------------------------------ pipeline, metrics, ...


class PipelineSettings(_Section):
    """[pipeline]: the bounded queue between grabbing and inference, the inspection workers, the deadlines.

    Under overload every part still gets its one result in time: a part whose software trigger could not
    fire within ``trigger_window_ms`` of its PartId, a frame that finds the queue full, and a frame whose
    part has already timed out are answered NotInspected at once (``trigger_late`` / ``camera_not_ready``,
    ``overflow``, ``timeout_*``) instead of being worked on late, so the parts that are inspected stay
    fresh and the rate that is inspected stays near capacity.
    """

    queue_size: int = Field(4, ge=1, le=64)
    overflow: Literal["not-inspected"] = "not-inspected"
    part_timeout_s: float = Field(1.0, gt=0, le=60)
    workers: int = Field(1, ge=1, le=16, description="inspection threads sharing one ONNX Runtime session")
    trigger_window_ms: int = Field(200, ge=1, le=60_000,
                                   description="software trigger: latest firing after the PartId, else "
                                               "NotInspected trigger_late (the part has left the camera)")

    @model_validator(mode="after")
    def _cross(self) -> PipelineSettings:
        if self.trigger_window_ms / 1000.0 >= self.part_timeout_s:
            raise _field_error("trigger_window_ms", f"must be shorter than part_timeout_s ({self.part_timeout_s} s): "
                                                    "a part needs time for its frame and inspection after the trigger")
        return self


class MetricsSettings(_Section):
    """[metrics]: the Prometheus endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="0 = any free port")


#: Hosts that only this machine can reach: the live view needs no token there.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


class UiSettings(_Section):
    """[ui]: the read-only live view (service/ui.py): the last part's ROI with saliency and masks, counts, health."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9109, ge=0, le=65535, description="0 = any free port")
    token: str = Field("", description="required (Authorization: Bearer <token> or ?token=) when host is not "
                                       "loopback; checked on every request whenever set")

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> UiSettings:
        if self.enabled and not self.token and not is_loopback(self.host):
            raise _field_error("token", f"is empty but host = {self.host!r} serves the live view beyond this "
                                        "machine. Fix: set [ui] token (or VALVE_INSPECT_UI__TOKEN) to a long random "
                                        "string, e.g. `openssl rand -hex 24`, or bind host = \"127.0.0.1\"")
        return self


ArchiveKind = Literal["accept", "reject", "no_part", "not_inspected"]


class ArchiveSettings(_Section):
    """[archive]: images of selected verdicts kept on disk, oldest deleted beyond the quota."""

    enabled: bool = True
    dir: str = ""
    quota_mb: int = Field(1024, ge=1, le=10_000_000)
    save: list[ArchiveKind] = Field(default_factory=lambda: ["reject", "not_inspected"])
    accept_every: int = Field(0, ge=0, le=1_000_000,
                              description="also keep every Nth accepted part (images for retraining); 0 = none")

    @field_validator("dir")
    @classmethod
    def _expand_dir(cls, v: str) -> str:
        return _expand(v.strip())

    @field_validator("save")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise _field_error("save", "lists a verdict twice")
        return v


class LogSettings(_Section):
    """[log]: structlog output on stdout (journald keeps it)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console at a terminal, json otherwise (journald, Docker)")

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


class SimulationSettings(_Section):
    """[simulation]: whether a simulator may share the line with real hardware (commissioning only)."""

    mix_with_real_hardware: bool = Field(
        False, description="allow the camera emulator with a real PLC, or a real camera with the simulated PLC")
    warn_interval_s: float = Field(60.0, ge=1, le=3600, description="how often a mixed line logs its warning")
