"""service.infer against real ONNX Runtime sessions on small contract-conforming (and bent) toy models."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import structlog.testing
from onnx import TensorProto

from service import infer
from service.config import GPU_PROVIDERS
from service.errors import ConfigError, GpuRequiredError, ModelContractError, ModelError, ModelHashMismatch
from service.infer import InferenceModel, resolve_providers, shipped_model_path
from service.records import Prediction
from tests.helpers import onnx_fixtures as fx

CPU = ["CPUExecutionProvider"]


def load(path, **kw):
    kw.setdefault("providers", CPU)
    kw.setdefault("intra_op_threads", 1)
    return InferenceModel(path, **kw)


@pytest.fixture(scope="module")
def good_path(tmp_path_factory):
    return fx.write_model(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def model(good_path):
    return load(good_path)


def test_loads_and_exposes_metadata(model, good_path):
    """A conforming model loads, reports its sha256, preset, classes, segmented flags and provider."""
    meta = json.loads(good_path.with_suffix(".json").read_text())
    assert model.sha256 == meta["sha256"]
    assert model.preset == "toy"
    assert model.classes == fx.CLASSES
    assert model.segmented.dtype == bool and model.segmented.tolist() == [False, True, True, False]
    assert model.provider == "CPUExecutionProvider" == model.session.get_providers()[0]
    assert model.input_name == "slices"
    assert model.warmup_ms > 0
    assert model.describe()["segmented"] == ["dirt", "scratch"]


def test_run_matches_numpy_reference_and_contract_dtypes(model):
    """run() returns float32 contiguous (N,K),(N,K),(N,192,192) arrays equal to the toy graph's numpy maths."""
    x = fx.slices_for_classes([0, 1, 2, 3, 0, 1, 2, 3])
    pred = model.run(x)
    assert isinstance(pred, Prediction) and pred.classes == fx.CLASSES
    for arr, shape in ((pred.logits, (8, 4)), (pred.probs, (8, 4)), (pred.saliency, (8, 192, 192))):
        assert arr.shape == shape and arr.dtype == np.float32 and arr.flags.c_contiguous
    logits, probs = fx.reference(x)
    np.testing.assert_allclose(pred.logits, logits, atol=2e-3)
    np.testing.assert_allclose(pred.probs, probs, atol=1e-4)
    assert pred.predicted.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert pred.saliency.min() >= 0.0 and pred.saliency.max() <= 1.0
    assert np.allclose(pred.saliency.max(axis=(1, 2)), 1.0)


def test_run_dynamic_batch_and_flat_slice_gives_zero_saliency(model):
    """Any N >= 1 works (dynamic batch) and a flat slice's saliency is all zeros."""
    pred = model.run(np.full((3, 1, 192, 192), 77, dtype=np.uint8))
    assert pred.probs.shape == (3, 4)
    assert not pred.saliency.any()
    assert model.run(np.zeros((1, 1, 192, 192), np.uint8)).saliency.shape == (1, 192, 192)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 1, 192, 192), np.float32), "uint8"),
    (np.zeros((8, 192, 192), np.uint8), "shape"),
    (np.zeros((8, 1, 96, 96), np.uint8), "shape"),
    (np.zeros((0, 1, 192, 192), np.uint8), "N >= 1"),
    ([[0]], "numpy array"),
])
def test_run_rejects_bad_slices(model, bad, match):
    """run() refuses anything but an (N, 1, 192, 192) uint8 array with a ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=match):
        model.run(bad)


def test_run_accepts_non_contiguous_input(model):
    """A non-contiguous uint8 view is made contiguous before the session sees it."""
    x = fx.slices_for_classes([1, 2] * 4)
    big = np.zeros((8, 1, 192, 384), np.uint8)
    big[..., ::2] = x
    view = big[..., ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(model.run(view).probs, model.run(x).probs)


def test_hash_mismatch_names_both_hashes(tmp_path):
    """A model.onnx that differs from model.json's sha256 is refused with both hashes and the fix."""
    path = fx.write_model(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    path.write_bytes(path.read_bytes() + b"\0")
    actual = infer.sha256_file(path)
    with pytest.raises(ModelHashMismatch) as ei:
        load(path)
    msg = str(ei.value)
    assert meta["sha256"] in msg and actual in msg and "Fix" in msg


def test_missing_model_and_missing_json(tmp_path):
    """A missing model.onnx or model.json is a ModelError naming the file and the fix."""
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "nope.onnx")
    path = fx.write_model(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match=r"model\.json is missing.*Fix"):
        load(path)


def test_shipped_model_path_missing_names_the_fix(monkeypatch, tmp_path):
    """Without service/data/model.onnx, shipped_model_path() says how to provide one."""
    monkeypatch.setattr(infer, "SHIPPED_RELPATH", ("data", "definitely-missing.onnx"))
    with pytest.raises(ModelError, match="valve-model export"):
        shipped_model_path()
    assert shipped_model_path(check=False).name == "definitely-missing.onnx"


@pytest.mark.parametrize("kwargs, match", [
    ({"input_dtype": TensorProto.FLOAT}, "is float32, the contract says uint8"),
    ({"input_shape": ("B", 1, 96, 96)}, r"shape \['B', 1, 96, 96\]"),
    ({"input_shape": (8, 1, 192, 192)}, "fixed batch of 8"),
    ({"input_name": "x"}, "named 'x'"),
    ({"output_names": ("logits", "probs", "cam")}, r"lacks the output\(s\) \['saliency'\]"),
    ({"probs_dtype": TensorProto.DOUBLE}, "'probs' is float64"),
])
def test_graph_contract_violations_are_named(tmp_path, kwargs, match):
    """Each way the graph can differ from the contract is a ModelContractError naming the difference."""
    path = fx.write_model(tmp_path, fx.build_model(**kwargs))
    with pytest.raises(ModelContractError, match=match):
        load(path)


def test_wrong_k_is_refused(tmp_path):
    """A graph with 3 classes and a model.json listing 4 is refused, naming K and the classes."""
    path = fx.write_model(tmp_path, fx.build_model(3))
    with pytest.raises(ModelContractError, match=r"K = 4 = len\(classes\)"):
        load(path)


def test_json_contract_violations_are_named(tmp_path):
    """model.json with a missing key, a segmented class not in classes, or a wrong input spec is refused."""
    path = fx.write_model(tmp_path / "a")
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["sha256"], meta["outputs"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelContractError, match="lacks the key"):
        load(path)
    with pytest.raises(ModelContractError, match="not in 'classes'"):
        load(fx.write_model(tmp_path / "b", segmented_classes=["dirt", "rust"], segmented_mask=None))
    with pytest.raises(ModelContractError, match="dtype is 'float32'"):
        load(fx.write_model(tmp_path / "c", input={"name": "slices", "dtype": "float32",
                                                     "shape": ["B", 1, 192, 192]}))
    with pytest.raises(ModelContractError, match=r"'outputs'.*lacks \['saliency'\]"):
        load(fx.write_model(tmp_path / "d", outputs=["logits", "probs"]))


def test_segmented_forms_and_format(tmp_path):
    """Segmented classes may come as names ('segmented' or 'segmented_classes') or a mask; they must agree."""
    m = load(fx.write_model(tmp_path / "a", segmented_classes=None, segmented_mask=None, segmented=["scratch"]),
             warmup_slices=0)
    assert m.segmented.tolist() == [False, False, True, False]
    m = load(fx.write_model(tmp_path / "b", segmented_classes=None), warmup_slices=0)
    assert m.segmented.tolist() == [False, True, True, False]
    with pytest.raises(ModelContractError, match="segmented classes disagree"):
        load(fx.write_model(tmp_path / "c", segmented_mask=[False, True, False, False]))
    with pytest.raises(ModelContractError, match="does not say which classes are segmented"):
        load(fx.write_model(tmp_path / "d", segmented_classes=None, segmented_mask=None))
    with pytest.raises(ModelContractError, match="format 'valve-inspect/model/2'"):
        load(fx.write_model(tmp_path / "e", format="valve-inspect/model/2"))
    assert load(fx.write_model(tmp_path / "f", format=None, model_file="renamed.onnx"),
                warmup_slices=0).sha256


def test_outputs_list_forms_are_accepted(tmp_path):
    """model.json 'outputs' may be a list of names or an object keyed by name, as well as [{"name": ...}]."""
    assert load(fx.write_model(tmp_path / "a", outputs=["logits", "probs", "saliency"])).classes == fx.CLASSES
    assert load(fx.write_model(tmp_path / "b", outputs={n: {} for n in ("logits", "probs", "saliency")}),
                warmup_slices=0).num_classes == 4


def test_nan_at_warmup_is_refused(tmp_path):
    """A model whose warm-up probabilities are NaN never gets to run frames."""
    with pytest.raises(ModelContractError, match="non-finite"):
        load(fx.write_model(tmp_path, fx.build_model(nan_probs=True)))


def cpu_only_build(monkeypatch) -> None:
    """This onnxruntime build offers no GPU provider (what ort.get_available_providers says on a CPU-only
    wheel), whatever the machine running the test has."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def gpu_that_fails_to_initialise(monkeypatch) -> list:
    """The build offers CUDA but the session cannot initialise it (missing CUDA/cuDNN libraries, no visible
    device): ONNX Runtime then runs the session on the providers left, the CPU. Simulated by creating the
    real session with the GPU providers removed, on any machine. Returns the providers each session was asked
    for."""
    real = ort.InferenceSession
    asked: list = []
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(infer, "provider_load_problem", lambda name: None)  # its libraries load

    def session(path, sess_options=None, providers=None, **kw):
        asked.append(list(providers or []))
        left = [p for p in providers or [] if (p if isinstance(p, str) else p[0]) not in GPU_PROVIDERS]
        return real(path, sess_options=sess_options, providers=left or ["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


def test_require_gpu_refuses_cpu_session(good_path, monkeypatch):
    """require_gpu when the build offers no GPU provider is a GpuRequiredError naming the provider used and
    the fix (provider discovery stubbed: the test means the same on a CPU and a GPU machine)."""
    cpu_only_build(monkeypatch)
    with pytest.raises(GpuRequiredError, match="runs model.onnx on CPUExecutionProvider.*Fix"):
        load(good_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], require_gpu=True)


def test_require_gpu_refuses_a_gpu_provider_that_fell_back_to_the_cpu(good_path, monkeypatch):
    """CUDA offered and asked for, but the session fell back to the CPU: require_gpu still refuses."""
    asked = gpu_that_fails_to_initialise(monkeypatch)
    with pytest.raises(GpuRequiredError, match="runs model.onnx on CPUExecutionProvider"):
        load(good_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], require_gpu=True)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]


def test_gpu_providers_skipped_when_not_offered_report_cpu(good_path, monkeypatch):
    """Asking for CUDA first from a build without it yields a working session that reports the CPU."""
    cpu_only_build(monkeypatch)
    m = load(good_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], warmup_slices=1)
    assert m.provider == "CPUExecutionProvider"
    assert m.providers == tuple(m.session.get_providers())


def test_gpu_providers_fall_back_and_report_cpu(good_path, monkeypatch):
    """CUDA offered but not usable: the session ONNX Runtime falls back to is used, and the model reports the
    provider it really runs on (the CPU), not the one asked for; the fallback is logged."""
    asked = gpu_that_fails_to_initialise(monkeypatch)
    with structlog.testing.capture_logs() as logs:
        m = load(good_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], warmup_slices=1)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert m.provider == "CPUExecutionProvider"
    assert m.providers == tuple(m.session.get_providers())
    assert any(e["event"] == "inference_provider_fallback" and e["wanted"] == "CUDAExecutionProvider"
               for e in logs), logs


def test_unknown_provider_is_a_config_error():
    """A provider name ONNX Runtime does not know (a typo) is refused before anything is loaded."""
    with pytest.raises(ConfigError, match="unknown ONNX Runtime execution provider 'CudaExecutionProvider'"):
        resolve_providers(["CudaExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="non-empty list"):
        resolve_providers("CPUExecutionProvider")


def test_unavailable_providers_are_skipped(monkeypatch):
    """Known providers this build does not offer are skipped; if none is left the CPU is used."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    chosen, skipped = resolve_providers(["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"] and list(skipped) == ["OpenVINOExecutionProvider"]
    assert "not in this onnxruntime build" in skipped["OpenVINOExecutionProvider"]
    chosen, skipped = resolve_providers(["DmlExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"] and list(skipped) == ["DmlExecutionProvider"]
    chosen, _ = resolve_providers([("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])
    assert chosen == [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]


class _FakeDriver:
    """libcuda.so.1 as ctypes sees it: cuInit and cuDeviceGetCount with given results."""

    def __init__(self, init_rc: int = 0, devices: int = 1) -> None:
        self.init_rc, self.devices = init_rc, devices

    def cuInit(self, flags):  # noqa: N802 (the driver API's name)
        return self.init_rc

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = self.devices
        return 0


def fake_loader(monkeypatch, missing: set[str], driver: _FakeDriver | None = None) -> list[str]:
    """Stub the dynamic loader: names (or path tails) in ``missing`` raise OSError as dlopen would;
    returns the names asked for, in order."""
    asked: list[str] = []

    def load(name: str):
        asked.append(name)
        base = name.rsplit("/", 1)[-1]
        if base in missing:
            raise OSError(f"{base}: cannot open shared object file: No such file or directory")
        return driver if base == "libcuda.so.1" else object()

    monkeypatch.setattr(infer, "_load_library", load)
    monkeypatch.setattr(infer.sys, "platform", "linux")
    return asked


@pytest.mark.parametrize(("missing", "driver", "expect"), [
    ({"libcuda.so.1"}, None, "no NVIDIA driver"),
    (set(), _FakeDriver(init_rc=100), "no usable GPU.*error 100"),
    (set(), _FakeDriver(devices=0), "sees no GPU"),
    ({"libcudnn.so.9"}, _FakeDriver(), "cuDNN 9 cannot be loaded"),
    ({"libonnxruntime_providers_cuda.so"}, _FakeDriver(), "libonnxruntime_providers_cuda.so cannot be loaded"),
])
def test_cuda_provider_probe_names_what_is_missing(monkeypatch, missing, driver, expect):
    """The CUDA provider is probed like ONNX Runtime loads it (driver and device, cuDNN, the provider library
    with its CUDA dependencies) and the first thing missing is named (loader stubbed: same on CPU and GPU)."""
    fake_loader(monkeypatch, missing, driver)
    assert re.search(expect, infer.provider_load_problem("CUDAExecutionProvider"))


def test_cuda_provider_probe_passes_when_everything_loads(monkeypatch):
    """With the driver, a device, cuDNN and the provider library loadable, CUDA is usable; providers without
    their own library (the CPU) are not probed at all."""
    asked = fake_loader(monkeypatch, set(), _FakeDriver())
    assert infer.provider_load_problem("CUDAExecutionProvider") is None
    assert [a.rsplit("/", 1)[-1] for a in asked] == ["libcuda.so.1", "libcudnn.so.9",
                                                     "libonnxruntime_providers_cuda.so"]
    asked.clear()
    assert infer.provider_load_problem("CPUExecutionProvider") is None and asked == []


def test_cuda_listed_but_unloadable_is_skipped_before_onnxruntime_tries(good_path, monkeypatch):
    """onnxruntime-gpu lists CUDA even without its libraries: the probe skips it, so ONNX Runtime is never
    asked for it (no error output of its own), and one log line says which provider runs and why."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    fake_loader(monkeypatch, {"libcublasLt.so.13", "libonnxruntime_providers_cuda.so"}, _FakeDriver())
    real, asked = ort.InferenceSession, []

    def session(path, sess_options=None, providers=None, **kw):
        asked.append(list(providers))
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with structlog.testing.capture_logs() as logs:
        m = load(good_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], warmup_slices=0)
    assert asked == [["CPUExecutionProvider"]] and m.provider == "CPUExecutionProvider"
    (line,) = [e for e in logs if e["event"] == "inference_session"]
    assert line["provider"] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider skipped: libonnxruntime_providers_cuda.so cannot be loaded" in line["reason"]
    assert not any(e["event"] == "inference_provider_fallback" for e in logs)


def test_session_options_and_thread_validation(good_path):
    """Sessions use all graph optimisations, sequential execution and the configured intra-op threads."""
    so = infer.session_options(2)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.intra_op_num_threads == 2
    with pytest.raises(ConfigError, match="intra_op_threads"):
        load(good_path, intra_op_threads=-1)


# ------------------------------------------------------------------ the optional unknown-defect score

def test_the_unknown_output_is_read_with_its_threshold(tmp_path):
    """A model with the optional ``unknown`` output: run() returns one score per slice (the toy: 10 x the
    brightest pixel / 255), and the threshold comes from model.json."""
    path = fx.write_model(tmp_path, fx.build_model(unknown=True), **fx.unknown_json(5.0))
    m = load(path)
    assert m.has_unknown and m.unknown_threshold == 5.0 and m.describe()["unknown_threshold"] == 5.0
    x = fx.slices_for_classes([0, 0, 3])
    x[1, 0, 10, 10] = 255  # one bright pixel: unknown, class unchanged
    pred = m.run(x)
    want = fx.UNKNOWN_SCALE * x.reshape(3, -1).max(axis=1) / 255.0
    assert pred.unknown.shape == (3,) and pred.unknown.dtype == np.float32
    np.testing.assert_allclose(pred.unknown, want, rtol=1e-6)
    assert pred.predicted.tolist() == [0, 0, 3]


def test_a_model_without_the_score_has_no_unknown(model):
    """The plain contract model: no unknown scores, no threshold (the rule stays off)."""
    assert not model.has_unknown and model.unknown_threshold is None
    assert model.run(fx.slices_for_classes([1])).unknown is None


def test_unknown_output_and_model_json_must_agree(tmp_path):
    """The output without model.json's section, the section without the output, or a bad threshold: refused."""
    with pytest.raises(ModelContractError, match="does not describe it"):
        load(fx.write_model(tmp_path / "a", fx.build_model(unknown=True)))
    with pytest.raises(ModelContractError, match="has no 'unknown' output"):
        load(fx.write_model(tmp_path / "b", fx.build_model(), **fx.unknown_json(5.0)))
    for i, bad in enumerate((0, -1.0, "high", None)):
        meta = fx.unknown_json(5.0)
        meta["unknown"] = {"threshold": bad}
        with pytest.raises(ModelContractError, match="'threshold' > 0"):
            load(fx.write_model(tmp_path / f"c{i}", fx.build_model(unknown=True), **meta))
