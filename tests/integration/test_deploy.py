"""Deployment files checked against the code they deploy: Dockerfile, .dockerignore, docker-compose,
Prometheus scrape config and alerting rules, Grafana dashboard, the systemd unit, docs/operations.md.

Nothing here builds an image or needs a GPU or Docker. Optional tools make some checks stronger and
are skipped (with the reason) when absent: PyYAML (structure of the YAML files), promtool (rule and
config syntax, alert unit tests; Debian package ``prometheus``), systemd-analyze (``verify`` the unit).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.app import STOP_BUDGET_S
from service.config import MetricsSettings, Settings, UiSettings
from service.metrics import LATENCY_BUCKETS, Metrics
from tests.helpers import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO_ROOT / "deploy" / "prometheus" / "valve-inspect-rules.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "valve-inspect-dashboard.json"
UNIT = REPO_ROOT / "systemd" / "valve-inspect.service"
OPERATIONS = REPO_ROOT / "docs" / "operations.md"
CONFIG_PATH = "/etc/valve-inspect/config.toml"

try:
    import yaml
except ImportError:  # PyYAML is optional: structure checks skip, name checks still run
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed (add it to the dev extra)")
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
#: In CI (CI=true) a tool the project installs must be there: its tests fail instead of skipping.
IN_CI = os.environ.get("CI", "").lower() == "true"
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not IN_CI,
                                    reason="promtool not found (Debian package prometheus, or set "
                                           "PROMTOOL=/path/to/promtool)")


def promtool() -> str:
    """The promtool path; under CI=true a missing promtool fails the test (.ci/run installs it)."""
    if PROMTOOL is None:
        pytest.fail("CI=true but promtool is missing: .ci/run must unpack Debian's prometheus package")
    return PROMTOOL


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name the daemon's /metrics can show (a fresh registry, model info set)."""
    metrics = Metrics(CollectorRegistry())
    metrics.set_model_info("0" * 64, "CPUExecutionProvider", "compact")
    return {s.name for family in metrics.registry.collect() for s in family.samples}


# ------------------------------------------------------------------------------------------- PromQL

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "inf", "nan", "atan2"}
#: Series Prometheus itself produces for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL (or Grafana-templated PromQL) expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables ($__rate_interval, ${instance})
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in PROMQL_KEYWORDS:
            names.add(m.group(1))
    return names


def test_promql_metric_extraction_ignores_functions_labels_and_keywords():
    """promql_metrics finds the selected series and nothing else (functions, labels, durations, keywords)."""
    expr = ('sum without (verdict) (rate(foo_total{verdict="a b", x=~"$y"}[$__rate_interval])) / on (job) '
            'group_left bar offset 1d > 0.5 and histogram_quantile(0.99, sum by (le) (rate(baz_bucket[5m]))) '
            '> 1e3 unless up')
    assert promql_metrics(expr) == {"foo_total", "bar", "baz_bucket", "up"}


# --------------------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    cmd: str
    value: str
    heredocs: list[str] = field(default_factory=list)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]
    args: dict[str, str]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction:
        found = self.all(cmd)
        assert found, f"stage {self.name or self.base}: no {cmd}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and heredoc bodies collected (enough for this repo)."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line.rstrip()]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                i += 1
            if i >= len(lines):
                break
            parts.append(lines[i].rstrip())
            i += 1
        cmd, _, rest = " ".join(p.strip() for p in parts).partition(" ")
        heredocs = []
        for m in re.finditer(r"<<(-?)(['\"]?)([A-Za-z_]\w*)\2", rest):
            body = []
            while i < len(lines) and (lines[i].lstrip("\t") if m.group(1) else lines[i]) != m.group(3):
                body.append(lines[i])
                i += 1
            i += 1
            heredocs.append("\n".join(body) + "\n")
        out.append(Instruction(cmd.upper(), rest.strip(), heredocs))
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def _arg(value: str) -> tuple[str, str]:
    name, _, default = value.partition("=")
    return name.strip(), default.strip().strip('"')


def dockerfile_stages() -> list[Stage]:
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = substitute(ins.value, global_args).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else ""
            stages.append(Stage(words[0], name, [], {}))
        elif not stages:
            assert ins.cmd == "ARG", f"only ARG may come before the first FROM, got {ins.cmd}"
            k, v = _arg(ins.value)
            global_args[k] = v
        else:
            stage = stages[-1]
            if ins.cmd == "ARG":
                k, v = _arg(ins.value)
                stage.args[k] = v or global_args.get(k, "")
            stage.instructions.append(Instruction(ins.cmd, substitute(ins.value, stage.args), ins.heredocs))
    return stages


def exec_form(ins: Instruction) -> list[str]:
    value = ins.value
    if ins.cmd == "HEALTHCHECK":
        value = value[value.index("CMD") + 3:].strip()
    parsed = json.loads(value)  # raises for the shell form
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
    return parsed


def runtime_stage() -> Stage:
    return dockerfile_stages()[-1]


def build_stage() -> Stage:
    stages = dockerfile_stages()
    return next(s for s in stages if any(i.cmd == "RUN" and "pip install" in i.value for i in s.instructions))


CUDA_TAG = re.compile(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn(\d*)-runtime-ubuntu(\d+\.\d+)")


def test_dockerfile_is_multi_stage_on_a_cuda_cudnn_runtime_base():
    """The image is built in a build stage and runs from an NVIDIA CUDA runtime image with cuDNN."""
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime, build = stages[-1], build_stage()
    assert runtime is not build
    assert CUDA_TAG.fullmatch(runtime.base), runtime.base
    assert build.base == runtime.base, "build and runtime stages must share the base (same glibc for /opt/python)"
    copied = [i.value for i in runtime.all("COPY") if i.value.startswith("--from=")]
    assert any("/opt/venv" in c for c in copied) and any("/opt/python" in c for c in copied)


def test_dockerfile_pins_onnxruntime_gpu_inside_the_pyproject_range():
    """ORT_VERSION is an exact version that satisfies pyproject's onnxruntime-gpu requirement and is installed."""
    from packaging.requirements import Requirement

    build = build_stage()
    version = build.args.get("ORT_VERSION", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "onnxruntime-gpu")
    assert req.specifier.contains(version), f"{version} outside pyproject's {req}"
    assert any(f"onnxruntime-gpu=={version}" in i.value for i in build.all("RUN"))


def test_dockerfile_cuda_major_matches_the_onnxruntime_gpu_build():
    """The base image's CUDA major equals the CUDA major the pinned onnxruntime-gpu wheel was built with."""
    pinned = build_stage().args["ORT_VERSION"]
    try:
        installed = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if installed != pinned:
        pytest.skip(f"installed onnxruntime-gpu {installed} != Dockerfile's {pinned}: cannot read the pin's CUDA build")
    from onnxruntime.capi import build_and_package_info as info

    cuda_major = str(info.cuda_version).split(".")[0]
    m = CUDA_TAG.fullmatch(runtime_stage().base)
    assert m and m.group(1) == cuda_major, f"onnxruntime-gpu {pinned} is built for CUDA {info.cuda_version}"
    assert m.group(4) in ("", "9"), "onnxruntime-gpu's CUDA provider needs cuDNN 9"


def _install_commands(stage: Stage) -> list[list[str]]:
    found = []
    for ins in stage.all("RUN"):
        for m in re.finditer(r"\bpip\s+install\s+([^&;|]*)", ins.value):
            found.append([t.strip("'\"") for t in m.group(1).split() if not t.startswith("-")
                          and not t.startswith("/")])
    return found


def test_dockerfile_installs_the_runtime_only_without_torch():
    """The image installs the project (`.`) and onnxruntime-gpu, never torch or the train/dev extras."""
    stages = dockerfile_stages()
    installs = [cmd for s in stages for cmd in _install_commands(s)]
    assert installs, "no pip install found"
    tokens = [t for cmd in installs for t in cmd]
    assert "." in tokens
    assert not [t for t in tokens if "torch" in t.lower() or "[" in t], tokens
    copied = [i.value for s in stages for i in s.all("COPY") if not i.value.startswith("--from")]
    assert not [c for c in copied if re.search(r"(^|\s)tests\b", c)], copied


def test_dockerfile_runs_as_a_non_root_user():
    """The runtime stage ends with a USER that is neither root nor UID 0."""
    user = runtime_stage().last("USER").value
    name = user.split(":")[0]
    assert name not in ("root", "0", ""), user
    assert "$" not in user, f"unresolved USER {user}"


def test_dockerfile_entrypoint_cmd_expose_and_python_version():
    """ENTRYPOINT valve-inspect, CMD run --config <the unit's config>, EXPOSE of the default metrics and live-view
    ports."""
    runtime = runtime_stage()
    assert exec_form(runtime.last("ENTRYPOINT")) == ["valve-inspect"]
    assert exec_form(runtime.last("CMD")) == ["run", "--config", CONFIG_PATH]
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.value.split()}
    assert exposed == {str(MetricsSettings().port), str(UiSettings().port)} == {"9108", "9109"}
    assert build_stage().args.get("PYTHON_VERSION") == "3.11"
    assert runtime.last("STOPSIGNAL").value == "SIGTERM"


def test_dockerfile_healthcheck_probes_the_metrics_endpoint():
    """HEALTHCHECK runs (exec form) the script COPY'd from a heredoc, which fetches /metrics."""
    runtime = runtime_stage()
    check = runtime.last("HEALTHCHECK")
    argv = exec_form(check)
    assert re.search(r"--start-period=\d+s", check.value)
    script = healthcheck_script()
    assert argv[0].endswith("valve-inspect-healthcheck")
    assert "/metrics" in script and "valve_inspect_model_info" in script


def test_dockerfile_refuses_to_build_without_the_shipped_model():
    """The build checks service/data/model.onnx and model.json are present, and pyproject packages them."""
    runs = " ".join(i.value for i in build_stage().all("RUN"))
    assert "service/data/model.onnx" in runs and "service/data/model.json" in runs and "exit 1" in runs
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"data/*.onnx", "data/*.json"} <= set(package_data["service"])


def healthcheck_script() -> str:
    for ins in runtime_stage().all("COPY"):
        if ins.heredocs and "valve-inspect-healthcheck" in ins.value:
            return ins.heredocs[0]
    raise AssertionError("no COPY <<EOF ... valve-inspect-healthcheck in the runtime stage")


def _run_healthcheck(tmp_path: Path, config: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "healthcheck.py"
    script.write_text(healthcheck_script())
    cfg = tmp_path / "config.toml"
    cfg.write_text(config)
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VALVE_INSPECT_")}
    return subprocess.run([sys.executable, str(script)], env={**clean, "VALVE_INSPECT_CONFIG": str(cfg), **env},
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_script_is_healthy_only_while_metrics_report_a_model(tmp_path):
    """The health check exits 0 against a live endpoint with model info, 1 before the model or when it is down."""
    metrics = Metrics(CollectorRegistry())
    server = metrics.start_http("127.0.0.1", 0)
    try:
        config = f'[metrics]\nhost = "127.0.0.1"\nport = {server.port}\n'
        before = _run_healthcheck(tmp_path, config)
        assert before.returncode == 1 and "model not loaded" in before.stdout
        metrics.set_model_info("0" * 64, "CUDAExecutionProvider", "compact")
        ok = _run_healthcheck(tmp_path, config)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        wrong_port_in_file = _run_healthcheck(tmp_path, "[metrics]\nport = 1\n",
                                              VALVE_INSPECT_METRICS__PORT=str(server.port))
        assert wrong_port_in_file.returncode == 0, "the environment must win over the file, as in the daemon"
    finally:
        server.stop()
    down = _run_healthcheck(tmp_path, config)
    assert down.returncode == 1
    disabled = _run_healthcheck(tmp_path, "[metrics]\nenabled = false\n")
    assert disabled.returncode == 0


# ------------------------------------------------------------------------------------ .dockerignore


def _dockerignore_rx(pattern: str) -> re.Pattern[str]:
    p, out, i = pattern.strip().lstrip("/"), "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _dockerignore_rx(line[1:] if negate else line)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "venv/lib/python3.11/site.py", "service/__pycache__/app.cpython-311.pyc",
    ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.5/x", ".hypothesis/examples/x", "valve_inspect.egg-info/PKG-INFO",
    "runs/r1/checkpoint.safetensors", "runs/r1/model.onnx", "model.onnx", "out/frames/f0001.png", "cache/demo/x",
    "tests/integration/test_deploy.py", "tests/helpers/datasets.py", "data/train/good/x.png",
])
def test_dockerignore_excludes_venvs_caches_runs_and_tests(path):
    """Virtual environments, caches, VCS data, training runs, stray models, tests and data are not sent."""
    assert dockerignored(path), path


def test_dockerignore_keeps_everything_the_build_copies():
    """Every COPY source of the Dockerfile, the shipped model and the package sources stay in the context."""
    sources = []
    for stage in dockerfile_stages():
        for ins in stage.all("COPY"):
            if ins.value.startswith("--from") or ins.heredocs:
                continue
            words = [w for w in ins.value.split() if not w.startswith("--")]
            sources.extend(words[:-1])
    assert {"pyproject.toml", "README.md", "service", "models"} <= set(sources)
    keep = [*sources, "service/data/model.onnx", "service/data/model.json", "service/app.py", "service/sim/synth.py",
            "models/ira_cnn.py"]
    assert not [p for p in keep if dockerignored(p)]


# ------------------------------------------------------------------------------------------ compose


@needs_yaml
def test_compose_runs_the_daemon_with_gpu_host_network_volumes_and_restart():
    """The compose service reserves a GPU, uses host networking, mounts config and archive, restarts itself."""
    doc = load_yaml(COMPOSE)
    (name, svc), = doc["services"].items()
    assert svc["network_mode"] == "host"
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "/etc/valve-inspect:/etc/valve-inspect:ro" in svc["volumes"]
    archive = [v for v in svc["volumes"] if v.split(":")[1] == "/var/lib/valve-inspect"]
    assert archive and archive[0].split(":")[0] in {*doc.get("volumes", {}), "/var/lib/valve-inspect"}
    assert svc["command"] == exec_form(runtime_stage().last("CMD"))
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
    assert grace and int(grace.group(1)) > STOP_BUDGET_S
    assert "ports" not in svc, "ports are meaningless with network_mode: host"


# --------------------------------------------------------------------------------------- Prometheus


def test_prometheus_files_name_only_exported_metrics(exported):
    """Every valve_inspect_* name in the rules, scrape config and dashboard is one the daemon exports."""
    histograms = {n.removesuffix("_bucket") for n in exported if n.endswith("_bucket")}  # named in descriptions
    for path in (RULES, PROMETHEUS, DASHBOARD):
        used = set(re.findall(r"\bvalve_inspect_\w+", path.read_text(encoding="utf-8")))
        assert used or path == PROMETHEUS, path
        assert not used - exported - histograms, f"{path.name}: unknown metrics {sorted(used - exported)}"


REQUIRED_ALERTS = {
    "ValveInspectCameraDisconnected": "valve_inspect_camera_connected",
    "ValveInspectPlcDisconnected": "valve_inspect_plc_connected",
    "ValveInspectNotInspectedHigh": "valve_inspect_parts_total",
    "ValveInspectRejectRateSpike": "valve_inspect_parts_total",
    "ValveInspectPartLatencyHigh": "valve_inspect_part_latency_seconds_bucket",
    "ValveInspectNoParts": "valve_inspect_parts_total",
    "ValveInspectFramesDropped": "valve_inspect_frames_dropped_total",
    "ValveInspectModelOnCpu": "valve_inspect_model_info",
    "ValveInspectSimulationMixed": "valve_inspect_simulation_mixed",
    "ValveInspectUnknownDefects": "valve_inspect_defects_total",
}


def alert_rules() -> list[dict]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]


@needs_yaml
def test_alert_rules_are_complete_and_reference_known_metrics(exported):
    """Each alert has expr, severity, summary/description/runbook, selects only exported series, none missing."""
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        used = promql_metrics(rule["expr"])
        assert used and used <= exported | PROMETHEUS_SERIES, (rule["alert"], used - exported)
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0m")))
    by_name = {r["alert"]: r for r in rules}
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in by_name, f"missing alert {alert}"
        assert metric in promql_metrics(by_name[alert]["expr"]), alert
    assert "up" in promql_metrics(by_name["ValveInspectDown"]["expr"])


@needs_yaml
def test_latency_alert_threshold_is_100_ms_on_a_histogram_bucket_bound():
    """The p99 alert compares with 0.1 s, an exact bucket bound of the part-latency histogram."""
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "ValveInspectPartLatencyHigh")
    assert re.search(r"histogram_quantile\(\s*0\.99\s*,", expr) and re.search(r">\s*0\.1\s*$", expr.strip())
    assert 0.1 in LATENCY_BUCKETS


def test_cpu_fallback_alert_treats_every_gpu_provider_as_gpu():
    """ValveInspectModelOnCpu's provider regex matches every provider the runtime counts as GPU, not the CPU."""
    from service.config import GPU_PROVIDERS

    m = re.search(r'provider!~"([^"]+)"', RULES.read_text(encoding="utf-8"))
    assert m, "ValveInspectModelOnCpu must select provider!~\"<GPU providers>\""
    regex = re.compile(m.group(1))
    assert all(regex.fullmatch(p) for p in GPU_PROVIDERS), sorted(p for p in GPU_PROVIDERS if not regex.fullmatch(p))
    assert not regex.fullmatch("CPUExecutionProvider")


@needs_yaml
def test_prometheus_scrape_config_targets_the_metrics_endpoint():
    """The scrape example scrapes 127.0.0.1:<metrics port>/metrics, loads the rules and labels gpu_expected."""
    doc = load_yaml(PROMETHEUS)
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "valve-inspect"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"127.0.0.1:{MetricsSettings().port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert static["labels"]["gpu_expected"] in ("true", "false")
    assert [(PROMETHEUS.parent / f).resolve() for f in doc["rule_files"]] == [RULES.resolve()]


def test_runbook_links_point_at_sections_of_operations_md():
    """Every runbook annotation names docs/operations.md and a heading that exists there."""
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", OPERATIONS.read_text(), re.M)}
    links = re.findall(r"runbook:\s*(\S+)", RULES.read_text(encoding="utf-8"))
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        assert (REPO_ROOT / path).resolve() == OPERATIONS.resolve() and anchor in anchors, link


@needs_promtool
def test_promtool_accepts_the_rules_and_the_scrape_config():
    """promtool check rules / check config pass on the shipped files."""
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS)]):
        proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr


L = {"job": "valve-inspect", "instance": "a"}


def _series(name: str, values: str, **labels: str) -> dict:
    body = ", ".join(f'{k}="{v}"' for k, v in {**L, **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _parts(values: dict[str, str], **labels: str) -> list[dict]:
    return [_series("valve_inspect_parts_total", values.get(v, values.get("*", "0x100")), verdict=v, **labels)
            for v in ("accept", "reject", "no_part", "not_inspected")]


def _fires(alert: str, at: str, severity: str, *extra: dict[str, str]) -> dict:
    """An alert_rule_test: ``alert`` firing at ``at`` for instance a (plus the given label sets), or not at all."""
    label_sets = [dict(L)] if not extra else [{**L, **e} for e in extra]
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {**ls, "severity": severity}} for ls in label_sets]}


def _quiet(alert: str, at: str) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def _latency(seconds: float, **labels: str) -> list[dict]:
    """Histogram buckets of 4 parts per 15 s, every one taking ``seconds``."""
    return [_series("valve_inspect_part_latency_seconds_bucket", "0+4x60" if le >= seconds else "0x60",
                    le=str(le), **labels) for le in (*LATENCY_BUCKETS, float("inf"))]


def _promtool_tests() -> list[dict]:
    model = {"gpu_expected": "true", "provider": "CPUExecutionProvider", "sha256": "f" * 8, "preset": "compact"}
    short = {
        "interval": "15s",
        "input_series": [
            _series("up", "0x10"),
            _series("valve_inspect_camera_connected", "1 1 0x10"),
            _series("valve_inspect_plc_connected", "1 1 0x10"),
            _series("valve_inspect_frames_dropped_total", "0 0 0 1 1 1 1 1 1"),
            _series("valve_inspect_camera_failed_buffers_total", "0+1x40"),
            _series("valve_inspect_camera_grab_timeouts_total", "0+1x40"),
            _series("valve_inspect_camera_reconnects_total", "0+1x40"),
            _series("valve_inspect_plc_reconnects_total", "0+1x40"),
            _series("valve_inspect_simulation_mixed", "1x10"),
            _series("valve_inspect_simulation_mixed", "0x10", instance="b"),
            _series("valve_inspect_model_info", "1x10", **model),
            _series("valve_inspect_model_info", "1x10", **{**model, "instance": "b", "provider": "CUDAExecutionProvider"}),
            _series("valve_inspect_model_info", "1x10", **{**model, "instance": "c", "gpu_expected": "false"}),
        ],
        "alert_rule_test": [
            _fires("ValveInspectDown", "2m", "critical"),
            _quiet("ValveInspectCameraDisconnected", "40s"),
            _fires("ValveInspectCameraDisconnected", "2m", "critical"),
            _fires("ValveInspectPlcDisconnected", "2m", "critical"),
            _fires("ValveInspectFramesDropped", "2m", "warning"),
            _fires("ValveInspectCameraFailedBuffers", "5m", "warning"),
            _fires("ValveInspectCameraGrabTimeouts", "5m", "warning"),
            _fires("ValveInspectCameraFlapping", "5m", "warning"),
            _fires("ValveInspectPlcFlapping", "5m", "warning"),
            _fires("ValveInspectModelOnCpu", "2m", "warning", model),
            _fires("ValveInspectSimulationMixed", "1m", "critical"),  # instance a only: b is a real line
        ],
    }
    # instance a: 20 % NotInspected, slow parts (~150 ms); b: healthy, fast parts (~40 ms).
    ratios = {
        "interval": "15s",
        "input_series": [
            *_parts({"accept": "0+8x100", "not_inspected": "0+2x100"}),
            *_parts({"accept": "0+10x100"}, instance="b"),
            *_latency(0.15), *_latency(0.04, instance="b"),
        ],
        "alert_rule_test": [
            _fires("ValveInspectNotInspectedHigh", "16m", "warning"),
            _fires("ValveInspectNotInspectedCritical", "16m", "critical"),
            _fires("ValveInspectPartLatencyHigh", "10m", "warning"),
            _quiet("ValveInspectNoParts", "20m"),
        ],
    }
    # Parts for 20 min, then none. a: the PLC link stays up; b: the link is down (another alert covers it).
    idle = {
        "interval": "15s",
        "input_series": [
            *_parts({"*": "0+1x80 80x80"}), _series("valve_inspect_plc_connected", "1x160"),
            *_parts({"*": "0+1x80 80x80"}, instance="b"), _series("valve_inspect_plc_connected", "0x160", instance="b"),
        ],
        "alert_rule_test": [_quiet("ValveInspectNoParts", "30m"), _fires("ValveInspectNoParts", "36m", "warning")],
    }
    # One day at 1 % rejects, then 30 minutes at 20 %.
    day = 24 * 60
    spike = {
        "interval": "1m",
        "input_series": _parts({"accept": f"0+99x{day} {99 * day + 80}+80x29",
                                "reject": f"0+1x{day} {day + 20}+20x29", "*": f"0x{day + 30}"}),
        "alert_rule_test": [_quiet("ValveInspectRejectRateSpike", f"{day - 10}m"),
                            _fires("ValveInspectRejectRateSpike", f"{day + 30}m", "warning")],
    }
    # 30 minutes at 10 parts per 15 s: a, 1 in 10 RejectUnknown; b, 1 in 200 (the calibrated level).
    unknown = {
        "interval": "15s",
        "input_series": [
            *_parts({"accept": "0+9x200", "reject": "0+1x200"}),
            _series("valve_inspect_defects_total", "0+1x200", defect="unknown"),
            *_parts({"accept": "0+10x200", "reject": "0+0.05x200"}, instance="b"),
            _series("valve_inspect_defects_total", "0+0.05x200", defect="unknown", instance="b"),
        ],
        "alert_rule_test": [_quiet("ValveInspectUnknownDefects", "5m"),
                            _fires("ValveInspectUnknownDefects", "40m", "warning")],
    }
    return [short, ratios, idle, spike, unknown]


@needs_yaml
@needs_promtool
def test_promtool_unit_tests_fire_each_alert_on_synthetic_series(tmp_path):
    """Under promtool's rule unit tests every alert fires on a synthetic fault and stays quiet where it should."""
    doc = load_yaml(RULES)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations exactly; they are checked elsewhere
    (tmp_path / "rules.json").write_text(json.dumps(doc))
    for i, test in enumerate(_promtool_tests()):
        spec = {"rule_files": ["rules.json"], "evaluation_interval": test["interval"], "tests": [test]}
        (tmp_path / f"test{i}.json").write_text(json.dumps(spec))
    proc = subprocess.run([promtool(), "test", "rules", *sorted(p.name for p in tmp_path.glob("test*.json"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {t["alertname"] for test in _promtool_tests() for t in test["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}


# ------------------------------------------------------------------------------------------ Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs(doc: dict) -> list[str]:
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_json_and_queries_only_exported_metrics(exported):
    """Every panel query selects series the daemon exports; ids are unique; data sources use the variable."""
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    exprs = dashboard_exprs(doc)
    assert exprs
    for expr in exprs:
        used = promql_metrics(expr)
        assert used and used <= exported, (expr, used - exported)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert promql_metrics(re.sub(r"label_values\((\w+),.*\)", r"\1", variables["instance"]["definition"])) <= exported
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _panel(doc: dict, title_part: str) -> dict:
    (panel,) = [p for p in doc["panels"] if title_part.lower() in p["title"].lower()]
    return panel


def test_dashboard_has_the_operator_panels():
    """Parts/s by verdict, defects, reject rate, stage p50/p99, part p99 with the 100 ms line, links, drops, model."""
    doc = dashboard()

    def exprs(title: str) -> str:
        return " ".join(t["expr"] for t in _panel(doc, title)["targets"])

    assert "by (verdict)" in exprs("parts/s by verdict")
    assert "by (defect)" in exprs("defects")
    assert 'verdict=~"reject' in exprs("reject rate")
    for q, title in (("0.5", "stage latency p50"), ("0.99", "stage latency p99")):
        assert f"histogram_quantile({q}" in exprs(title) and "by (stage, le)" in exprs(title)
    latency = _panel(doc, "part latency p99")
    assert "histogram_quantile(0.99" in exprs("part latency p99")
    assert latency["fieldConfig"]["defaults"]["unit"] == "s"
    assert latency["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] in ("line", "line+area", "dashed")
    assert 0.1 in [s["value"] for s in latency["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    links = exprs("camera / plc connected")
    assert "valve_inspect_camera_connected" in links and "valve_inspect_plc_connected" in links
    assert "valve_inspect_frames_dropped_total" in exprs("frames dropped,")
    assert "{{provider}}" in [t["legendFormat"] for t in _panel(doc, "inference provider")["targets"]]
    assert "valve_inspect_model_info" in exprs("model")


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (Grafana variables replaced) as a recording rule."""
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard())):
        expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$instance", "a")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ systemd


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """The unit's sections as ordered (key, value) lists (keys may repeat, e.g. Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, raw
        current.append((key.strip(), value.strip()))
    return sections


def _seconds(value: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?", value):
        total += float(num) * {"ms": 0.001, "min": 60, "m": 60, "h": 3600}.get(unit, 1)
    return total


def test_systemd_unit_invariants():
    """Type=notify, a watchdog, Restart=on-failure, a stop timeout above the daemon's budget, run --config."""
    sections = unit_entries()
    service = dict(sections["Service"])
    assert service["Type"] == "notify"
    assert service.get("NotifyAccess", "main") in ("main", "all")
    assert _seconds(service["WatchdogSec"]) >= 5
    assert service["Restart"] == "on-failure"
    assert _seconds(service["TimeoutStopSec"]) >= 10 and _seconds(service["TimeoutStopSec"]) > STOP_BUDGET_S
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith("/valve-inspect") and exec_start[1:] == ["run", "--config", CONFIG_PATH]
    pre = [v.split() for k, v in sections["Service"] if k == "ExecStartPre"]
    assert [exec_start[0], "check-config", CONFIG_PATH] in pre
    assert service.get("User") not in (None, "root")
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """systemd-analyze verify reports nothing for the unit (ExecStart pointed at this venv's valve-inspect)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("CI=true but systemd-analyze is missing: .ci/run must install Debian's systemd package")
        pytest.skip("systemd-analyze not installed")
    exe = Path(sys.executable).parent / "valve-inspect"
    if not exe.is_file():
        pytest.skip(f"{exe} not found (package not installed in this environment)")
    text = UNIT.read_text(encoding="utf-8").replace("/opt/valve-inspect/.venv/bin/valve-inspect", str(exe))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if UNIT.name in ln]
    if proc.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze cannot run here: {(proc.stdout + proc.stderr).strip()[:200]}")
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------- operations


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_operations_doc_links_resolve_and_cover_config_alerts_and_metrics(exported):
    """docs/operations.md links only to existing files/sections and names every section, alert and metric."""
    text = OPERATIONS.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (OPERATIONS.parent / path).resolve().exists(), target
        else:
            assert anchor in anchors, target
    for section in Settings.model_fields:
        assert f"`[{section}]`" in text, section
    for alert in re.findall(r"alert:\s*(\w+)", RULES.read_text(encoding="utf-8")):
        assert f"`{alert}`" in text, alert
    bases = {re.sub(r"_(created|bucket|count|sum)$", "", n) for n in exported if not n.endswith("_created")}
    assert not [b for b in bases if b not in text], sorted(b for b in bases if b not in text)
