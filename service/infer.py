"""ONNX Runtime inference: 8 slices in, class probabilities and Grad-CAM++ saliency out, one run per frame.

The graph contract (models/export.py writes it, this module checks it at start-up):

    input    slices    uint8   (B, 1, 192, 192), B dynamic; raw gray values, normalised inside the graph
    outputs  logits    float32 (B, K)
             probs     float32 (B, K)   softmax over the K classes
             saliency  float32 (B, 192, 192) in [0, 1], Grad-CAM++ for each slice's predicted class
    optional unknown   float32 (B,)     the unknown-defect score (models/unknown/); with it model.json
                                        carries "unknown": {"threshold": t > 0, ...} and without it must not

and beside model.onnx a model.json (models/export.py, format "valve-inspect/model/1") with at least
"classes" (K names in logit order), the segmented classes (the ones that get an Otsu mask: names in
"segmented" or "segmented_classes", or a bool list "segmented_mask"; all given must agree), "input"
({"name", "dtype", "shape"}), "outputs" (names, [{"name": ...}] or {name: ...}), "preset",
"attention", "opset" and "sha256" (of model.onnx). The runtime uses classes, the segmented classes,
input, outputs and sha256; preset, attention and opset are reported (a warning when missing); a
"format" other than "valve-inspect/model/1" is refused.

Start-up refuses to run a model that does not match (``ModelError`` and subclasses, all fatal):
a missing file, a sha256 that differs from model.json's, an input or output that differs from
the contract, K != len(classes), or a warm-up run whose outputs have the wrong shape or are not finite.

Execution providers come from the configuration, in order of preference. Names ONNX Runtime does
not know are a ``ConfigError``; known providers this build or machine does not offer are skipped
(logged). ``get_available_providers()`` lists what the wheel was built with (onnxruntime-gpu always
lists CUDA), not what can load, so a GPU provider is first probed the way ONNX Runtime loads it
(``provider_load_problem``: the NVIDIA driver and a visible device, cuDNN, the provider's shared
library with its CUDA dependencies); one that cannot load is skipped with the reason, instead of
ONNX Runtime printing its error and falling back. ONNX Runtime itself may still fall back to the CPU when a GPU provider fails to
initialise (missing CUDA libraries, no device), so the provider actually used is read back from
the session (``InferenceModel.provider``) and, with ``require_gpu=True``, a CPU session is refused
with ``GpuRequiredError``.

This module never imports torch or onnx (the runtime has neither).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.config import GPU_PROVIDERS
from service.errors import ConfigError, GpuRequiredError, ModelContractError, ModelError, ModelHashMismatch
from service.logs import get_logger
from service.records import Prediction

log = get_logger(__name__)

INPUT_NAME = "slices"
INPUT_DTYPE = "uint8"
SLICE_SHAPE = (1, 192, 192)
OUTPUT_NAMES = ("logits", "probs", "saliency")
#: the optional per-slice unknown-defect score (models/unknown/ attaches it; model.json "unknown" describes it)
UNKNOWN_OUTPUT = "unknown"
REQUIRED_JSON_KEYS = ("classes", "input", "outputs", "sha256")  # + one of SEGMENTED_KEYS
#: model.json may say which classes are segmented as names ("segmented", "segmented_classes") or as
#: a bool list over classes ("segmented_mask"); models/export.py writes the last two.
SEGMENTED_KEYS = ("segmented", "segmented_classes", "segmented_mask")
MODEL_FORMAT = "valve-inspect/model/1"  # model.json "format", when present
INFO_JSON_KEYS = ("preset", "attention", "opset")
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
SHIPPED_PACKAGE = "service"
SHIPPED_RELPATH = ("data", "model.onnx")

_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(int8)": "int8", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(uint16)": "uint16", "tensor(bfloat16)": "bfloat16"}

ProviderSpec = str | tuple[str, Mapping[str, Any]]


# ------------------------------------------------------------------------------------------ files


def shipped_model_path(check: bool = True) -> Path:
    """The model shipped inside the package, service/data/model.onnx (model.json beside it).

    Raises:
        ModelError: with ``check``, when the file is not there (names the fix).
    """
    path = Path(str(importlib.resources.files(SHIPPED_PACKAGE).joinpath(*SHIPPED_RELPATH)))
    if check and not path.is_file():
        raise ModelError(
            f"no shipped model at {path}: this installation has no service/data/model.onnx. "
            f"Fix: export one with `valve-model export --run RUN --out {path}` (it writes model.json "
            f"beside it) and reinstall the package, or set the model path in the configuration "
            f"to an exported model.onnx.")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def metadata_path(model_path: str | Path) -> Path:
    """model.onnx -> model.json (same directory, same stem)."""
    return Path(model_path).with_suffix(".json")


def load_metadata(model_path: str | Path) -> dict:
    """Read and check the model.json beside ``model_path``.

    Raises:
        ModelError: the file is missing or not a JSON object.
        ModelContractError: a required key is missing or malformed.
    """
    path = metadata_path(model_path)
    if not path.is_file():
        raise ModelError(f"model metadata {path} is missing (expected beside {Path(model_path).name}). "
                         f"Fix: copy the model.json written by `valve-model export` together with the .onnx; "
                         f"the two files belong together.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model metadata {path} cannot be read as JSON ({exc}). "
                         f"Fix: re-export the model (`valve-model export`) to rewrite it.") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"model metadata {path} is not a JSON object. Fix: re-export the model.")
    missing = [k for k in REQUIRED_JSON_KEYS if k not in meta]
    if missing:
        raise ModelContractError(f"model metadata {path} lacks the key(s) {', '.join(missing)}. "
                                 f"Fix: re-export with the current `valve-model export`.")
    for k in INFO_JSON_KEYS:
        if k not in meta:
            log.warning("model_json_key_missing", key=k, path=str(path))

    classes = meta["classes"]
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ModelContractError(f"model metadata {path}: 'classes' must be a list of at least 2 unique, "
                                 f"non-empty class names, got {classes!r}. Fix: re-export the model.")
    segmented_names(meta, where=str(path))  # raises when malformed
    fmt = meta.get("format")
    if fmt is not None and fmt != MODEL_FORMAT:
        raise ModelContractError(f"model metadata {path} has format {fmt!r}; this runtime reads {MODEL_FORMAT!r}. "
                                 f"Fix: export the model with the exporter of this release, or upgrade the runtime.")
    model_file = meta.get("model_file")
    if model_file is not None and model_file != Path(model_path).name:
        log.warning("model_json_file_name_differs", model_file=model_file, path=str(model_path),
                    note="renamed after export; the sha256 check decides whether the pair belongs together")
    unknown = meta.get("unknown")
    if unknown is not None:
        t = unknown.get("threshold") if isinstance(unknown, Mapping) else None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ModelContractError(f"model metadata {path}: 'unknown' must be an object with a 'threshold' > 0 "
                                     f"(the calibrated unknown-score threshold), got {unknown!r}. Fix: re-run "
                                     f"`valve-model unknown attach` to rewrite it.")
    sha = meta["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in sha):
        raise ModelContractError(f"model metadata {path}: 'sha256' must be 64 hex digits, got {sha!r}. "
                                 f"Fix: re-export the model.")
    return meta


def segmented_names(meta: Mapping[str, Any], where: str = "model.json") -> list[str]:
    """The segmented classes of a model.json, from whichever of SEGMENTED_KEYS it has (all must agree).

    Raises:
        ModelContractError: none given, malformed, naming unknown classes, or disagreeing.
    """
    classes = list(meta["classes"])
    found: dict[str, list[str]] = {}
    for key in ("segmented", "segmented_classes"):
        if key in meta:
            v = meta[key]
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise ModelContractError(f"{where}: {key!r} must be a list of class names, got {v!r}. "
                                         f"Fix: re-export the model.")
            unknown = [c for c in v if c not in classes]
            if unknown:
                raise ModelContractError(f"{where}: {key!r} names {unknown} that are not in 'classes' {classes}. "
                                         f"Fix: re-export the model.")
            found[key] = [c for c in classes if c in v]
    if "segmented_mask" in meta:
        v = meta["segmented_mask"]
        if not isinstance(v, list) or len(v) != len(classes) or not all(isinstance(b, bool) for b in v):
            raise ModelContractError(f"{where}: 'segmented_mask' must be {len(classes)} booleans (one per class), "
                                     f"got {v!r}. Fix: re-export the model.")
        found["segmented_mask"] = [c for c, b in zip(classes, v, strict=True) if b]
    if not found:
        raise ModelContractError(f"{where} does not say which classes are segmented (none of "
                                 f"{', '.join(SEGMENTED_KEYS)}). Fix: re-export with the current `valve-model export`.")
    values = list(found.values())
    if any(v != values[0] for v in values[1:]):
        raise ModelContractError(f"{where}: the segmented classes disagree: {found}. Fix: re-export the model.")
    return values[0]


def _json_output_names(outputs: Any) -> list[str]:
    """model.json "outputs" as a list of names; accepts ["logits", ...], [{"name": ...}, ...] or {"logits": {...}}."""
    if isinstance(outputs, Mapping):
        return [str(k) for k in outputs]
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        names = []
        for o in outputs:
            if isinstance(o, str):
                names.append(o)
            elif isinstance(o, Mapping) and "name" in o:
                names.append(str(o["name"]))
            else:
                raise ModelContractError(f"model.json 'outputs' entry {o!r} is neither a name nor an object "
                                         f"with a 'name'. Fix: re-export the model.")
        return names
    raise ModelContractError(f"model.json 'outputs' must be a list or an object, got {outputs!r}. "
                             f"Fix: re-export the model.")


# ---------------------------------------------------------------------------------- providers


#: Providers that live in their own shared library beside onnxruntime's, and need the CUDA driver.
_PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                       "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}
#: Loaded by ONNX Runtime at session creation, not a link-time dependency of the provider library.
_CUDNN_LIBRARY = "libcudnn.so.9"


def _load_library(name: str) -> ctypes.CDLL:
    """dlopen ``name`` (a path, or a name found on the loader's search path); raises OSError."""
    return ctypes.CDLL(name)


def _cuda_device_problem() -> str | None:
    """None when the NVIDIA driver loads and sees at least one device, else why not."""
    try:
        cuda = _load_library("libcuda.so.1")
    except OSError as exc:
        return f"no NVIDIA driver (libcuda.so.1 cannot be loaded: {exc})"
    rc = cuda.cuInit(0)
    if rc != 0:
        return f"the NVIDIA driver sees no usable GPU (cuInit returned CUDA error {rc})"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return f"the NVIDIA driver sees no GPU (cuDeviceGetCount: error {rc}, {count.value} devices)"
    return None


def provider_load_problem(name: str) -> str | None:
    """Why ONNX Runtime could not start provider ``name`` on this machine, or None when it can (as far as
    loading goes; other providers are not probed and return None).

    The same steps as ONNX Runtime's own loader, without its error output: the NVIDIA driver with a
    visible device, cuDNN 9, then the provider's shared library, whose loading resolves the CUDA
    libraries it links (cuBLAS, cuBLASLt, cuRAND, the CUDA runtime) on the same search path.
    """
    library = _PROVIDER_LIBRARIES.get(name)
    if library is None or not sys.platform.startswith("linux"):
        return None
    problem = _cuda_device_problem()
    if problem:
        return problem
    try:
        _load_library(_CUDNN_LIBRARY)
    except OSError as exc:
        return f"cuDNN 9 cannot be loaded ({exc})"
    path = Path(ort.__file__).parent / "capi" / library
    try:
        _load_library(str(path))
    except OSError as exc:
        return f"{library} cannot be loaded: {exc} (CUDA {_ort_cuda_version()} libraries missing?)"
    return None


def _ort_cuda_version() -> str:
    """The CUDA version this onnxruntime was built against, e.g. "13.0" ("?" when unknown)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return "?"
    return str(getattr(build_and_package_info, "cuda_version", "?") or "?")


def resolve_providers(requested: Sequence[ProviderSpec]) -> tuple[list[ProviderSpec], dict[str, str]]:
    """Config providers -> (the ones to ask ONNX Runtime for, in order; {skipped name: why}).

    Each entry is a provider name or (name, options). Names ONNX Runtime does not know at all
    are a ConfigError (a typo); known names this build does not offer, or whose libraries cannot
    load on this machine (``provider_load_problem``), are skipped. When nothing is left, the CPU
    provider is used (``require_gpu`` then refuses, if set).
    """
    if isinstance(requested, str) or not isinstance(requested, Sequence) or not requested:
        raise ConfigError(f"inference providers must be a non-empty list of ONNX Runtime provider names, "
                          f"got {requested!r}. Fix: e.g. providers = [\"CUDAExecutionProvider\", "
                          f"\"CPUExecutionProvider\"].")
    known = set(ort.get_all_providers())
    available = set(ort.get_available_providers())
    chosen: list[ProviderSpec] = []
    skipped: dict[str, str] = {}
    for spec in requested:
        if isinstance(spec, str):
            name = spec
        elif (isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[0], str)
              and isinstance(spec[1], Mapping)):
            name = spec[0]
            spec = (spec[0], dict(spec[1]))
        else:
            raise ConfigError(f"inference provider entry {spec!r} is neither a name nor [name, {{options}}]. "
                              f"Fix: use names such as \"CUDAExecutionProvider\".")
        if name not in known:
            raise ConfigError(f"unknown ONNX Runtime execution provider {name!r}. Fix: use one of "
                              f"{', '.join(sorted(known))} (available in this installation: "
                              f"{', '.join(ort.get_available_providers())}).")
        if any((c if isinstance(c, str) else c[0]) == name for c in chosen) or name in skipped:
            continue
        if name not in available:
            skipped[name] = f"not in this onnxruntime build ({ort.__version__})"
            continue
        problem = provider_load_problem(name)
        if problem:
            skipped[name] = problem
            continue
        chosen.append(spec)
    if skipped:
        log.info("inference_providers_skipped", skipped=skipped, available=sorted(available))
    if not chosen:
        log.warning("inference_providers_none_available", requested=[s if isinstance(s, str) else s[0]
                                                                      for s in requested],
                    fallback="CPUExecutionProvider")
        chosen = ["CPUExecutionProvider"]
    return chosen, skipped


def session_options(intra_op_num_threads: int = 0) -> ort.SessionOptions:
    """All graph optimisations, sequential execution, ``intra_op_num_threads`` (0 = ONNX Runtime's default)."""
    if isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int) \
            or intra_op_num_threads < 0:
        raise ConfigError(f"[model] intra_op_threads must be an integer >= 0 (0 = ONNX Runtime's default), "
                          f"got {intra_op_num_threads!r}.")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_num_threads
    return so


# -------------------------------------------------------------------------------------- model


class InferenceModel:
    """A checked ONNX Runtime session for the valve classifier; ``run`` does one frame's slices.

    Args:
        model_path: model.onnx (model.json beside it); None = the shipped model (``shipped_model_path``).
        providers: execution providers in order of preference (names, or (name, options)).
        require_gpu: refuse (GpuRequiredError) when the session runs on the CPU.
        intra_op_threads: SessionOptions.intra_op_num_threads ([model] intra_op_threads); 0 = ORT's default.
        warmup_slices: batch size of the warm-up run at load (the daemon's slices per frame); 0 = no warm-up.

    Raises:
        ModelError, ModelHashMismatch, ModelContractError, GpuRequiredError, ConfigError.
    """

    def __init__(self, model_path: str | Path | None = None, *,
                 providers: Sequence[ProviderSpec] = DEFAULT_PROVIDERS, require_gpu: bool = False,
                 intra_op_threads: int = 0, warmup_slices: int = 8) -> None:
        chosen, self.skipped_providers = resolve_providers(providers)  # config errors first, before any I/O
        so = session_options(intra_op_threads)
        path = shipped_model_path() if model_path is None else Path(model_path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist. Fix: point the configuration's model path at "
                             f"an exported model.onnx (`valve-model export --run RUN --out {path}`).")
        self.path = path
        self.meta = load_metadata(path)
        self.classes: tuple[str, ...] = tuple(self.meta["classes"])

        expected_sha = self.meta["sha256"].lower()
        actual_sha = sha256_file(path)
        if actual_sha != expected_sha:
            raise ModelHashMismatch(
                f"{path} has sha256 {actual_sha} but {metadata_path(path).name} says {expected_sha}: the "
                f"model and its metadata are not from the same export (or the file is damaged). Fix: copy "
                f"model.onnx and model.json from the same `valve-model export` run, or re-export both.")
        self.sha256 = actual_sha
        self._check_json_io()

        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}. Fix: re-export the model with "
                             f"`valve-model export`; check the onnxruntime version supports its opset "
                             f"{self.meta.get('opset')}.") from exc
        self._providers: tuple[str, ...] = tuple(self.session.get_providers())
        wanted = chosen[0] if isinstance(chosen[0], str) else chosen[0][0]
        if self.provider != wanted:
            log.warning("inference_provider_fallback", wanted=wanted, provider=self.provider,
                        hint="ONNX Runtime could not initialise the preferred provider (see its log above)")
            self.provider_reason = f"{wanted} failed to initialise in ONNX Runtime (see its log above)"
        elif self.skipped_providers:
            self.provider_reason = "; ".join(f"{n} skipped: {why}" for n, why in self.skipped_providers.items())
        else:
            self.provider_reason = "the first provider in [model] providers"
        log.info("inference_session", model=str(path), sha256=self.sha256, provider=self.provider,
                 reason=self.provider_reason, providers=list(self.providers),
                 requested=[p if isinstance(p, str) else p[0] for p in providers],
                 intra_op_threads=intra_op_threads, preset=self.preset)
        self._check_graph_io()
        if require_gpu and self.provider not in GPU_PROVIDERS:
            raise GpuRequiredError(
                f"require_gpu is set but ONNX Runtime runs {path.name} on {self.provider} (session providers "
                f"{list(self.providers)}; requested {[p if isinstance(p, str) else p[0] for p in providers]}; "
                f"available {ort.get_available_providers()}). Fix: install the CUDA/cuDNN libraries that "
                f"onnxruntime-gpu {ort.__version__} needs and check the GPU is visible (nvidia-smi), or set "
                f"require_gpu = false to run on the CPU.")

        self.warmup_ms = 0.0
        if warmup_slices:
            t0 = time.perf_counter()
            check_warmup_outputs(self.run(np.zeros((warmup_slices, *SLICE_SHAPE), dtype=np.uint8)))
            self.warmup_ms = (time.perf_counter() - t0) * 1e3
            log.info("inference_warmup", slices=warmup_slices, ms=round(self.warmup_ms, 2), provider=self.provider)

    # ------------------------------------------------------------------------------ metadata

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on (session.get_providers()[0])."""
        return self._providers[0]

    @property
    def providers(self) -> tuple[str, ...]:
        """All providers registered in the session, in priority order."""
        return self._providers

    @property
    def preset(self) -> str | None:
        return self.meta.get("preset")

    @property
    def attention(self) -> str | None:
        return self.meta.get("attention")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def segmented(self) -> np.ndarray:
        """(K,) bool over ``classes``: which classes get an Otsu mask."""
        names = set(segmented_names(self.meta))
        return np.array([c in names for c in self.classes], dtype=bool)

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def unknown_threshold(self) -> float | None:
        """model.json's calibrated unknown-score threshold; None when the model has no unknown score."""
        u = self.meta.get("unknown")
        return float(u["threshold"]) if u is not None else None

    @property
    def has_unknown(self) -> bool:
        """The graph has the optional ``unknown`` output (and model.json its threshold)."""
        return UNKNOWN_OUTPUT in self._output_names

    def describe(self) -> dict[str, Any]:
        """What the daemon logs and exposes about the loaded model."""
        return {"path": str(self.path), "sha256": self.sha256, "preset": self.preset, "attention": self.attention,
                "opset": self.meta.get("opset"), "classes": list(self.classes),
                "segmented": [c for c, s in zip(self.classes, self.segmented, strict=True) if s],
                "provider": self.provider, "providers": list(self.providers),
                "unknown_threshold": self.unknown_threshold, "warmup_ms": round(self.warmup_ms, 3)}

    # ------------------------------------------------------------------------------ checks

    def _check_json_io(self) -> None:
        """model.json's input/outputs against the contract."""
        inp = self.meta["input"]
        where = f"{metadata_path(self.path).name} 'input'"
        if not isinstance(inp, Mapping):
            raise ModelContractError(f"{where} must be an object with name, dtype and shape, got {inp!r}. "
                                     f"Fix: re-export the model.")
        if inp.get("name") != INPUT_NAME:
            raise ModelContractError(f"{where} name is {inp.get('name')!r}, the contract says {INPUT_NAME!r}. "
                                     f"Fix: export with the input named {INPUT_NAME!r}.")
        if inp.get("dtype") != INPUT_DTYPE:
            raise ModelContractError(f"{where} dtype is {inp.get('dtype')!r}, the contract says {INPUT_DTYPE!r} "
                                     f"(raw gray values, normalised inside the graph). Fix: re-export.")
        shape = inp.get("shape")
        if not isinstance(shape, Sequence) or len(shape) != 4 or list(shape[1:]) != list(SLICE_SHAPE):
            raise ModelContractError(f"{where} shape is {shape!r}, the contract says "
                                     f"[B, {', '.join(map(str, SLICE_SHAPE))}]. Fix: re-export.")
        names = _json_output_names(self.meta["outputs"])
        missing = [n for n in OUTPUT_NAMES if n not in names]
        if missing:
            raise ModelContractError(f"{metadata_path(self.path).name} 'outputs' {names} lacks {missing}; the "
                                     f"contract needs {list(OUTPUT_NAMES)}. Fix: re-export the model.")

    def _check_graph_io(self) -> None:
        """The graph's declared input and outputs against the contract and model.json."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelContractError(f"{self.path.name} has {len(inputs)} inputs "
                                     f"{[i.name for i in inputs]}; the contract is one input {INPUT_NAME!r}. "
                                     f"Fix: re-export the model.")
        inp = inputs[0]
        if inp.name != self.meta["input"]["name"]:
            raise ModelContractError(f"{self.path.name}'s input is named {inp.name!r} but model.json and the "
                                     f"contract say {self.meta['input']['name']!r}. Fix: re-export the model.")
        dtype = _ORT_TYPES.get(inp.type, inp.type)
        if dtype != INPUT_DTYPE:
            raise ModelContractError(f"{self.path.name}'s input {inp.name!r} is {dtype}, the contract says "
                                     f"{INPUT_DTYPE} (raw gray values; the graph normalises). Fix: export with a "
                                     f"uint8 input.")
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1:] != list(SLICE_SHAPE):
            raise ModelContractError(f"{self.path.name}'s input {inp.name!r} has shape {shape}, the contract says "
                                     f"[B, {', '.join(map(str, SLICE_SHAPE))}]. Fix: export for 192x192 "
                                     f"single-channel slices.")
        if isinstance(shape[0], int):
            raise ModelContractError(f"{self.path.name}'s input {inp.name!r} has a fixed batch of {shape[0]}; "
                                     f"the contract says a dynamic batch B. Fix: export with a dynamic "
                                     f"batch axis.")
        self._input_name = inp.name

        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in OUTPUT_NAMES if n not in outputs]
        if missing:
            raise ModelContractError(f"{self.path.name} lacks the output(s) {missing} (it has {list(outputs)}); "
                                     f"the contract needs {list(OUTPUT_NAMES)}. Fix: re-export the model.")
        k = self.num_classes
        for name, tail in (("logits", [k]), ("probs", [k]), ("saliency", list(SLICE_SHAPE[1:]))):
            o = outputs[name]
            dtype = _ORT_TYPES.get(o.type, o.type)
            if dtype != "float32":
                raise ModelContractError(f"{self.path.name}'s output {name!r} is {dtype}, the contract says "
                                         f"float32. Fix: re-export the model.")
            oshape = list(o.shape)
            if len(oshape) != 1 + len(tail) or any(isinstance(d, int) and d != t
                                                   for d, t in zip(oshape[1:], tail, strict=True)):
                what = f"K = {k} = len(classes) {list(self.classes)}" if name != "saliency" else "192x192 maps"
                raise ModelContractError(f"{self.path.name}'s output {name!r} has shape {oshape}, expected "
                                         f"[B, {', '.join(map(str, tail))}] ({what}). Fix: export the model "
                                         f"with the classes listed in model.json, or correct model.json.")
        self._output_names = list(OUTPUT_NAMES)
        json_names = _json_output_names(self.meta["outputs"])
        has_json = "unknown" in self.meta or UNKNOWN_OUTPUT in json_names
        if UNKNOWN_OUTPUT in outputs:
            o = outputs[UNKNOWN_OUTPUT]
            dtype = _ORT_TYPES.get(o.type, o.type)
            if dtype != "float32" or len(o.shape) != 1:
                raise ModelContractError(f"{self.path.name}'s output {UNKNOWN_OUTPUT!r} is {dtype} {list(o.shape)}, "
                                         f"the contract says float32 [B] (one score per slice). Fix: re-run "
                                         f"`valve-model unknown attach` on the exported model.")
            if "unknown" not in self.meta or UNKNOWN_OUTPUT not in json_names:
                raise ModelContractError(f"{self.path.name} has an {UNKNOWN_OUTPUT!r} output but "
                                         f"{metadata_path(self.path).name} does not describe it (its 'unknown' "
                                         f"section with the threshold, and the output in 'outputs'). Fix: use the "
                                         f"model.json written with this model.onnx by `valve-model unknown attach`.")
            self._output_names.append(UNKNOWN_OUTPUT)
        elif has_json:
            raise ModelContractError(f"{metadata_path(self.path).name} describes an unknown-defect score but "
                                     f"{self.path.name} has no {UNKNOWN_OUTPUT!r} output. Fix: copy model.onnx and "
                                     f"model.json from the same `valve-model unknown attach` run.")

    # ------------------------------------------------------------------------------ run

    def run(self, slices: np.ndarray) -> Prediction:
        """One frame's slices (N, 1, 192, 192) uint8 -> Prediction (float32, C-contiguous arrays).

        Raises:
            ValueError: the slices are not an (N, 1, 192, 192) uint8 array with N >= 1.
            ModelContractError: the outputs have the wrong shape.
            Errors of onnxruntime.InferenceSession.run propagate unchanged (the caller makes the
            part NotInspected).
        """
        if not isinstance(slices, np.ndarray):
            raise ValueError(f"slices must be a numpy array (N, 1, 192, 192) uint8, got {type(slices).__name__}")
        if slices.dtype != np.uint8:
            raise ValueError(f"slices must be uint8 (raw Mono8 gray values), got {slices.dtype}; "
                             f"do not normalise, the model does")
        if slices.ndim != 4 or slices.shape[1:] != SLICE_SHAPE or slices.shape[0] < 1:
            raise ValueError(f"slices must have shape (N, {', '.join(map(str, SLICE_SHAPE))}) with N >= 1, "
                             f"got {slices.shape}")
        n = slices.shape[0]
        outs = self.session.run(self._output_names, {self._input_name: np.ascontiguousarray(slices)})
        logits, probs, saliency = outs[:3]
        unknown = outs[3] if len(outs) > 3 else None
        k = self.num_classes
        checks = [("logits", logits, (n, k)), ("probs", probs, (n, k)), ("saliency", saliency, (n, *SLICE_SHAPE[1:]))]
        if unknown is not None:
            checks.append((UNKNOWN_OUTPUT, unknown, (n,)))
        for name, arr, want in checks:
            if arr.shape != want:
                raise ModelContractError(f"{self.path.name} returned {name} of shape {arr.shape} for {n} slices, "
                                         f"expected {want} (K = len(classes) = {k}). Fix: re-export the model "
                                         f"with the classes listed in model.json.")
        return Prediction(logits=np.ascontiguousarray(logits, dtype=np.float32),
                          probs=np.ascontiguousarray(probs, dtype=np.float32),
                          saliency=np.ascontiguousarray(saliency, dtype=np.float32),
                          classes=self.classes,
                          unknown=None if unknown is None else np.ascontiguousarray(unknown, dtype=np.float32))

    def __repr__(self) -> str:
        return (f"InferenceModel({str(self.path)!r}, sha256={self.sha256[:12]}, classes={self.classes}, "
                f"provider={self.provider})")


def check_warmup_outputs(pred: Prediction) -> None:
    """A warm-up prediction must be finite with probabilities in [0, 1]; raises ModelContractError otherwise."""
    if not (np.isfinite(pred.logits).all() and np.isfinite(pred.probs).all() and np.isfinite(pred.saliency).all()):
        raise ModelContractError("the model's warm-up run on blank slices gave non-finite logits, probs or "
                                 "saliency. Fix: re-export the model and check its numerics.")
    if (pred.probs < -1e-5).any() or (pred.probs > 1 + 1e-5).any() \
            or not np.allclose(pred.probs.sum(axis=1), 1.0, atol=1e-3):
        raise ModelContractError("the model's warm-up probs are not a softmax (each row in [0, 1], summing to 1). "
                                 "Fix: export the 'probs' output as softmax(logits).")
    if pred.unknown is not None and not (np.isfinite(pred.unknown).all() and (pred.unknown >= 0).all()):
        raise ModelContractError("the model's warm-up unknown scores are not finite and >= 0 (a squared distance). "
                                 "Fix: re-run `valve-model unknown attach` on the exported model.")
    lo, hi = float(pred.saliency.min()), float(pred.saliency.max())
    if lo < -1e-5 or hi > 1 + 1e-5 or not math.isfinite(lo):
        raise ModelContractError(f"the model's warm-up saliency lies in [{lo}, {hi}], the contract says [0, 1]. "
                                 f"Fix: re-export with per-slice min-max scaling of the saliency.")
