"""Fail-safe configuration: a file means a real line, simulation is explicit, and every config the
loader accepts is one the daemon can construct (check-config and run agree by construction)."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings, load_config, to_toml
from service.errors import ConfigError
from tests.helpers.daemon_fixtures import DB_NUMBER, LinePlc, clean_env, run_cli, write_toml

ENV = {"XDG_CACHE_HOME": "/var/cache/test"}
KEY = "simulation.mix_with_real_hardware"


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------- defaults


def test_a_config_file_means_a_real_line(tmp_path):
    """A file with only the PLC's address is a real line: the pylon camera and the S7 client, never the
    emulator or the simulator."""
    s = load_config(write(tmp_path, '[plc]\nhost = "192.168.0.10"\n'), env=ENV)
    assert (s.camera.source, s.plc.mode, s.plc.port) == ("pylon", "client", 102)
    assert s.simulated_parts == () and not s.mixed_simulation


def test_the_issue_case_a_client_plc_without_a_camera_section_never_starts_the_emulator(tmp_path):
    """[plc] mode = "client" and no [camera] section gives the real camera (it used to start the emulator
    and write its verdicts to the real PLC)."""
    s = load_config(write(tmp_path, '[plc]\nmode = "client"\nhost = "10.0.0.5"\n'), env=ENV)
    assert s.camera.source == "pylon"


def test_a_real_line_needs_the_plcs_address(tmp_path):
    """A file that does not name the PLC's address fails at plc.host with the fix, instead of connecting to
    a default address."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "[log]\nlevel = \"debug\"\n"), env=ENV)
    problems = dict(exc.value.problems)
    assert "plc.host" in problems and "192.168.0.1" in problems["plc.host"]


def test_the_embedded_demo_stays_all_simulated():
    """Without a file the demo simulates both camera and PLC (and is not a mixed line)."""
    s = load_config(None, env=ENV)
    assert s.simulated_parts == ("camera", "plc") and not s.mixed_simulation
    assert s.plc.host == "127.0.0.1"


# ------------------------------------------------------------------------------------------ mixing


MIXES = [
    ('[camera]\nsource = "emulator"\n[plc]\nmode = "client"\nhost = "10.0.0.5"\n', "camera emulator",
     "to a real PLC"),
    ('[camera]\nsource = "pylon"\n[plc]\nmode = "simulated"\n', "real camera", "simulated PLC"),
]


@pytest.mark.parametrize(("toml", "what", "where"), MIXES)
def test_a_simulator_beside_real_hardware_is_refused_naming_the_key(tmp_path, toml, what, where):
    """The emulator with a real PLC, or a real camera with the simulated PLC, fails at
    simulation.mix_with_real_hardware with what would happen and the fix."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, toml), env=ENV)
    msg = dict(exc.value.problems)[KEY]
    assert what in msg and where in msg and "camera.source = 'pylon'" in msg, msg


def test_a_mix_from_the_environment_is_refused_too():
    """The environment cannot sneak a simulator into a real line either."""
    env = {**ENV, "VALVE_INSPECT_PLC__MODE": "client", "VALVE_INSPECT_PLC__HOST": "10.0.0.5"}
    with pytest.raises(ConfigError, match=KEY):
        load_config(None, env=env)


@pytest.mark.parametrize(("toml", "what", "where"), MIXES)
def test_the_named_key_allows_a_mixed_line(tmp_path, toml, what, where):
    """[simulation] mix_with_real_hardware = true accepts the mix, and the settings say it is mixed."""
    s = load_config(write(tmp_path, toml + "[simulation]\nmix_with_real_hardware = true\n"), env=ENV)
    assert s.mixed_simulation and len(s.simulated_parts) == 1


def test_check_config_exits_2_on_a_mix(tmp_path):
    """check-config refuses the mixed file with exit code 2 and names the key."""
    proc = run_cli("check-config", str(write(tmp_path, MIXES[0][0])), env=clean_env())
    assert proc.returncode == 2 and KEY in proc.stderr, proc.stderr


def test_run_exits_2_on_a_mix_before_touching_the_line(tmp_path):
    """`run` with the emulator and a real PLC (a snap7 server here) exits 2 naming the key, and never
    connects to the PLC."""
    with LinePlc() as plc:
        cfg = write_toml(tmp_path / "mixed.toml", {
            "camera": {"source": "emulator"},
            "plc": {"mode": "client", "host": "127.0.0.1", "port": plc.port, "db": DB_NUMBER},
            "metrics": {"enabled": False}, "archive": {"enabled": False}})
        before = plc.snapshot()[8:]  # the vision -> PLC bytes (the PLC program moves its own heartbeat)
        proc = run_cli("run", "--config", str(cfg), "--duration", "5", env=clean_env(), timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert KEY in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert plc.clients_so_far() == 0  # no client ever connected (all the exited run's connections counted)
        assert plc.snapshot()[8:] == before and not plc.statuses and not plc.results


def test_run_exits_2_on_an_out_of_range_threshold_like_check_config(tmp_path):
    """[roi] threshold = 0 (which check-config used to accept and run crashed on with a traceback) is
    refused by both with exit code 2 and the key."""
    cfg = write(tmp_path, '[camera]\nsource = "emulator"\n[plc]\nmode = "simulated"\n[roi]\nthreshold = 0\n'
                          '[metrics]\nenabled = false\n')
    check = run_cli("check-config", str(cfg), env=clean_env())
    run = run_cli("run", "--config", str(cfg), "--duration", "5", env=clean_env(), timeout=60)
    for proc in (check, run):
        assert proc.returncode == 2, proc.stderr
        assert "roi.threshold" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- property: by construction

#: Values for the keys whose meaning is a path, a host or a name rather than a bounded number.
#: Weighted: mostly valid choices, so that many drawn configs pass the loader and reach construction.
SPECIAL: dict[tuple[str, str], st.SearchStrategy] = {
    ("camera", "images"): st.sampled_from([""] * 6 + ["/no/such/folder", "."]),
    ("camera", "pfs_file"): st.sampled_from([""] * 6 + ["/no/such.pfs"]),
    ("camera", "serial"): st.sampled_from(["", "12345678"]),
    ("camera", "features"): st.sampled_from([{}] * 4 + [{"ExposureTime": 5000.0}, {"Width": 10}, {"bad name": 1}]),
    ("camera", "width"): st.sampled_from([2448] * 4 + [768, 700, 1, 4096, 4097]),
    ("camera", "height"): st.sampled_from([2048] * 4 + [384, 300, 1, 4096, 0]),
    ("roi", "roi_width"): st.sampled_from([768] * 4 + [384, 192, 700, 4096]),
    ("roi", "roi_height"): st.sampled_from([384] * 4 + [192, 768, 100]),
    ("roi", "slice_size"): st.sampled_from([192] * 4 + [96, 64, 8, 7, 4096]),
    ("model", "path"): st.sampled_from([""] * 6 + ["/no/model.onnx"]),
    ("model", "providers"): st.sampled_from([["CPUExecutionProvider"]] * 3 + [
        ["CUDAExecutionProvider", "CPUExecutionProvider"], [], ["CPU"], ["CPUExecutionProvider"] * 2]),
    ("plc", "host"): st.sampled_from(["127.0.0.1"] * 4 + ["", "plc.local"]),
    ("archive", "dir"): st.sampled_from(["", "archive"]),
    ("metrics", "host"): st.sampled_from(["127.0.0.1"]),
    ("ui", "host"): st.sampled_from(["127.0.0.1"] * 3 + ["::1", "localhost", "0.0.0.0", "hmi.local"]),
    ("ui", "token"): st.sampled_from(["", "", "s3cret-token"]),
}


def _bounds(field) -> tuple[float | None, float | None, bool, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
    return lo, hi, lo_open, hi_open


def _number(kind: type, field) -> st.SearchStrategy:
    """Values inside the documented bounds (edges included), and a few just outside them."""
    lo, hi, lo_open, hi_open = _bounds(field)
    if kind is int:
        a = -5 if lo is None else int(lo) + (1 if lo_open else 0)
        b = 10_000 if hi is None else int(hi) - (1 if hi_open else 0)
        inside = st.one_of(st.integers(a, b), st.sampled_from([a, b]))
        outside = st.sampled_from([a - 1, b + 1])
    else:
        a = -5.0 if lo is None else float(lo)
        b = 10_000.0 if hi is None else float(hi)
        inside = st.one_of(st.floats(a, b, exclude_min=lo_open, exclude_max=hi_open, allow_nan=False),
                           st.sampled_from([x for x in (a, b) if not ((x == a and lo_open) or (x == b and hi_open))]
                                           or [(a + b) / 2]))
        outside = st.sampled_from([a - 1.0, b + 1.0, a] if lo_open else [a - 1.0, b + 1.0])
    return st.one_of(*[inside] * 12, outside)


def _strategy(section: str, name: str, field) -> st.SearchStrategy:
    if (section, name) in SPECIAL:
        return SPECIAL[(section, name)]
    ann = field.annotation
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):  # Literal[...] | None: the real choices, or omitted
        (inner,) = [a for a in typing.get_args(ann) if a is not type(None)]
        return st.one_of(st.none(), st.sampled_from(typing.get_args(inner)))
    if ann is bool and section == "simulation":  # mostly refused mixes, sometimes the explicit key
        return st.sampled_from([False, False, True])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(ann))
    if ann is bool:
        return st.booleans()
    if ann in (int, float):
        return _number(ann, field)
    if origin is tuple:  # (low, high) ranges: mostly ordered and positive
        x = st.floats(-10.0, 5000.0, allow_nan=False)
        return st.one_of(st.tuples(x, x).map(sorted), st.tuples(x, x).map(sorted), st.tuples(x, x).map(list))
    if origin is list:  # archive.save
        return st.lists(st.sampled_from(typing.get_args(typing.get_args(ann)[0])), max_size=4)
    if isinstance(ann, type) and hasattr(ann, "model_fields"):  # a nested table (model.thresholds)
        return _table(section, ann)
    raise AssertionError(f"no strategy for {section}.{name}: {ann!r}; add one to SPECIAL")


def _table(section: str, model) -> st.SearchStrategy:
    """A table with a random subset of the model's keys, each drawn from its documented bounds."""
    return st.fixed_dictionaries({}, optional={name: _strategy(section, name, f)
                                               for name, f in model.model_fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not None})


def _line(data: dict) -> st.SearchStrategy:
    return st.sampled_from([("emulator", "simulated")] * 3 + [("pylon", "client")] * 2 + [
        ("emulator", "client"), ("pylon", "simulated"), (None, None)])


def _with_line(data: dict, line: tuple[str | None, str | None]) -> dict:
    """Most drawn configs say which line they are (both simulated, or both real); some mix or leave it out."""
    source, mode = line
    if source is not None:
        data.setdefault("camera", {})["source"] = source
    if mode is not None:
        data.setdefault("plc", {})["mode"] = mode
    return data


CONFIGS = st.fixed_dictionaries({}, optional={name: _table(name, f.annotation)
                                              for name, f in Settings.model_fields.items()}).flatmap(
    lambda d: _line(d).map(lambda line: _with_line(d, line)))


def _build_components(s: Settings, tmp: Path) -> None:
    """What the daemon builds from the settings before it touches hardware (none of it connects)."""
    from service.app import Daemon
    from service.archive import RejectArchive
    from service.camera import Camera
    from service.decide import validate_thresholds
    from service.metrics import Metrics
    from service.plc import PlcLink, PlcLinkConfig
    from service.sim.plc_sim import PlcSimulator

    daemon = Daemon(s, metrics=Metrics())  # ROI parameters, the part book, the frame queue
    assert daemon.roi_params.n_slices == (s.roi.roi_width // s.roi.slice_size) * (s.roi.roi_height // s.roi.slice_size)
    PlcLink(PlcLinkConfig.from_settings(s.plc))
    Camera(s.camera, metrics=Metrics(), device_factory=lambda _s: None)
    if s.plc.mode == "simulated":
        PlcSimulator(host=s.plc.host, port=s.plc.port, db=s.plc.db, rate=s.plc.sim_rate_hz,
                     watchdog_s=s.plc.sim_watchdog_s)
    if s.archive.enabled:
        RejectArchive(tmp / "archive", s.archive.quota_mb * 2**20, labels=tuple(s.archive.save), start=False,
                      accept_every=s.archive.accept_every)
    if s.ui.enabled:  # everything but the socket
        from service.config import is_loopback
        from service.ui import LiveParts, LiveView

        LiveView(LiveParts(), dict, token=s.ui.token)
        assert s.ui.token or is_loopback(s.ui.host)
    validate_thresholds(s.model.thresholds.model_dump(), ("good", "dirt", "scratch", "ec"))
    assert math.isfinite(s.pipeline.part_timeout_s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=CONFIGS)
def test_every_config_is_rejected_by_the_loader_or_constructs(tmp_path, data):
    """Configs drawn across every section's documented bounds (edges and just outside) either fail in
    load_config with a ConfigError naming keys, or build every component the daemon builds without an
    exception: check-config and run agree by construction."""
    path = tmp_path / "drawn.toml"
    path.write_text(_dump(data))
    try:
        s = load_config(path, env={"XDG_CACHE_HOME": str(tmp_path)})
    except ConfigError as exc:
        assert exc.problems and all(k and m for k, m in exc.problems), str(exc)
        return
    _build_components(s, tmp_path)
    again = tmp_path / "again.toml"
    again.write_text(to_toml(s))
    assert load_config(again, env={"XDG_CACHE_HOME": str(tmp_path)}) == s  # what check-config prints runs too


def _dump(data: dict) -> str:
    from service.config import _toml_value

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def test_the_property_draws_both_outcomes(tmp_path):
    """The strategy is not degenerate: across draws, some configs are accepted and some refused."""
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, database=None)
    @given(data=CONFIGS)
    def probe(data):
        path = tmp_path / "p.toml"
        path.write_text(_dump(data))
        try:
            load_config(path, env={"XDG_CACHE_HOME": str(tmp_path)})
            outcomes["accepted"] += 1
        except ConfigError:
            outcomes["refused"] += 1

    probe()
    assert outcomes["accepted"] >= 15 and outcomes["refused"] >= 15, outcomes
