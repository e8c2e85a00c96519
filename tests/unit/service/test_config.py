"""service.config: TOML + pydantic validation, environment overrides, check-config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service import cli
from service.config import (
    PLC_CLIENT_PORT,
    PLC_SIMULATED_PORT,
    Settings,
    load_config,
    main,
    state_dir,
    to_toml,
    tomllib,  # tomllib, or tomli on Python 3.10
)
from service.errors import ConfigError
from tests.helpers import REPO_ROOT

EXAMPLE = REPO_ROOT / "deploy" / "config.example.toml"
ENV = {"XDG_CACHE_HOME": "/var/cache/test"}  # a fixed environment: no overrides, a known cache dir


def write(tmp_path: Path, text: str, name: str = "c.toml", demo: bool = True) -> Path:
    """Write a config file. With ``demo`` (the default) and neither camera.source nor plc.mode in the
    text, both are set to their simulators, so the file describes the demo line (a file's own
    defaults are a real line); a text that names either is written as it is."""
    path = tmp_path / name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        data = None
    if demo and data is not None and "source" not in data.get("camera", {}) and "mode" not in data.get("plc", {}):
        for section, line in (("camera", 'source = "emulator"'), ("plc", 'mode = "simulated"')):
            if f"[{section}]\n" in text:
                text = text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
            else:
                text += f"\n[{section}]\n{line}\n"
    path.write_text(text)
    return path


def problems(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return dict(exc.value.problems)


def flat_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("features",):
            keys |= flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


# ------------------------------------------------------------------------------------------- defaults


def test_no_file_gives_the_embedded_demo_defaults():
    """load_config(None) is the demo line: emulator, software trigger, simulated PLC on 1102, demo model."""
    s = load_config(None, env=ENV)
    assert s.camera.source == "emulator" and s.camera.trigger == "software"
    assert (s.camera.width, s.camera.height) == (2448, 2048)
    assert s.plc.mode == "simulated" and s.plc.port == PLC_SIMULATED_PORT
    assert s.model.path == "" and s.model.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.model.thresholds.model_dump() == {"dirt": 0.5, "scratch": 0.5, "ec": 0.5}
    assert s.pipeline.overflow == "not-inspected" and s.metrics.port == 9108
    assert s.archive.dir == "/var/cache/test/valve-inspect/archive"
    assert s.log.level == "info" and s.log.format == "auto"


def test_example_file_loads_lists_every_key_and_matches_the_defaults(tmp_path):
    """deploy/config.example.toml validates, names every key of Settings, and equals a file's defaults
    (a real line: a pylon camera and the S7 client) with only the PLC's address given."""
    s = load_config(EXAMPLE, env=ENV)
    assert s == load_config(write(tmp_path, '[plc]\nhost = "192.168.0.1"\n', demo=False), env=ENV)
    assert (s.camera.source, s.plc.mode, s.plc.port) == ("pylon", "client", PLC_CLIENT_PORT)
    raw = tomllib.loads(EXAMPLE.read_text())
    assert flat_keys(raw) == flat_keys(Settings().model_dump())


def test_settings_are_immutable():
    """A loaded configuration cannot be changed by accident at run time."""
    s = load_config(None, env=ENV)
    with pytest.raises(ValidationError):
        s.plc.port = 5


# ------------------------------------------------------------------------------------------ overrides


def test_environment_overrides_the_file(tmp_path):
    """VALVE_INSPECT_<SECTION>__<KEY> wins over the file's value; other file values stay."""
    path = write(tmp_path, '[plc]\nmode = "client"\nhost = "10.0.0.5"\nport = 2000\n[log]\nlevel = "debug"\n')
    s = load_config(path, env={**ENV, "VALVE_INSPECT_PLC__PORT": "3000", "valve_inspect_log__format": "console"})
    assert (s.plc.mode, s.plc.host, s.plc.port) == ("client", "10.0.0.5", 3000)
    assert (s.log.level, s.log.format) == ("debug", "console")


def test_environment_json_values_for_lists_and_tables(tmp_path):
    """Lists and tables come from JSON variables; a table is merged into the file's table."""
    path = write(tmp_path, "[camera]\nfeatures = { ExposureTime = 5000.0, GevSCPSPacketSize = 1500 }\n")
    env = {**ENV, "VALVE_INSPECT_MODEL__PROVIDERS": '["CPUExecutionProvider"]',
           "VALVE_INSPECT_CAMERA__FEATURES": '{"GevSCPSPacketSize": 8192}'}
    s = load_config(path, env=env)
    assert s.model.providers == ["CPUExecutionProvider"]
    assert s.camera.features == {"ExposureTime": 5000.0, "GevSCPSPacketSize": 8192}


def test_feature_values_keep_their_toml_types(tmp_path):
    """camera.features keeps bool, int, float and str values as written (applied by node type)."""
    path = write(tmp_path, '[camera]\nfeatures = { A = true, B = 3, C = 2.5, D = "Off" }\n')
    feats = load_config(path, env=ENV).camera.features
    assert [type(v) for v in feats.values()] == [bool, int, float, str]


def test_plc_port_zero_means_the_usual_port_for_the_mode():
    """plc.port = 0 (the default) is 102 for a real PLC and 1102 for the simulator; an explicit port stays."""
    real = {**ENV, "VALVE_INSPECT_PLC__MODE": "client", "VALVE_INSPECT_PLC__HOST": "10.0.0.5",
            "VALVE_INSPECT_CAMERA__SOURCE": "pylon"}
    assert load_config(None, env=real).plc.port == PLC_CLIENT_PORT
    assert load_config(None, env=ENV).plc.port == PLC_SIMULATED_PORT
    assert load_config(None, env={**ENV, "VALVE_INSPECT_PLC__PORT": "4102"}).plc.port == 4102


def test_archive_dir_defaults_to_the_state_or_cache_dir():
    """archive.dir "" is $STATE_DIRECTORY/archive under systemd, else $XDG_CACHE_HOME/valve-inspect/archive."""
    assert load_config(None, env={"STATE_DIRECTORY": "/var/lib/valve-inspect"}).archive.dir == \
        "/var/lib/valve-inspect/archive"
    assert state_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/valve-inspect")
    assert state_dir({"HOME": "/h"}).name == "valve-inspect"


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """A relative path in the file resolves against the file's folder, not the working directory."""
    (tmp_path / "frames").mkdir()
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[camera]\nimages = "../frames"\n[archive]\ndir = "arch"\n')
    monkeypatch.chdir("/")
    s = load_config(path, env=ENV)
    assert Path(s.camera.images).resolve() == (tmp_path / "frames").resolve()
    assert Path(s.archive.dir) == (tmp_path / "etc" / "arch").resolve()


# -------------------------------------------------------------------------------------------- errors


def test_unknown_key_is_an_error_that_suggests_the_right_one(tmp_path):
    """A misspelt key fails with its key path, a 'did you mean' and the file's name."""
    path = write(tmp_path, "[camera]\nwidht = 2448\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=ENV)
    assert str(path) in str(exc.value)
    assert "camera.widht: unknown key; did you mean 'width'?" in str(exc.value)


def test_unknown_section_is_an_error(tmp_path):
    """A misspelt section fails too, in the file and in an environment variable."""
    with pytest.raises(ConfigError, match=r"camra: unknown key"):
        load_config(write(tmp_path, "[camra]\nwidth = 1\n"), env=ENV)
    with pytest.raises(ConfigError, match=r"VALVE_INSPECT_CAMRA__WIDTH: unknown section 'camra'; did you mean"):
        load_config(None, env={**ENV, "VALVE_INSPECT_CAMRA__WIDTH": "5"})


def test_out_of_range_value_names_the_key_path_and_the_file(tmp_path):
    """plc.port = 70000 fails with 'plc.port: Input should be less than or equal to 65535' and the file."""
    path = write(tmp_path, "[plc]\nport = 70000\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=ENV)
    assert "plc.port: Input should be less than or equal to 65535" in str(exc.value)
    assert str(path) in str(exc.value)
    assert problems(exc)["plc.port"].startswith("Input should be less than or equal to 65535")


def test_bad_environment_value_names_the_variable():
    """An invalid value from the environment names the key and the variable it came from."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={**ENV, "VALVE_INSPECT_MODEL__THRESHOLDS__DIRT": "0"})
    assert "model.thresholds.dirt: Input should be greater than 0" in str(exc.value)
    assert "VALVE_INSPECT_MODEL__THRESHOLDS__DIRT" in str(exc.value)
    with pytest.raises(ConfigError, match="VALVE_INSPECT_MODEL__PROVIDERS: not valid JSON"):
        load_config(None, env={**ENV, "VALVE_INSPECT_MODEL__PROVIDERS": "CPUExecutionProvider"})


@pytest.mark.parametrize(("toml", "key", "words"), [
    ("[camera]\nreconnect_min_s = 20.0\n", "camera.reconnect_min_s", "must be <= reconnect_max_s"),
    ("[plc]\nreconnect_min_s = 20.0\nreconnect_max_s = 5.0\n", "plc.reconnect_min_s", "must be <= reconnect_max_s"),
    ('[plc]\nmode = "client"\nhost = ""\n', "plc.host", "needs the PLC's IP address"),
    ('[camera]\ntrigger = "hardware"\n', "camera.trigger", "the emulator has no trigger input"),
    ("[camera]\nimages = \"/no/such/folder\"\n", "camera.images", "does not exist"),
    ('[camera]\nsource = "pylon"\nimages = "."\n', "camera.images", "only used with source = 'emulator'"),
    ("[camera]\nfeatures = { Width = 100 }\n", "camera.features.Width", "set by the daemon from camera.width"),
    ("[roi]\nroi_width = 700\n", "roi.roi_width", "not a multiple of slice_size"),
    ("[roi]\nlength_range = [900, 600]\n", "roi.length_range", "0 < min < max"),
    ("[roi]\nthreshold = 255\n", "roi.threshold", "less than or equal to 254"),
    ("[roi]\nthreshold = 0\n", "roi.threshold", "greater than or equal to 1"),
    ("[camera]\nwidth = 700\n", "roi.roi_width", "does not fit in the camera frame"),
    ('[model]\nrequire_gpu = true\nproviders = ["CPUExecutionProvider"]\n', "model.require_gpu", "no GPU provider"),
    ('[model]\nproviders = ["CPU"]\n', "model.providers[0]", "not an ONNX Runtime provider name"),
    ("[model]\nthresholds = { dirt = 1.5 }\n", "model.thresholds.dirt", "less than or equal to 1"),
    ('[model]\npath = "/no/model.onnx"\n', "model.path", "is not a file"),
    ('[pipeline]\noverflow = "block"\n', "pipeline.overflow", "Input should be 'not-inspected'"),
    ('[archive]\nsave = ["reject", "rejected"]\n', "archive.save[1]", "Input should be"),
    ("[metrics]\nport = 1102\n", "metrics.port", "also the simulated PLC's plc.port"),
    ('[log]\nlevel = "loud"\n', "log.level", "Input should be 'debug'"),
    ("[pipeline]\npart_timeout_s = 0.5\ntrigger_window_ms = 500\n", "pipeline.trigger_window_ms",
     "must be shorter than part_timeout_s"),
    ("[pipeline]\npart_timeout_s = 2.5\n", "pipeline.part_timeout_s", "not shorter than the simulated PLC's watchdog"),
    ("[pipeline]\nworkers = 0\n", "pipeline.workers", "greater than or equal to 1"),
])
def test_invalid_values_and_combinations_name_the_key(tmp_path, toml, key, words):
    """Each invalid value or cross-field combination fails with the offending key path and the reason."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, toml), env=ENV)
    assert key in problems(exc), str(exc.value)
    assert words in problems(exc)[key], str(exc.value)


def test_toml_syntax_error_names_the_line(tmp_path):
    """A TOML syntax error fails with the file, the line number and the line's text."""
    path = write(tmp_path, '[plc]\nmode = "client"\nhost = 10.0.0.5\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=ENV)
    msg = str(exc.value)
    assert str(path) in msg and "TOML syntax error" in msg and "line 3" in msg and "host = 10.0.0.5" in msg


def test_missing_file_is_a_config_error(tmp_path):
    """A config path that does not exist fails with 'not found' and the path."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env=ENV)


def test_to_toml_round_trips(tmp_path):
    """The printed effective configuration loads back to the same Settings."""
    path = write(tmp_path, '[camera]\nfeatures = { ExposureTime = 5000.0, "Weird" = "x\\"y ü" }\n'
                           '[plc]\nmode = "client"\nhost = "plc.local"\n')
    s = load_config(path, env={**ENV, "VALVE_INSPECT_LOG__LEVEL": "warning"})
    again = load_config(write(tmp_path, to_toml(s), "again.toml"), env=ENV)
    assert again == s


# ------------------------------------------------------------------------------------- check-config


def test_check_config_prints_the_effective_config_with_env(tmp_path, monkeypatch, capsys):
    """check-config FILE --format json exits 0 and prints the file merged with the environment."""
    path = write(tmp_path, "[plc]\nport = 2000\n")
    monkeypatch.setenv("VALVE_INSPECT_PLC__DB", "42")
    assert cli.main(["check-config", str(path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plc"]["port"] == 2000 and out["plc"]["db"] == 42
    assert main([str(path)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["plc"]["db"] == 42


def test_check_config_invalid_file_exits_2_naming_the_key(tmp_path, capsys):
    """An invalid file exits 2 and stderr names the key and the reason."""
    assert main([str(write(tmp_path, "[plc]\nport = 70000\n"))]) == 2
    err = capsys.readouterr().err
    assert "plc.port: Input should be less than or equal to 65535" in err


def test_check_config_missing_file_and_syntax_error_exit_2(tmp_path, capsys):
    """A missing file and a TOML syntax error both exit 2 with the reason (and the line) on stderr."""
    assert main([str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(write(tmp_path, "[plc\n"))]) == 2
    assert "line 1" in capsys.readouterr().err


def test_check_config_console_script(tmp_path):
    """The installed `valve-inspect check-config` validates the example file in a fresh process."""
    exe = Path(sys.executable).with_name("valve-inspect")
    proc = subprocess.run([str(exe), "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[camera]" in proc.stdout
    bad = subprocess.run([str(exe), "check-config", str(write(tmp_path, "[camera]\nwidht = 1\n"))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "camera.widht" in bad.stderr


def test_require_gpu_accepts_every_gpu_provider_the_runtime_knows(tmp_path):
    """require_gpu validation and the inference session use one GPU provider list (ROCm passes, CPU-only fails)."""
    import ast

    import service.infer
    from service.config import GPU_PROVIDERS

    root = REPO_ROOT
    defined = [p.relative_to(root).as_posix() for p in sorted((root / "service").rglob("*.py"))
               for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(node, (ast.Assign, ast.AnnAssign))
               and "GPU_PROVIDERS" in [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                                       if isinstance(t, ast.Name)]]
    assert defined == ["service/config/sections.py"]  # one definition; service.infer imports it
    assert service.infer.GPU_PROVIDERS is GPU_PROVIDERS
    ok = write(tmp_path, '[model]\nrequire_gpu = true\nproviders = ["ROCMExecutionProvider", "CPUExecutionProvider"]\n',
               "rocm.toml")
    assert load_config(ok, env={}).model.require_gpu
    bad = write(tmp_path, '[model]\nrequire_gpu = true\nproviders = ["CPUExecutionProvider"]\n', "cpu.toml")
    with pytest.raises(ConfigError, match="model.require_gpu"):
        load_config(bad, env={})
