"""The daemon's configuration: one TOML file, validated by pydantic, overridden by the environment.

    load_config(path, env=None) -> Settings         (path None: the embedded demo defaults)
    valve-inspect check-config [FILE] [--format toml|json]

Precedence, highest first:

1. environment variables ``VALVE_INSPECT_<SECTION>__<KEY>`` (case-insensitive), e.g.
   ``VALVE_INSPECT_PLC__PORT=102``. Lists and tables take JSON:
   ``VALVE_INSPECT_MODEL__PROVIDERS='["CPUExecutionProvider"]'``,
   ``VALVE_INSPECT_CAMERA__FEATURES='{"ExposureTime": 5000.0}'`` (merged into the file's table).
   A whole section also takes JSON: ``VALVE_INSPECT_PLC='{"mode": "client", "host": "10.0.0.5"}'``.
2. the TOML file;
3. the defaults below. Without a file (``valve-inspect run`` with no ``--config``) they are the
   embedded demo line: emulator camera, simulated PLC, shipped demo model. **With a file, a real
   line is the default**: ``camera.source = "pylon"`` and ``plc.mode = "client"`` unless the file
   (or the environment) says otherwise, and ``plc.host`` must then be given.

Simulation is explicit (docs/operations.md, "Simulation"): a line whose camera is the emulator
and whose PLC is real, or the reverse, is refused unless ``[simulation] mix_with_real_hardware =
true`` says it is meant (commissioning); the daemon then warns every minute, sets the PLC status
bit ``Simulated`` and exports ``valve_inspect_simulation_mixed 1``.

Each component's parameters are built from its section by the component's own ``from_settings``
(``RoiParams.from_settings``, ``PlcLinkConfig.from_settings``), and ``load_config`` builds them
once while validating: a config that check-config accepts is one the daemon can construct.

Every unknown key is an error (a typo must not silently fall back to a default), in the file and
in ``VALVE_INSPECT_<SECTION>__...`` variables alike. Relative paths in the file are resolved
against the file's folder; relative paths from the environment against the working directory.

Choices documented here (the rest is in deploy/config.example.toml):

* ``plc.port = 0`` (the default) means "the usual port for the mode": 102 (ISO-on-TCP) for
  ``mode = "client"``, 1102 for ``mode = "simulated"`` (the in-process snap7 server must not need
  root to bind port 102).
* ``archive.dir = ""`` (the default) resolves to ``state_dir()/archive``: ``$STATE_DIRECTORY``
  (set by systemd's ``StateDirectory=valve-inspect``, i.e. /var/lib/valve-inspect) when running as
  the service, else ``$XDG_CACHE_HOME/valve-inspect`` (``~/.cache/valve-inspect``).
* ``metrics.port = 0`` binds a free port (tests); the daemon logs the port it got.
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from service.errors import ConfigError
from service.plc.layout import DB_RANGE, DEFAULT_DB, ISO_ON_TCP_PORT, RACK_RANGE, SIMULATOR_PORT, SLOT_RANGE
from service.roi import THRESHOLD_MAX, THRESHOLD_MIN

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "VALVE_INSPECT_"
ENV_DELIMITER = "__"

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


# ------------------------------------------------------------------------------------------- Settings

#: The environment mapping load_config() reads for the Settings being built (None: os.environ).
_ENV: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("valve_inspect_env", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading load_config()'s ``env`` mapping."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = _ENV.get()
        if env is None:
            return super()._load_env_vars()
        return parse_env_vars(dict(env), self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class Settings(BaseSettings):
    """The whole configuration. Build it with load_config(); every section is immutable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      case_sensitive=False, extra="forbid", frozen=True,
                                      validate_default=True)

    camera: CameraSettings = Field(default_factory=CameraSettings)
    roi: RoiSettings = Field(default_factory=RoiSettings)
    plc: PlcSettings = Field(default_factory=PlcSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    simulation: SimulationSettings = Field(default_factory=SimulationSettings)

    @property
    def simulated_parts(self) -> tuple[str, ...]:
        """Which parts of the line are simulators: a subset of ("camera", "plc")."""
        return tuple(name for name, sim in (("camera", self.camera.source == "emulator"),
                                            ("plc", self.plc.mode == "simulated")) if sim)

    @property
    def mixed_simulation(self) -> bool:
        """A simulator beside real hardware (allowed only by simulation.mix_with_real_hardware)."""
        return len(self.simulated_parts) == 1

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The environment wins over the file (passed in as init kwargs); no .env, no secrets dir.
        return (_MappingEnvSource(settings_cls), init_settings)

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if self.mixed_simulation and not self.simulation.mix_with_real_hardware:
            if self.camera.source == "emulator":
                what = ("the camera emulator (camera.source = 'emulator') would send verdicts of simulated frames "
                        "to a real PLC (plc.mode = 'client')")
            else:
                what = ("a real camera's verdicts (camera.source = 'pylon') would go to the simulated PLC "
                        "(plc.mode = 'simulated') and be lost")
            raise _field_error("simulation.mix_with_real_hardware",
                               f"false, but {what}. Fix: a real line sets camera.source = 'pylon' and plc.mode = "
                               "'client' (the defaults with a config file); a demo simulates both; only for "
                               "commissioning set [simulation] mix_with_real_hardware = true")
        if self.roi.roi_width > self.camera.width or self.roi.roi_height > self.camera.height:
            raise _field_error("roi.roi_width", f"the ROI ({self.roi.roi_width}x{self.roi.roi_height}) does not fit "
                                                f"in the camera frame ({self.camera.width}x{self.camera.height})")
        if (self.metrics.enabled and self.plc.mode == "simulated" and self.metrics.port == self.plc.port
                and self.metrics.port != 0):
            raise _field_error("metrics.port", f"{self.metrics.port} is also the simulated PLC's plc.port")
        if (self.ui.enabled and self.ui.port != 0
                and ((self.metrics.enabled and self.ui.port == self.metrics.port)
                     or (self.plc.mode == "simulated" and self.ui.port == self.plc.port))):
            raise _field_error("ui.port", f"{self.ui.port} is also metrics.port or the simulated PLC's plc.port")
        if self.plc.mode == "simulated" and self.pipeline.part_timeout_s >= self.plc.sim_watchdog_s:
            raise _field_error("pipeline.part_timeout_s",
                               f"{self.pipeline.part_timeout_s} s is not shorter than the simulated PLC's watchdog "
                               f"plc.sim_watchdog_s ({self.plc.sim_watchdog_s} s): a part that times out here "
                               "would be answered after the PLC has already rejected it; lower part_timeout_s")
        _build_component_params(self)
        return self


def _build_component_params(settings: Settings) -> None:
    """Build what the daemon builds from the settings, so that check-config and run agree by construction.

    Each component checks its own parameters (one definition per bound); a ValueError or ConfigError
    here becomes a validation error at the component's section.
    """
    from service.plc import PlcLinkConfig
    from service.roi import RoiParams

    for section, build in (("roi", lambda: RoiParams.from_settings(settings.roi)),
                           ("plc", lambda: PlcLinkConfig.from_settings(settings.plc))):
        try:
            build()
        except (ValueError, ConfigError) as exc:
            raise _field_error(section, str(exc)) from None


# ------------------------------------------------------------------------------------------- loading


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon keeps its archive and generated demo frames.

    ``$STATE_DIRECTORY`` (systemd ``StateDirectory=valve-inspect`` -> /var/lib/valve-inspect) when run as
    the service, else ``$XDG_CACHE_HOME/valve-inspect``, else ``~/.cache/valve-inspect``.
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])
    cache = env.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "valve-inspect"


_PATH_KEYS = (("camera", "images"), ("camera", "pfs_file"), ("model", "path"), ("archive", "dir"))


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's folder."""
    for section, key in _PATH_KEYS:
        sect = data.get(section)
        if isinstance(sect, dict) and isinstance(sect.get(key), str) and sect[key].strip():
            p = Path(os.path.expanduser(sect[key].strip()))
            if not p.is_absolute():
                sect[key] = str(base / p)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass an existing TOML file; see "
                          "deploy/config.example.toml)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"line (\d+)", msg)
        where = ""
        if m:
            lineno = int(m.group(1))
            lines = text.splitlines()
            if 1 <= lineno <= len(lines):
                where = f"\n  line {lineno}: {lines[lineno - 1].strip()}"
        raise ConfigError(f"{path}: TOML syntax error: {msg}{where}") from None


def _env_name(loc: tuple) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_at(loc: tuple) -> list[str]:
    """The valid key names of the model at ``loc`` (for 'did you mean')."""
    model: Any = Settings
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any], env_upper: set[str]) -> tuple[str, str]:
    loc = tuple(err.get("loc", ()))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        parent, name = loc[:-1], str(loc[-1])
        valid = _fields_at(parent)
        if parent == ("camera", "features"):
            valid = []
        hint = difflib.get_close_matches(name, valid, n=1)
        msg = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
        if valid:
            msg += f" (valid keys: {', '.join(valid)})"
    else:
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Validators name the key first ("reconnect_min_s: must be ..."): fold it into the path.
        m = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg, re.S)
        if m:
            sub, msg = m.group(1), m.group(2)
            last = str(loc[-1]) if loc else ""
            if last and (sub == last or sub.startswith((last + ".", last + "["))):
                sub = sub[len(last):]  # a field validator names its own field: don't repeat it
            sub = sub.lstrip(".")
            if sub:
                key = _key_path(loc) + (sub if sub.startswith("[") else ("." if loc else "") + sub)
                return key, msg + _env_note(loc + tuple(x for x in re.split(r"[.\[]", sub) if x and not x.endswith("]")),
                                          env_upper)
        elif "input" in err and isinstance(err["input"], (bool, int, float, str)) and len(repr(err["input"])) < 80:
            msg += f" (got {err['input']!r})"
    return _key_path(loc) or "(top level)", msg + _env_note(loc, env_upper)


def _env_note(loc: tuple, env_upper: set[str]) -> str:
    """' [from environment VALVE_INSPECT_...]' when the environment set this key (or its section)."""
    for n in range(len(loc), 0, -1):
        if _env_name(loc[:n]) in env_upper:
            return f" [from environment {_env_name(loc[:n])}]"
    return ""


def _check_env_sections(env: Mapping[str, str]) -> None:
    sections = list(Settings.model_fields)
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or ENV_DELIMITER not in upper[len(ENV_PREFIX):]:
            continue
        section = upper[len(ENV_PREFIX):].split(ENV_DELIMITER, 1)[0].lower()
        if section not in sections:
            hint = difflib.get_close_matches(section, sections, n=1)
            raise ConfigError(f"environment {name}: unknown section {section!r}"
                              + (f"; did you mean {ENV_PREFIX}{hint[0].upper()}{ENV_DELIMITER}...?" if hint else "")
                              + f" (sections: {', '.join(sections)})")


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and merge the configuration.

    Args:
        path: a TOML file, or None for the embedded demo defaults.
        env: the environment to take ``VALVE_INSPECT_*`` overrides (and $STATE_DIRECTORY,
            $XDG_CACHE_HOME) from; None = os.environ.
    Raises:
        ConfigError: naming the file, the offending key path and the reason. ``.problems`` holds
            the (key, reason) pairs.
    """
    env = dict(os.environ if env is None else env)
    source = "built-in defaults" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        data = _read_toml(p)
        _resolve_file_paths(data, p.resolve().parent)
        for name in Settings.model_fields:  # a missing section is validated as {} (errors then name it)
            if isinstance(data, dict) and name not in data:
                data[name] = {}
    _check_env_sections(env)
    token = _ENV.set(env)
    line_token = _LINE_FILE.set(path is not None)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        env_upper = {k.upper() for k in env}
        problems = [_describe(e, env_upper) for e in exc.errors(include_url=False)]
        lines = "\n".join(f"  {k}: {m}" for k, m in problems)
        err = ConfigError(f"invalid configuration in {source}:\n{lines}")
        err.problems = problems  # type: ignore[attr-defined]
        err.path = source  # type: ignore[attr-defined]
        raise err from None
    except SettingsError as exc:
        m = re.search(r'field "(\w+)"', str(exc))
        section = m.group(1) if m else ""
        names = sorted(k for k in env if section and k.upper().startswith(_env_name((section,))))
        raise ConfigError(f"invalid configuration in {source}: {', '.join(names) or 'environment'}: not valid "
                          f"JSON ({exc}); lists and tables in {ENV_PREFIX}* variables take JSON, e.g. "
                          f"{ENV_PREFIX}MODEL{ENV_DELIMITER}PROVIDERS='[\"CPUExecutionProvider\"]'") from None
    finally:
        _ENV.reset(token)
        _LINE_FILE.reset(line_token)
    if not settings.archive.dir:
        archive = settings.archive.model_copy(update={"dir": str(state_dir(env) / "archive")})
        settings = settings.model_copy(update={"archive": archive})
    return settings


# ---------------------------------------------------------------------------------------- TOML output

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


#: Keys check-config never prints: (section, key).
SECRET_KEYS = (("ui", "token"),)


def redacted(settings: Settings) -> dict[str, Any]:
    """settings.model_dump() with the secrets (SECRET_KEYS) replaced by "<hidden>" when set."""
    data = settings.model_dump()
    for section, key in SECRET_KEYS:
        if data[section][key]:
            data[section][key] = "<hidden>"
    return data


def to_toml(settings: Settings, redact: bool = False) -> str:
    """The settings as a TOML document that load_config() reads back to the same Settings (with ``redact``,
    secrets read "<hidden>")."""
    lines: list[str] = []
    for section, values in (redacted(settings) if redact else settings.model_dump()).items():
        lines.append(f"[{section}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``valve-inspect check-config [FILE] [--format toml|json]``: exit 0 valid, 2 invalid."""
    parser = argparse.ArgumentParser(
        prog="valve-inspect check-config",
        description="Validate a TOML config and print the effective settings (file + VALVE_INSPECT_* "
                    "environment). Exit 0 when valid, 2 with the offending key on stderr when not.")
    parser.add_argument("file", nargs="?", help="TOML config file (omitted: the embedded demo defaults)")
    parser.add_argument("--format", choices=("toml", "json"), default="toml", help="output format (default toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_config(args.file)
    except ConfigError as exc:
        print(f"valve-inspect check-config: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(redacted(settings), indent=2))
    else:
        origin = args.file or "built-in defaults"
        print(f"# effective configuration: {origin} + {ENV_PREFIX}* environment\n")
        print(to_toml(settings, redact=True), end="")
    return 0
