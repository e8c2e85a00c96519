# syntax=docker/dockerfile:1.7
# valve-inspect runtime image for the GPU box (docs/operations.md, "Docker").
#
#   docker build -t valve-inspect:0.1.0 .
#   docker compose -f deploy/docker-compose.yml up -d
#
# Runtime only: `pip install .` (never the [train] extra, never torch). The shipped model
# service/data/model.onnx + model.json must be in the build context; the build stops without them.
#
# onnxruntime-gpu and the CUDA base move together: onnxruntime-gpu 1.31.1 from PyPI is built with
# CUDA 13.0 and cuDNN 9 ("Require cuDNN 9.* and CUDA 13.*" when they are missing), so the runtime
# base is a CUDA 13.x image with cuDNN 9. CUDA 13 needs an NVIDIA driver >= 580 on the host. Changing
# ORT_VERSION means checking the CUDA major of that release (ORT's CUDA execution provider page,
# "Requirements") and changing CUDA_IMAGE with it.
#
# Python 3.11 comes from python-build-standalone, installed by uv into /opt/python; the application
# lives in the virtual environment /opt/venv. Both are built in the `build` stage on the same base
# image (same glibc) and copied into the runtime stage at the same paths.
#
# GigE Vision (Basler aca2440-20gm) and the S7 PLC: run the container with host networking
# (`network_mode: host`, deploy/docker-compose.yml). GigE Vision discovery is a UDP broadcast and the
# image stream is UDP from the camera to the host's NIC; NAT and bridge networks break both, and
# `--network host` also puts the metrics endpoint on the host's 127.0.0.1:9108. Socket buffers are
# kernel settings of the host and cannot be set from the container with host networking: set
# net.core.rmem_max/rmem_default (e.g. 16 MiB) and jumbo frames (MTU 9000) on the camera NIC of
# the host (docs/operations.md, "GigE camera network").

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ------------------------------------------------------------------------------------------ build
FROM ${CUDA_IMAGE} AS build

ARG PYTHON_VERSION=3.11
# Exact pin: the CUDA major of the base image depends on it (see the header).
ARG ORT_VERSION=1.31.1

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models

# The shipped model is part of the package (package-data service/data/*.onnx, *.json).
RUN if [ ! -s service/data/model.onnx ] || [ ! -s service/data/model.json ]; then \
      echo "service/data/model.onnx and model.json are missing from the build context:" \
           "export them first (valve-model export --run RUN --out service/data/model.onnx)" >&2; \
      exit 1; \
    fi

# Runtime dependencies only: no extras, so no torch.
RUN uv pip install --python /opt/venv/bin/python "onnxruntime-gpu==${ORT_VERSION}" .

# Build-time checks: no torch in the environment; the installed package holds the model, its
# sha256 matches model.json and it loads and warms up on the CPU provider (no GPU at build time).
RUN /opt/venv/bin/python -c "import importlib.util, sys; sys.exit('torch is installed' if importlib.util.find_spec('torch') else 0)" \
 && /opt/venv/bin/python -c "from service.infer import InferenceModel; m = InferenceModel(providers=('CPUExecutionProvider',)); print('model ok', m.sha256, m.preset)" \
 && /opt/venv/bin/valve-inspect check-config > /dev/null

# ---------------------------------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE} AS runtime

ARG APP_UID=10001

LABEL org.opencontainers.image.title="valve-inspect" \
      org.opencontainers.image.description="Inline fuel-injector valve inspection: pypylon -> ONNX IRA-CNN (onnxruntime-gpu) -> S7-1500" \
      org.opencontainers.image.version="0.1.0"

# A fixed, non-root UID (10001, not Ubuntu's 1000) so host folders can be chown'ed to it.
# The video group as in the systemd unit; GPU access itself comes from the NVIDIA container toolkit.
RUN groupadd --system --gid "${APP_UID}" valve-inspect \
 && useradd --system --uid "${APP_UID}" --gid valve-inspect --groups video \
      --home-dir /var/lib/valve-inspect --no-create-home --shell /usr/sbin/nologin valve-inspect \
 && install -d -o valve-inspect -g valve-inspect -m 0750 /var/lib/valve-inspect /var/cache/valve-inspect \
 && install -d -m 0755 /etc/valve-inspect

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

# The Docker HEALTHCHECK: GET /metrics on the address the daemon serves (config file, then
# VALVE_INSPECT_METRICS__* environment, as the daemon reads them); healthy when it answers and
# reports a loaded model (valve_inspect_model_info).
COPY --chmod=0755 <<'EOF' /usr/local/bin/valve-inspect-healthcheck
#!/opt/venv/bin/python
"""Exit 0 when the daemon's metrics endpoint answers with valve_inspect_model_info, else 1."""
import os
import sys
import tomllib
import urllib.request

path = os.environ.get("VALVE_INSPECT_CONFIG", "/etc/valve-inspect/config.toml")
section = {}
try:
    with open(path, "rb") as f:
        section = tomllib.load(f).get("metrics", {})
except (OSError, tomllib.TOMLDecodeError):
    pass
env = {k.upper(): v for k, v in os.environ.items()}
enabled = str(env.get("VALVE_INSPECT_METRICS__ENABLED", section.get("enabled", True))).lower()
host = str(env.get("VALVE_INSPECT_METRICS__HOST", section.get("host", "127.0.0.1")))
port = int(env.get("VALVE_INSPECT_METRICS__PORT", section.get("port", 9108)))
if enabled in ("false", "0", "no", "off") or port == 0:
    print("metrics endpoint disabled or on a random port: nothing to check")
    sys.exit(0)
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"
url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        body = response.read()
except OSError as exc:
    print(f"{url}: {exc}")
    sys.exit(1)
if b"valve_inspect_model_info{" not in body:
    print(f"{url}: no valve_inspect_model_info (model not loaded yet)")
    sys.exit(1)
print(f"{url}: ok")
EOF

# STATE_DIRECTORY plays systemd's StateDirectory=: archive.dir = "" resolves to
# /var/lib/valve-inspect/archive (a volume). XDG_CACHE_HOME: the demo's rendered frames.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/var/lib/valve-inspect \
    STATE_DIRECTORY=/var/lib/valve-inspect \
    XDG_CACHE_HOME=/var/cache

WORKDIR /var/lib/valve-inspect
USER ${APP_UID}:${APP_UID}

EXPOSE 9108 9109
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/valve-inspect-healthcheck"]

ENTRYPOINT ["valve-inspect"]
CMD ["run", "--config", "/etc/valve-inspect/config.toml"]
