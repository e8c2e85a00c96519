"""The unknown-defect score inside the graph: one more output, per slice, of the same ONNX Runtime run.

The paper ends on its limit: the classifier cannot tell a defect type it never saw; it gives it a
softmax over good / dirt / scratch / ec, often "good". ``attach`` adds an ``unknown`` output (B,) to an
exported graph by graph surgery (the classifier's nodes and weights are untouched), by one of two
methods (docs/model.md, "Unknown defects", has the measurements that chose the default):

**variation** (default): a variation model of the good parts, as machine vision's golden-part model.
Per slice position s (the batch index modulo the slices per part: the runtime sends one part's slices
in row-major order) and per f x f pooled pixel, the mean m_s and spread sd_s of the training frames'
good slices:

    d = | pool_f(x) - m_s | / (sd_s + median(sd))                              # (B, 1, 48, 48)
    unknown = max over pixels of mean_k x k(d)                                  # (B,)

It looks at the pixels, not at the classifier's features, so what the classifier never learned to see
can still be unlike every good part.

**mahalanobis**: the Mahalanobis distance of pooled block features to the nearest known class (Lee
et al., NeurIPS 2018): f_b = [GAP, GMP] of IRA-Block b's output, class means mu_bk and the whitening
W_b of their tied covariance with a small shrinkage (graph constants, fitted on the graph's own
features), ``unknown = mean_b min_k || W_b (f_b - mu_bk) ||^2 / dim(f_b)``.

A slice is unknown when ``unknown >= threshold``; model.json's ``unknown.threshold`` is calibrated on
held-out good parts of the training distribution (never the fit parts) to a stated false-flag rate of
*good parts* (a part is flagged when any of its slices is), and the daemon's config can override it.
Nothing is written unless the graph agrees with a float64 reference within 1e-4 (relative).
``measure`` prints every candidate side by side (max-softmax, energy, Mahalanobis, variation).

Commands:

    valve-model unknown attach --model model.onnx --fit FRAMES --calibrate FRAMES --out DIR
    valve-model unknown evaluate --model DIR/model.onnx --known FRAMES --novel FRAMES [--json OUT]
    valve-model unknown measure --model model.onnx --fit FRAMES --calibrate FRAMES --known ... --novel ...

FRAMES is a folder written by ``valve-inspect synth`` (frames/ and manifest.jsonl): the frames go
through the runtime's own ROI cut (service.roi.extract), so the scores are what the daemon sees.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.infer import UNKNOWN_OUTPUT, sha256_file  # the runtime owns the graph contract
from service.sim.synth import read_manifest

#: the blocks whose pooled features the score uses, by default (1-based, in graph order)
DEFAULT_BLOCKS = (1, 2, 3)
#: shrinkage of the tied covariance towards eps * mean variance * I
SHRINKAGE = 0.01
#: the part-level false-flag rate the threshold is calibrated to on held-out parts
DEFAULT_FALSE_FLAG_RATE = 0.005
PARITY_TOLERANCE = 1e-4  # relative, ONNX Runtime vs the float64 numpy reference
#: good parts the calibration needs at least (0.5 % of 100 parts is no part at all: the largest score + eps)
MIN_CALIBRATION_GOOD = 100
_PREFIX = "unknown_score/"


class UnknownError(Exception):
    """A problem the user can fix (no blocks found, no data, a class without slices); exit 2."""

    exit_code = 2


# ----------------------------------------------------------------------------- graph surgery

def _opset(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def block_outputs(proto) -> list[str]:
    """The outputs of the IRA-Blocks: the 2x2 stride-2 max-pools, in graph order (Table 1: each block ends in one)."""
    from onnx import helper

    out = []
    for node in proto.graph.node:
        if node.op_type != "MaxPool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if list(attrs.get("kernel_shape", [])) == [2, 2] and list(attrs.get("strides", [])) == [2, 2]:
            out.append(node.output[0])
    return out


def _reduce(nodes: list, inits: list, op: str, x: str, axes: Sequence[int], keepdims: int, out: str,
            opset: int) -> str:
    """One Reduce* node; its axes as an attribute below opset 18 (ReduceSum: 13), as an input from then on."""
    from onnx import helper, numpy_helper

    as_input = opset >= (13 if op == "ReduceSum" else 18)
    if as_input:
        name = out + "__axes"
        inits.append(numpy_helper.from_array(np.asarray(list(axes), dtype=np.int64), name))
        nodes.append(helper.make_node(op, [x, name], [out], keepdims=keepdims))
    else:
        nodes.append(helper.make_node(op, [x], [out], axes=list(axes), keepdims=keepdims))
    return out


def add_pooled_features(proto, tensors: Sequence[str]) -> list[str]:
    """Append [GAP, GMP] of each (B, C, H, W) tensor to the graph; returns the (B, 2C) feature names.

    GAP is two means (over W, then H), as the export does for the head's pool (ONNX Runtime's float32
    accuracy on one 2-axis mean is worse, models.export.split_spatial_means)."""
    from onnx import helper

    opset = _opset(proto)
    names = []
    for i, t in enumerate(tensors):
        nodes: list = []
        inits: list = []
        p = f"{_PREFIX}b{i + 1}/"
        w = _reduce(nodes, inits, "ReduceMean", t, [3], 0, p + "mean_w", opset)  # (B, C, H)
        gap = _reduce(nodes, inits, "ReduceMean", w, [2], 0, p + "gap", opset)
        gmp = _reduce(nodes, inits, "ReduceMax", t, [2, 3], 0, p + "gmp", opset)
        nodes.append(helper.make_node("Concat", [gap, gmp], [p + "features"], axis=1))
        proto.graph.node.extend(nodes)
        proto.graph.initializer.extend(inits)
        names.append(p + "features")
    return names


def strip_unknown(proto) -> bool:
    """Remove an attached unknown score (its nodes, constants and output) in place; True when there was one."""
    had = any(o.name == UNKNOWN_OUTPUT for o in proto.graph.output)
    keep = [n for n in proto.graph.node
            if not any(o == UNKNOWN_OUTPUT or o.startswith(_PREFIX) for o in n.output)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    inits = [i for i in proto.graph.initializer if not i.name.startswith(_PREFIX)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    outs = [o for o in proto.graph.output if o.name != UNKNOWN_OUTPUT]
    del proto.graph.output[:]
    proto.graph.output.extend(outs)
    return had


def _expose(proto, names: Sequence[str]) -> None:
    from onnx import TensorProto, helper

    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))


@dataclass
class Gaussians:
    """Class-conditional Gaussians with a tied covariance, per block: the score's constants."""

    blocks: list[int]
    classes: list[str]
    means: list[np.ndarray]       # per block (K, D_b) float64
    whiteners: list[np.ndarray]   # per block (D_b, D_b) float64, W^T W = (S + eps I)^-1

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The float64 reference of the graph's ``unknown`` output from the pooled features (B, D_b) per block."""
        total = 0.0
        for f, mu, w in zip(features, self.means, self.whiteners, strict=True):
            z = np.asarray(f, np.float64) @ w.T                       # (B, D)
            m = mu @ w.T                                              # (K, D)
            d = ((z[:, None, :] - m[None]) ** 2).sum(axis=2).min(axis=1) / mu.shape[1]
            total = total + d
        return np.asarray(total / len(self.means), np.float64)


def fit_gaussians(features: Sequence[np.ndarray], labels: np.ndarray, classes: Sequence[str], blocks: Sequence[int],
                  shrinkage: float = SHRINKAGE) -> Gaussians:
    """Class means and the whitening of the tied covariance of each block's features (rows = slices)."""
    labels = np.asarray(labels)
    present = [c for c in range(len(classes)) if (labels == c).any()]
    missing = [classes[c] for c in range(len(classes)) if c not in present]
    if missing:
        raise UnknownError(f"the fit data has no slice of class(es) {missing}: the score needs every class the "
                           f"model knows. Fix: fit on the model's training side (all classes).")
    means, whiteners = [], []
    for f in features:
        f = np.asarray(f, np.float64)
        mu = np.stack([f[labels == c].mean(axis=0) for c in range(len(classes))])
        centred = f - mu[labels]
        cov = centred.T @ centred / max(1, len(f) - 1)
        cov = cov + shrinkage * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0]) + 1e-9 * np.eye(cov.shape[0])
        chol = np.linalg.cholesky(cov)                                # cov = L L^T
        w = np.linalg.inv(chol)                                       # W = L^-1: W^T W = cov^-1
        means.append(mu)
        whiteners.append(w)
    return Gaussians(list(blocks), list(classes), means, whiteners)


def add_score(proto, feature_names: Sequence[str], g: Gaussians) -> None:
    """Append the Mahalanobis nodes and the ``unknown`` (B,) output; constants float32."""
    from onnx import TensorProto, helper, numpy_helper

    opset = _opset(proto)
    nodes: list = []
    inits: list = []
    parts = []
    for i, (f, mu, w) in enumerate(zip(feature_names, g.means, g.whiteners, strict=True)):
        p = f"{_PREFIX}b{i + 1}/"
        inits.append(numpy_helper.from_array(w.T.astype(np.float32), p + "whitener_t"))          # (D, D)
        inits.append(numpy_helper.from_array((mu @ w.T).astype(np.float32)[None], p + "means_w"))  # (1, K, D)
        inits.append(numpy_helper.from_array(np.asarray([1], np.int64), p + "axis1"))
        inits.append(numpy_helper.from_array(np.asarray(1.0 / (mu.shape[1] * len(g.means)), np.float32),
                                             p + "scale"))
        nodes.append(helper.make_node("MatMul", [f, p + "whitener_t"], [p + "z"]))             # (B, D)
        nodes.append(helper.make_node("Unsqueeze", [p + "z", p + "axis1"], [p + "z1"]))         # (B, 1, D)
        nodes.append(helper.make_node("Sub", [p + "z1", p + "means_w"], [p + "diff"]))          # (B, K, D)
        nodes.append(helper.make_node("Mul", [p + "diff", p + "diff"], [p + "sq"]))
        _reduce(nodes, inits, "ReduceSum", p + "sq", [2], 0, p + "dist", opset)                  # (B, K)
        _reduce(nodes, inits, "ReduceMin", p + "dist", [1], 0, p + "nearest", opset)             # (B,)
        nodes.append(helper.make_node("Mul", [p + "nearest", p + "scale"], [p + "part"]))
        parts.append(p + "part")
    if len(parts) == 1:
        nodes.append(helper.make_node("Identity", parts, [UNKNOWN_OUTPUT]))
    else:
        nodes.append(helper.make_node("Sum", parts, [UNKNOWN_OUTPUT]))
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    proto.graph.output.append(helper.make_tensor_value_info(UNKNOWN_OUTPUT, TensorProto.FLOAT, ["batch"]))


# ----------------------------------------------------------------------------- the variation model

#: the variation model's defaults: 4 x 4 mean pooling (192 -> 48 px per slice), 3 x 3 smoothing of the deviation
VARIATION_FACTOR = 4
VARIATION_SMOOTH = 3


@dataclass
class VariationModel:
    """A variation model of good parts (as machine vision's "variation model" of a golden part): per slice
    position and per (pooled) pixel, the mean gray value of the good slices and their spread.

    score(slice at position s) = max over pixels of box_k( |pool_f(x) - mean_s| / (std_s + floor) )

    pool_f: f x f mean pooling; box_k: the k x k mean over the valid neighbours (as ONNX AveragePool with
    count_include_pad = 0); floor: the median std, so that a pixel with no spread in the good data does not
    divide by ~0. It looks at the pixels, not at the classifier's features: what the classifier never
    learned to see can still be unlike every good part (docs/model.md, "Unknown defects").
    """

    factor: int
    smooth: int
    mean: np.ndarray   # (S, h, w) float64
    scale: np.ndarray  # (S, h, w) float64: std + floor
    floor: float = 0.0

    def deviation(self, slices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(N, h, w) smoothed normalised deviation, float64 reference (slices (N, 1, H, W) uint8)."""
        x = np.asarray(slices, np.float64)[:, 0]
        n, hh, ww = x.shape
        f = self.factor
        p = x.reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4))
        d = np.abs(p - self.mean[positions]) / self.scale[positions]
        k = self.smooth
        if k > 1:
            r = k // 2
            pad = np.pad(d, ((0, 0), (r, r), (r, r)))
            ones = np.pad(np.ones(d.shape[1:]), r)
            box = sum(pad[:, i:i + d.shape[1], j:j + d.shape[2]] for i in range(k) for j in range(k))
            cnt = sum(ones[i:i + d.shape[1], j:j + d.shape[2]] for i in range(k) for j in range(k))
            d = box / cnt
        return d

    def score(self, slices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.deviation(slices, positions).max(axis=(1, 2))


def fit_variation(parts: PartSlices, factor: int = VARIATION_FACTOR, smooth: int = VARIATION_SMOOTH) -> VariationModel:
    """Mean and spread per slice position of the slices labelled good (the good parts' and the good slices of
    defect parts)."""
    n_pos = parts.slices.shape[1]
    size = parts.slices.shape[-1]
    if size % factor:
        raise UnknownError(f"slice size {size} is not a multiple of the pooling factor {factor}")
    good = np.asarray([[lab == "good" for lab in labs] for labs in parts.slice_labels])
    h = size // factor
    mean, std = np.zeros((n_pos, h, h)), np.zeros((n_pos, h, h))
    for s in range(n_pos):
        x = parts.slices[good[:, s], s, 0].astype(np.float64)
        if len(x) < 10:
            raise UnknownError(f"slice position {s}: {len(x)} good slices in the fit data, the variation model "
                               f"needs >= 10. Fix: fit on more parts.")
        p = x.reshape(len(x), h, factor, h, factor).mean(axis=(2, 4))
        mean[s], std[s] = p.mean(axis=0), p.std(axis=0)
    floor = float(np.median(std))
    return VariationModel(factor, smooth, mean, std + floor, floor)


def add_variation_score(proto, input_name: str, v: VariationModel) -> None:
    """Append the variation model's nodes and the ``unknown`` (B,) output. The slice's position is its batch
    index modulo the number of positions: the runtime sends one part's slices in row-major order."""
    from onnx import TensorProto, helper, numpy_helper

    p = _PREFIX + "var/"
    n_pos = v.mean.shape[0]
    inits = [numpy_helper.from_array(v.mean[:, None].astype(np.float32), p + "mean"),                # (S, 1, h, w)
             numpy_helper.from_array((1.0 / v.scale)[:, None].astype(np.float32), p + "inv_scale"),
             numpy_helper.from_array(np.asarray(0, np.int64), p + "zero"),
             numpy_helper.from_array(np.asarray(1, np.int64), p + "one"),
             numpy_helper.from_array(np.asarray(n_pos, np.int64), p + "n_pos")]
    nodes = [
        helper.make_node("Cast", [input_name], [p + "x"], to=TensorProto.FLOAT),                      # (B, 1, H, W)
        helper.make_node("AveragePool", [p + "x"], [p + "pooled"], kernel_shape=[v.factor] * 2,
                         strides=[v.factor] * 2),                                                      # (B, 1, h, w)
        helper.make_node("Shape", [input_name], [p + "shape"]),
        helper.make_node("Gather", [p + "shape", p + "zero"], [p + "batch"], axis=0),                 # B
        helper.make_node("Range", [p + "zero", p + "batch", p + "one"], [p + "index"]),               # 0..B-1
        helper.make_node("Mod", [p + "index", p + "n_pos"], [p + "position"]),
        helper.make_node("Gather", [p + "mean", p + "position"], [p + "mean_b"], axis=0),             # (B, 1, h, w)
        helper.make_node("Gather", [p + "inv_scale", p + "position"], [p + "inv_b"], axis=0),
        helper.make_node("Sub", [p + "pooled", p + "mean_b"], [p + "diff"]),
        helper.make_node("Abs", [p + "diff"], [p + "abs"]),
        helper.make_node("Mul", [p + "abs", p + "inv_b"], [p + "dev"]),
    ]
    dev = p + "dev"
    if v.smooth > 1:
        r = v.smooth // 2
        nodes.append(helper.make_node("AveragePool", [dev], [p + "smooth"], kernel_shape=[v.smooth] * 2,
                                      strides=[1, 1], pads=[r] * 4, count_include_pad=0))
        dev = p + "smooth"
    nodes.append(helper.make_node("ReduceMax", [dev], [UNKNOWN_OUTPUT], axes=[1, 2, 3], keepdims=0)
                 if _opset(proto) < 18 else
                 helper.make_node("ReduceMax", [dev, p + "axes"], [UNKNOWN_OUTPUT], keepdims=0))
    if _opset(proto) >= 18:
        inits.append(numpy_helper.from_array(np.asarray([1, 2, 3], np.int64), p + "axes"))
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    proto.graph.output.append(helper.make_tensor_value_info(UNKNOWN_OUTPUT, TensorProto.FLOAT, ["batch"]))


# ----------------------------------------------------------------------------- data

@dataclass
class PartSlices:
    """The runtime's slices of synthetic parts, with the manifest's labels."""

    slices: np.ndarray          # (P, 8, 1, S, S) uint8
    slice_labels: list[list[str]]
    part_class: list[str]
    subtype: list[str | None]
    files: list[str]


def load_parts(folder: str | Path, limit: int | None = None) -> PartSlices:
    """Cut every frame of a ``valve-inspect synth`` folder with service.roi.extract (the daemon's own ROI)."""
    from service.errors import NoPartError
    from service.roi import extract

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UnknownError(f"{folder}: no manifest.jsonl. Fix: give a folder written by `valve-inspect synth --out`.")
    rows = read_manifest(manifest)[:limit]
    slices, labels, classes, subtypes, files = [], [], [], [], []
    for row in rows:
        img = cv2.imread(str(folder / row["file"]), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise UnknownError(f"{folder / row['file']}: cannot read the frame. Fix: regenerate the folder.")
        try:
            batch = extract(img)
        except NoPartError:
            continue  # the daemon answers NoPart; not a sample of either distribution
        slices.append(batch.slices)
        labels.append(list(row.get("slice_labels") or ["good"] * len(batch.slices)))
        classes.append(row["class"])
        subtypes.append(row.get("subtype"))
        files.append(row["file"])
    if not slices:
        raise UnknownError(f"{folder}: no frame with a valve. Fix: regenerate the folder.")
    return PartSlices(np.stack(slices), labels, classes, subtypes, files)


def _session(proto, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def run_outputs(proto, parts: PartSlices, names: Sequence[str], batch: int = 8, threads: int = 0) -> dict:
    """Run the graph over every slice; returns {output name: (P * 8, ...)} float arrays."""
    sess = _session(proto, threads)
    x = parts.slices.reshape(-1, *parts.slices.shape[2:])
    out: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        for n, v in zip(names, sess.run(list(names), {sess.get_inputs()[0].name: x[i:i + batch]}), strict=True):
            out[n].append(v)
    return {n: np.concatenate(v) for n, v in out.items()}


# ----------------------------------------------------------------------------- fit, calibrate, attach

def _features_graph(proto, blocks: Sequence[int]):
    tensors = block_outputs(proto)
    if not tensors:
        raise UnknownError("the graph has no 2x2 max-pool (an IRA-Block's output). Fix: export an IRA-CNN.")
    bad = [b for b in blocks if not 1 <= b <= len(tensors)]
    if bad:
        raise UnknownError(f"blocks {bad}: the graph has {len(tensors)} IRA-Blocks (1..{len(tensors)}).")
    work = copy.deepcopy(proto)
    if any(o.name == UNKNOWN_OUTPUT for o in work.graph.output):
        raise UnknownError(f"the model already has an {UNKNOWN_OUTPUT!r} output. Fix: attach to the model "
                           f"without it (the original export).")
    names = add_pooled_features(work, [tensors[b - 1] for b in blocks])
    return work, names


def slice_label_index(parts: PartSlices, classes: Sequence[str]) -> np.ndarray:
    idx = {c: i for i, c in enumerate(classes)}
    flat = [lab for labs in parts.slice_labels for lab in labs]
    bad = sorted({lab for lab in flat if lab not in idx})
    if bad:
        raise UnknownError(f"slice labels {bad} are not classes of the model {list(classes)}: fit and calibration "
                           f"data must be the known classes only. Fix: synthesise them without novel types.")
    return np.asarray([idx[lab] for lab in flat])


def part_max(scores: np.ndarray, n_parts: int) -> np.ndarray:
    return np.asarray(scores, np.float64).reshape(n_parts, -1).max(axis=1)


def calibrate(part_scores: np.ndarray, rate: float) -> float:
    """The smallest threshold that flags at most ``rate`` of these parts (a part: its max slice score).

    >>> calibrate(np.arange(200.0), 0.01)  # 2 of 200 may be flagged: 198 and 199
    197.00000000000003
    """
    s = np.sort(np.asarray(part_scores, np.float64))
    allowed = int(np.floor(rate * len(s)))                   # parts that may be flagged
    # flag score >= t: t just above the (allowed+1)-th largest score
    k = len(s) - allowed - 1
    return float(np.nextafter(s[k], np.inf)) if k >= 0 else float(s[0])


METHODS = ("variation", "mahalanobis")
DEFAULT_METHOD = "variation"


def _positions(n_parts: int, n_slices: int) -> np.ndarray:
    return np.tile(np.arange(n_slices), n_parts)


def attach(model: str | Path, fit: str | Path, calibration: str | Path, out: str | Path, *,
           method: str = DEFAULT_METHOD, blocks: Sequence[int] = DEFAULT_BLOCKS,
           rate: float = DEFAULT_FALSE_FLAG_RATE, factor: int = VARIATION_FACTOR, smooth: int = VARIATION_SMOOTH,
           threads: int = 0, limit: int | None = None) -> dict:
    """Fit the score on ``fit``, calibrate its threshold on ``calibration``'s good parts, write ``out``/model.onnx +
    model.json. ``method``: "variation" (the pixels' variation model of good parts) or "mahalanobis" (pooled block
    features). Nothing is written unless the graph's score agrees with the float64 reference (PARITY_TOLERANCE)."""
    import onnx

    if method not in METHODS:
        raise UnknownError(f"method {method!r}: one of {', '.join(METHODS)}")
    model = Path(model)
    meta = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))
    classes = list(meta["classes"])
    proto = onnx.load(str(model))
    if any(o.name == UNKNOWN_OUTPUT for o in proto.graph.output):
        raise UnknownError(f"{model} already has an {UNKNOWN_OUTPUT!r} output. Fix: attach to the model without it "
                           f"(the original export).")
    t0 = time.perf_counter()
    fit_parts = load_parts(fit, limit)
    labels = slice_label_index(fit_parts, classes)  # refuses novel slices in the fit set
    n_slices = fit_parts.slices.shape[1]
    if method == "variation":
        v = fit_variation(fit_parts, factor, smooth)
        work = copy.deepcopy(proto)
        add_variation_score(work, proto.graph.input[0].name, v)
        extra: list[str] = []

        def reference(parts: PartSlices, _outs: dict) -> np.ndarray:
            x = parts.slices.reshape(-1, *parts.slices.shape[2:])
            return v.score(x, _positions(len(parts.part_class), n_slices))

        described = {"method": "variation", "pooling": factor, "smoothing": smooth,
                     "features": "per slice position: mean and spread of the good slices' f x f pooled gray values; "
                                 "score = max of the k x k smoothed |x - mean| / (std + median std)",
                     "positions": "batch index modulo the slices per part (one part's slices in row-major order)",
                     "floor": round(v.floor, 4)}
        meaning = ("per slice: the largest smoothed deviation of its pooled gray values from the good parts' "
                   "variation model at its position, in standard deviations; unknown when >= unknown.threshold")
    else:
        work, extra = _features_graph(proto, blocks)
        _expose(work, extra)
        feats = run_outputs(work, fit_parts, extra, threads=threads)
        g = fit_gaussians([feats[n] for n in extra], labels, classes, blocks)
        add_score(work, extra, g)

        def reference(_parts: PartSlices, outs: dict) -> np.ndarray:
            return g.score([outs[n] for n in extra])

        described = {"method": "mahalanobis", "blocks": list(blocks), "shrinkage": SHRINKAGE,
                     "features": "per block: [GAP, GMP] of the IRA-Block's output (its 2x2 max-pool)"}
        meaning = ("per slice: Mahalanobis distance of the pooled block features to the nearest known class "
                   "(tied covariance), per feature dimension, averaged over blocks; unknown when >= "
                   "unknown.threshold")
    keep = [o for o in work.graph.output if not o.name.startswith(_PREFIX)]  # the contract's outputs + the score
    del work.graph.output[:]
    work.graph.output.extend(keep)
    onnx.checker.check_model(work)

    cal_parts = load_parts(calibration, limit)
    slice_label_index(cal_parts, classes)  # refuses novel slices in the calibration set
    good = np.asarray([c == "good" for c in cal_parts.part_class])
    if good.sum() < MIN_CALIBRATION_GOOD:
        raise UnknownError(f"{calibration}: {int(good.sum())} good parts; the threshold needs >= "
                           f"{MIN_CALIBRATION_GOOD} good parts (rate {rate} of them). Fix: synthesise more "
                           f"(`valve-inspect synth --mix good=1`).")
    cal = run_outputs(_with_features(work, extra), cal_parts, [UNKNOWN_OUTPUT, *extra], threads=threads)
    ref = reference(cal_parts, cal)
    rel = float(np.max(np.abs(cal[UNKNOWN_OUTPUT] - ref) / np.maximum(1.0, np.abs(ref))))
    if rel > PARITY_TOLERANCE:
        raise UnknownError(f"the graph's unknown score differs from the float64 reference by {rel:.2e} "
                           f"(> {PARITY_TOLERANCE}); nothing written")
    pm_all = part_max(cal[UNKNOWN_OUTPUT], len(cal_parts.part_class))
    pm = pm_all[good]
    threshold = calibrate(pm, rate)
    flagged = int((pm >= threshold).sum())
    defect_flagged = round(float((pm_all[~good] >= threshold).mean()), 5) if (~good).any() else None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_out = out / "model.onnx"
    tmp = onnx_out.with_suffix(".onnx.tmp")
    onnx.save(work, str(tmp))
    tmp.replace(onnx_out)
    new = dict(meta)
    new["model_file"] = "model.onnx"
    new["sha256"] = sha256_file(onnx_out)
    new["size_bytes"] = onnx_out.stat().st_size
    new["outputs"] = [o for o in meta["outputs"] if o.get("name") != UNKNOWN_OUTPUT] + [{
        "name": UNKNOWN_OUTPUT, "dtype": "float32", "shape": ["batch"], "meaning": meaning}]
    new["unknown"] = {
        **described, "output": UNKNOWN_OUTPUT, "threshold": threshold,
        "rule": "a slice is unknown when unknown >= threshold; a part is RejectUnknown when any of its slices is",
        "false_flag_rate_target": rate,
        "fit": {"frames": str(fit), "parts": len(fit_parts.part_class),
                "good_slices": int(sum(lab == "good" for labs in fit_parts.slice_labels for lab in labs))},
        "calibration": {"frames": str(calibration), "parts": len(pm_all), "good_parts": len(pm),
                        "classes": sorted(set(cal_parts.part_class)), "flagged_parts": flagged,
                        "flagged_rate": round(flagged / len(pm), 5),
                        "known_defect_parts_flagged_rate": defect_flagged,
                        "part_max_quantiles": {str(q): float(np.quantile(pm, q)) for q in (0.5, 0.9, 0.99)}},
        "parity_max_rel": rel, "seconds": round(time.perf_counter() - t0, 1),
    }
    tmpj = out / "model.json.tmp"
    tmpj.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    tmpj.replace(out / "model.json")
    return new["unknown"]


def _with_features(proto, names: Sequence[str]):
    work = copy.deepcopy(proto)
    _expose(work, names)
    return work


# ----------------------------------------------------------------------------- evaluation

def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half (the Mann-Whitney U / (n m))."""
    neg, pos = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    if not len(neg) or not len(pos):
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))


def evaluate(model: str | Path, sets: Sequence[tuple[str, str | Path]], threshold: float | None = None,
             threads: int = 0, limit: int | None = None, class_threshold: float = 0.5) -> dict:
    """Part-level rates of an attached model on synthetic folders (known and novel), per class/subtype and per folder.

    For each part: ``flagged`` (some slice's unknown score >= the threshold: RejectUnknown), ``classifier``
    (some slice's predicted defect class has p >= ``class_threshold``: a known Reject bit, the daemon's default
    thresholds), ``rejected`` (either: the part is not accepted) and ``escaped`` (neither: accepted)."""
    import onnx

    model = Path(model)
    meta = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))
    if "unknown" not in meta:
        raise UnknownError(f"{model}: model.json has no 'unknown' section. Fix: `valve-model unknown attach` first.")
    t = float(meta["unknown"]["threshold"]) if threshold is None else float(threshold)
    classes = meta["classes"]
    good_i = classes.index("good")
    proto = onnx.load(str(model))
    rows: dict[str, dict] = {}
    per_set: list[dict] = []
    scores: dict[str, list[float]] = {}
    for name, folder in sets:
        parts = load_parts(folder, limit)
        out = run_outputs(proto, parts, ["probs", UNKNOWN_OUTPUT], threads=threads)
        n = len(parts.part_class)
        pm = part_max(out[UNKNOWN_OUTPUT], n)
        probs = out["probs"].reshape(n, -1, len(classes))
        pred = probs.argmax(axis=2)
        classifier = ((pred != good_i) & (probs.max(axis=2) >= class_threshold)).any(axis=1)
        flagged = pm >= t
        kinds = ["novel" if c == "novel" else ("good" if c == "good" else "known defect") for c in parts.part_class]
        entry = {"set": name, "folder": str(folder), "parts": n}
        for kind in ("good", "known defect", "novel"):
            m = np.asarray([k == kind for k in kinds])
            if m.any():
                entry[kind] = {"parts": int(m.sum()), "flagged": round(float(flagged[m].mean()), 4),
                               "rejected": round(float((flagged | classifier)[m].mean()), 4),
                               "classifier_rejected": round(float(classifier[m].mean()), 4)}
        per_set.append(entry)
        for i in range(n):
            key = parts.part_class[i] if parts.part_class[i] != "novel" else f"novel:{parts.subtype[i]}"
            r = rows.setdefault(key, {"parts": 0, "flagged": 0, "classifier": 0, "rejected": 0, "escaped": 0})
            r["parts"] += 1
            r["flagged"] += int(flagged[i])
            r["classifier"] += int(classifier[i])
            r["rejected"] += int(flagged[i] or classifier[i])
            r["escaped"] += int(not (flagged[i] or classifier[i]))
            scores.setdefault(key, []).append(float(pm[i]))
    for r in rows.values():
        for k in ("flagged", "classifier", "rejected", "escaped"):
            r[f"{k}_rate"] = round(r[k] / r["parts"], 4)
    good = np.asarray(scores.get("good", []))
    novel = np.concatenate([np.asarray(v) for k, v in scores.items() if k.startswith("novel")]) \
        if any(k.startswith("novel") for k in scores) else np.asarray([])
    for k in scores:
        if k.startswith("novel:") and len(good):
            rows[k]["auroc_vs_good"] = round(auroc(good, np.asarray(scores[k])), 4)

    def spread(kind: str, what: str) -> dict | None:
        v = [e[kind][what] for e in per_set if kind in e]
        return {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4), "n_sets": len(v)} if v else None

    return {"threshold": t, "class_threshold": class_threshold, "classes": rows, "sets": per_set,
            "good_flagged_rate": rows.get("good", {}).get("flagged_rate"),
            "novel_flagged_rate": round(float((novel >= t).mean()), 4) if len(novel) else None,
            "auroc_novel_vs_good": round(auroc(good, novel), 4) if len(novel) and len(good) else None,
            "per_set": {f"{kind} {what}": spread(kind, what) for kind in ("good", "known defect", "novel")
                        for what in ("flagged", "rejected", "classifier_rejected")}}


def format_evaluation(s: dict) -> str:
    lines = [f"unknown threshold {s['threshold']:.4g}: good parts flagged {s['good_flagged_rate']}, novel parts "
             f"flagged {s['novel_flagged_rate']}, AUROC novel vs good {s['auroc_novel_vs_good']}",
             f"  {'class':16s} {'parts':>6s} {'flagged':>8s} {'classifier':>11s} {'rejected':>9s} {'escaped':>8s} "
             f"{'AUROC':>6s}"]
    for k, r in sorted(s["classes"].items()):
        lines.append(f"  {k:16s} {r['parts']:6d} {r['flagged_rate']:8.3f} {r['classifier_rate']:11.3f} "
                     f"{r['rejected_rate']:9.3f} {r['escaped_rate']:8.3f} {r.get('auroc_vs_good', float('nan')):6.3f}")
    lines.append("  per folder (mean +- std over folders):")
    for k, v in s["per_set"].items():
        if v:
            lines.append(f"    {k:32s} {v['mean']:.3f} +- {v['std']:.3f} ({v['n_sets']} folders)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measure: candidates side by side

CANDIDATE_BLOCKS = ((3,), (2,), (1,), (2, 3), (1, 2, 3))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def measure(model: str | Path, fit: str | Path, calibration: str | Path, known: Sequence[str | Path],
            novel: Sequence[str | Path], rate: float = DEFAULT_FALSE_FLAG_RATE, threads: int = 0,
            limit: int | None = None) -> dict:
    """Every candidate score on the same parts: max-softmax, energy, Mahalanobis on block subsets.

    Each is fitted on ``fit`` (Mahalanobis only), calibrated on ``calibration`` to ``rate`` of parts, and
    scored on the ``known`` (good parts: false flags) and ``novel`` folders; part score = max over slices."""
    import onnx

    model = Path(model)
    classes = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))["classes"]
    proto = onnx.load(str(model))
    strip_unknown(proto)  # a model with a score attached is measured as the classifier it was exported as
    n_blocks = len(block_outputs(proto))
    work, names = _features_graph(proto, list(range(1, n_blocks + 1)))
    _expose(work, names)
    outs = ["logits", *names]

    def load(folders):
        sets = [load_parts(f, limit) for f in folders]
        res = [run_outputs(work, p, outs, threads=threads) for p in sets]
        return sets, res

    (fit_parts,), (fit_out,) = load([fit])
    (cal_parts,), (cal_out,) = load([calibration])
    known_sets, known_out = load(known)
    novel_sets, novel_out = load(novel)
    labels = slice_label_index(fit_parts, classes)
    cands: dict[str, object] = {"max-softmax": None, "energy": None}
    for f, k in ((4, 3), (4, 1), (8, 1)):
        cands[f"variation f{f} k{k}"] = fit_variation(fit_parts, f, k)
    for blocks in CANDIDATE_BLOCKS:
        if max(blocks) <= n_blocks:
            cands["mahalanobis " + "+".join(map(str, blocks))] = fit_gaussians(
                [fit_out[names[b - 1]] for b in blocks], labels, classes, blocks)

    def score(name: str, g, out: dict, parts: PartSlices) -> np.ndarray:
        if isinstance(g, VariationModel):
            x = parts.slices.reshape(-1, *parts.slices.shape[2:])
            return g.score(x, _positions(len(parts.part_class), parts.slices.shape[1]))
        if name == "max-softmax":
            lg = out["logits"].astype(np.float64)
            return 1.0 - np.exp(lg.max(axis=1) - _logsumexp(lg))
        if name == "energy":
            return -_logsumexp(out["logits"].astype(np.float64))
        return g.score([out[names[b - 1]] for b in g.blocks])

    def parts_of(sets, outs_, name, g, want):
        vals = []
        for p, o in zip(sets, outs_, strict=True):
            pm = part_max(score(name, g, o, p), len(p.part_class))
            vals.append(pm[[want(c) for c in p.part_class]])
        return np.concatenate(vals) if vals else np.asarray([])

    rows = {}
    for name, g in cands.items():
        cal_pm = part_max(score(name, g, cal_out, cal_parts), len(cal_parts.part_class))
        t = calibrate(cal_pm[[c == "good" for c in cal_parts.part_class]], rate)
        good = parts_of(known_sets + novel_sets, known_out + novel_out, name, g, lambda c: c == "good")
        kdef = parts_of(known_sets, known_out, name, g, lambda c: c not in ("good", "novel"))
        nov = parts_of(novel_sets, novel_out, name, g, lambda c: c == "novel")
        rows[name] = {"threshold": t, "good_parts": len(good), "good_flagged": round(float((good >= t).mean()), 4),
                      "known_defect_flagged": round(float((kdef >= t).mean()), 4) if len(kdef) else None,
                      "novel_parts": len(nov), "novel_flagged": round(float((nov >= t).mean()), 4),
                      "auroc_novel_vs_good": round(auroc(good, nov), 4)}
    return {"rate": rate, "candidates": rows}


# ----------------------------------------------------------------------------- CLI

def _blocks(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks {text!r}: comma-separated block numbers, e.g. 1,2,3") from None
    if not out:
        raise argparse.ArgumentTypeError("--blocks: at least one block")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valve-model unknown", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attach", help="fit the score, calibrate its threshold, write model.onnx + model.json")
    a.add_argument("--model", required=True, help="model.onnx (with model.json beside it)")
    a.add_argument("--fit", required=True, help="synthetic frames of the training side (known classes)")
    a.add_argument("--calibrate", required=True, help="held-out synthetic frames, >= 100 good parts (another seed; "
                   "e.g. `valve-inspect synth --mix good=1`)")
    a.add_argument("--out", required=True, help="folder for model.onnx and model.json")
    a.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="variation (the good parts' pixels, default) or mahalanobis (pooled block features)")
    a.add_argument("--blocks", type=_blocks, default=DEFAULT_BLOCKS, help="mahalanobis: IRA-Blocks used (default 1,2,3)")
    a.add_argument("--false-flag-rate", type=float, default=DEFAULT_FALSE_FLAG_RATE,
                   help="false-flag rate of the calibration's good parts (default 0.005)")
    e = sub.add_parser("evaluate", help="part-level flag rates on known and novel synthetic folders")
    e.add_argument("--model", required=True)
    e.add_argument("--known", action="append", default=[], help="synthetic folder of known classes (repeatable)")
    e.add_argument("--novel", action="append", default=[], help="synthetic folder with novel types (repeatable)")
    e.add_argument("--threshold", type=float, default=None, help="override model.json's unknown.threshold")
    e.add_argument("--json", dest="json_out", default=None)
    m = sub.add_parser("measure", help="every candidate score side by side (max-softmax, energy, Mahalanobis)")
    m.add_argument("--model", required=True, help="model.onnx without the score")
    m.add_argument("--fit", required=True)
    m.add_argument("--calibrate", required=True)
    m.add_argument("--known", action="append", default=[])
    m.add_argument("--novel", action="append", default=[])
    m.add_argument("--false-flag-rate", type=float, default=DEFAULT_FALSE_FLAG_RATE)
    m.add_argument("--json", dest="json_out", default=None)
    for q in (a, e, m):
        q.add_argument("--threads", type=int, default=0)
        q.add_argument("--limit", type=int, default=None, help="first N parts of each folder (quick looks)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "attach":
            if not 0 < args.false_flag_rate < 1:
                raise UnknownError(f"--false-flag-rate {args.false_flag_rate}: must be in (0, 1), e.g. 0.005")
            u = attach(args.model, args.fit, args.calibrate, args.out, method=args.method, blocks=args.blocks,
                       rate=args.false_flag_rate, threads=args.threads, limit=args.limit)
            print(f"unknown score attached: {u['method']}, threshold {u['threshold']:.5g} "
                  f"({u['calibration']['flagged_parts']} of {u['calibration']['parts']} calibration parts flagged), "
                  f"parity {u['parity_max_rel']:.1e}, {u['seconds']} s -> {args.out}")
        elif args.cmd == "measure":
            r = measure(args.model, args.fit, args.calibrate, args.known, args.novel, rate=args.false_flag_rate,
                        threads=args.threads, limit=args.limit)
            print(f"candidates at a part false-flag rate of {r['rate']} on the calibration parts:")
            print(f"  {'score':22s} {'good flagged':>12s} {'known defect flagged':>20s} {'novel flagged':>13s} "
                  f"{'AUROC':>6s}")
            for name, row in r["candidates"].items():
                print(f"  {name:22s} {row['good_flagged']:12.3f} {row['known_defect_flagged'] or 0:20.3f} "
                      f"{row['novel_flagged']:13.3f} {row['auroc_novel_vs_good']:6.3f}")
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        else:
            sets = [("known", k) for k in args.known] + [("novel", n) for n in args.novel]
            if not sets:
                raise UnknownError("give at least one --known or --novel folder")
            s = evaluate(args.model, sets, threshold=args.threshold, threads=args.threads, limit=args.limit)
            print(format_evaluation(s))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    except UnknownError as exc:
        print(f"valve-model unknown: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
