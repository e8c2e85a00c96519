"""Small ONNX models that follow the runtime's graph contract, built with onnx.helper (no torch).

The contract (service/infer.py): input ``slices`` uint8 (B, 1, 192, 192) with a dynamic B;
outputs ``logits`` (B, K) float32, ``probs`` (B, K) float32 and ``saliency`` (B, 192, 192)
float32 in [0, 1]; model.json beside model.onnx.

The toy graph:

    x        = Cast(slices, float) / 255                         (B, 1, S, S)
    m        = ReduceMean(x, axes=[2, 3])                        (B, 1)
    logits   = Gemm(m, W) + b,  W = (1, K), b = (K,)             (B, K)
    probs    = Softmax(logits, axis=1)
    pooled   = AveragePool(x, 8x8, stride 8)                     (B, 1, S/8, S/8)
    up       = Resize(pooled, x8, linear, half_pixel)            (B, 1, S, S)
    saliency = (up - min) / (max - min) per slice, 0 where max - min <= 1e-4 (B, S, S)

With ``unknown=True`` the graph also has the optional ``unknown`` output (B,) = UNKNOWN_SCALE * the
slice's brightest pixel / 255: a slice with one bright spot is "unknown" at UNKNOWN_THRESHOLD without
changing its class (the mean barely moves); ``unknown_json`` gives model.json's matching section.

With the default weights the predicted class follows the slice's mean gray value: dark slices
are class 0, bright ones class K-1 (see ``reference``, the same arithmetic in numpy).

Every knob that a contract check looks at can be turned to make a non-conforming model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CLASSES = ("good", "dirt", "scratch", "ec")
SEGMENTED = ("dirt", "scratch")
SIZE = 192
OPSET = 17
EPS = 1e-4
UNKNOWN_SCALE = 10.0
UNKNOWN_THRESHOLD = 5.0


def default_weights(k: int) -> tuple[np.ndarray, np.ndarray]:
    """W (1, K), b (K,) with logit_k(m) = -24 (m - c_k)^2 + 24 m^2, c_k = k / (K - 1): the nearest centre wins."""
    ks = np.arange(k, dtype=np.float32)
    centre = ks / max(k - 1, 1)
    w = (48.0 * centre)[None, :].astype(np.float32)
    b = (-24.0 * centre * centre).astype(np.float32)
    return w, b


def build_model(
    num_classes: int = len(CLASSES),
    *,
    input_name: str = "slices",
    input_dtype: int = TensorProto.UINT8,
    input_shape: Sequence[int | str | None] = ("B", 1, SIZE, SIZE),
    output_names: Sequence[str] = ("logits", "probs", "saliency"),
    probs_dtype: int = TensorProto.FLOAT,
    nan_probs: bool = False,
    weights: tuple[np.ndarray, np.ndarray] | None = None,
    ir_version: int = 8,
    unknown: bool = False,
) -> onnx.ModelProto:
    """A contract-conforming toy model by default; each argument bends one aspect of the contract.

    ``input_shape`` only declares the input; the graph works for any (B, 1, S, S) with S a multiple of 8.
    ``nan_probs`` multiplies the probabilities by NaN (a broken export that passes the static checks).
    """
    w, b = weights if weights is not None else default_weights(num_classes)
    logits_name, probs_name, sal_name = output_names
    batch = input_shape[0] if isinstance(input_shape[0], str) else "B"
    s_out = input_shape[-1] if isinstance(input_shape[-1], int) else SIZE

    inits = [
        helper.make_tensor("inv255", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.flatten().tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, list(b.shape), b.flatten().tolist()),
        helper.make_tensor("roi", TensorProto.FLOAT, [0], []),
        helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 8.0, 8.0]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [EPS]),
    ]
    if nan_probs:
        inits.append(helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]))
    nodes = [
        helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "inv255"], ["x01"]),
        helper.make_node("ReduceMean", ["x01"], ["m4"], axes=[2, 3], keepdims=0),  # (B, 1)
        helper.make_node("Gemm", ["m4", "W", "b"], [logits_name]),
        helper.make_node("Softmax", [logits_name], ["probs_f" if (nan_probs or probs_dtype != TensorProto.FLOAT)
                                                    else probs_name], axis=1),
        helper.make_node("AveragePool", ["x01"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Resize", ["pooled", "roi", "scales"], ["up4"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Squeeze", ["up4", "axis1"], ["up"]),  # (B, S, S)
        helper.make_node("ReduceMin", ["up"], ["lo"], axes=[1, 2], keepdims=1),
        helper.make_node("ReduceMax", ["up"], ["hi"], axes=[1, 2], keepdims=1),
        helper.make_node("Sub", ["hi", "lo"], ["rng"]),
        helper.make_node("Max", ["rng", "eps"], ["den"]),
        helper.make_node("Sub", ["up", "lo"], ["num"]),
        helper.make_node("Div", ["num", "den"], ["scaled"]),
        helper.make_node("Greater", ["rng", "eps"], ["contrast"]),
        helper.make_node("Cast", ["contrast"], ["contrast_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["scaled", "contrast_f"], [sal_name]),
    ]
    outputs_extra = []
    if unknown:
        inits.append(helper.make_tensor("uscale", TensorProto.FLOAT, [], [UNKNOWN_SCALE]))
        nodes.append(helper.make_node("ReduceMax", ["x01"], ["xmax"], axes=[1, 2, 3], keepdims=0))  # (B,)
        nodes.append(helper.make_node("Mul", ["xmax", "uscale"], ["unknown"]))
        outputs_extra.append(helper.make_tensor_value_info("unknown", TensorProto.FLOAT, [batch]))
    if nan_probs:
        nodes.append(helper.make_node("Mul", ["probs_f", "nan"], [probs_name]))
    elif probs_dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["probs_f"], [probs_name], to=probs_dtype))

    k = int(w.shape[1])
    graph = helper.make_graph(
        nodes,
        "toy_valve_cnn",
        [helper.make_tensor_value_info(input_name, input_dtype, list(input_shape))],
        [
            helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info(probs_name, probs_dtype, [batch, k]),
            helper.make_tensor_value_info(sal_name, TensorProto.FLOAT, [batch, s_out, s_out]),
            *outputs_extra,
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnx_fixtures")
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def model_json(onnx_bytes: bytes, classes: Sequence[str] = CLASSES, seg: Sequence[str] = SEGMENTED,
               **overrides) -> dict:
    """The model.json the exporter writes, for these model bytes; ``overrides`` replace top-level keys
    (a value of None removes the key)."""
    seg = [c for c in classes if c in seg]
    meta = {  # the layout models/export.py writes (format valve-inspect/model/1)
        "format": "valve-inspect/model/1",
        "model_file": "model.onnx",
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "classes": list(classes),
        "segmented_classes": seg,
        "segmented_mask": [c in seg for c in classes],
        "input": {"name": "slices", "dtype": "uint8", "shape": ["batch", 1, SIZE, SIZE], "layout": "NCHW"},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)]},
            {"name": "probs", "dtype": "float32", "shape": ["batch", len(classes)]},
            {"name": "saliency", "dtype": "float32", "shape": ["batch", SIZE, SIZE], "method": "gradcam++"},
        ],
        "preset": "toy",
        "attention": "none",
        "opset": OPSET,
        "training": {"note": "onnx_fixtures toy model, not trained"},
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def unknown_json(threshold: float = UNKNOWN_THRESHOLD) -> dict:
    """model.json's keys for a model built with ``unknown=True``: pass as ``**unknown_json()`` to write_model."""
    outputs = model_json(b"")["outputs"] + [{"name": "unknown", "dtype": "float32", "shape": ["batch"]}]
    return {"outputs": outputs, "unknown": {"method": "toy: brightest pixel", "threshold": threshold}}


def write_model(directory: Path, model: onnx.ModelProto | None = None, *, name: str = "model.onnx",
                classes: Sequence[str] = CLASSES, seg: Sequence[str] = SEGMENTED, **json_overrides) -> Path:
    """Write model.onnx and a matching model.json into ``directory``; returns the .onnx path."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_model(len(classes))
    data = model.SerializeToString()
    path = directory / name
    path.write_bytes(data)
    meta = model_json(data, classes, seg, **json_overrides)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def reference(slices: np.ndarray, num_classes: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probs) of the default toy model in numpy, for (N, 1, S, S) uint8 slices."""
    w, b = default_weights(num_classes)
    m = (slices.astype(np.float32) * np.float32(1.0 / 255.0)).mean(axis=(2, 3))  # (N, 1)
    logits = m @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits.astype(np.float32), (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def slices_for_classes(classes_wanted: Sequence[int], num_classes: int = len(CLASSES), size: int = SIZE,
                       seed: int = 0) -> np.ndarray:
    """(N, 1, S, S) uint8 slices whose toy-model prediction is the given class per slice, with texture."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(classes_wanted), 1, size, size), dtype=np.uint8)
    for i, c in enumerate(classes_wanted):
        level = 255.0 * c / max(num_classes - 1, 1)
        noise = rng.integers(-6, 7, size=(size, size))
        out[i, 0] = np.clip(level + noise, 0, 255).astype(np.uint8)
    return out
