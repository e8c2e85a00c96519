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

The package, in the order a config is read:

    sections.py   one pydantic model per TOML table, each checking its own keys; GPU_PROVIDERS, MANAGED_FEATURES
    settings.py   Settings: the sections together, the environment over the file, the checks across sections
    loading.py    load_config and state_dir: the file, its relative paths, the errors named by key path
    output.py     to_toml / redacted (the effective settings written out) and ``valve-inspect check-config``
"""

from __future__ import annotations

from service.config.loading import load_config, state_dir, tomllib
from service.config.output import SECRET_KEYS, _toml_value, main, redacted, to_toml
from service.config.sections import (
    GPU_PROVIDERS,
    LOOPBACK_HOSTS,
    MANAGED_FEATURES,
    PLC_CLIENT_PORT,
    PLC_SIMULATED_PORT,
    ArchiveKind,
    ArchiveSettings,
    CameraSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    PipelineSettings,
    PlcSettings,
    RoiSettings,
    SimulationSettings,
    Thresholds,
    UiSettings,
    is_loopback,
)
from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings
from service.errors import ConfigError

__all__ = [
    "ENV_DELIMITER", "ENV_PREFIX", "GPU_PROVIDERS", "LOOPBACK_HOSTS", "MANAGED_FEATURES", "PLC_CLIENT_PORT",
    "PLC_SIMULATED_PORT", "SECRET_KEYS", "ArchiveKind", "ArchiveSettings", "CameraSettings", "ConfigError",
    "LogSettings", "MetricsSettings", "ModelSettings", "PipelineSettings", "PlcSettings", "RoiSettings", "Settings",
    "SimulationSettings", "Thresholds", "UiSettings", "_toml_value", "is_loopback", "load_config", "main",
    "redacted", "state_dir", "to_toml", "tomllib",
]
