"""``Settings``: every section together, the ``VALVE_INSPECT_*`` environment over the file, the checks across
sections, and the components' own parameters built once while validating (check-config and run agree)."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from service.config.sections import (
    ArchiveSettings,
    CameraSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    PipelineSettings,
    PlcSettings,
    RoiSettings,
    SimulationSettings,
    UiSettings,
    _field_error,
)
from service.errors import ConfigError

ENV_PREFIX = "VALVE_INSPECT_"
ENV_DELIMITER = "__"

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
