"""Graph surgery on an exported model: the IRA-Blocks' outputs, their pooled features, the Mahalanobis and the
variation model's nodes and the ``unknown`` (B,) output, and their removal. The classifier's own nodes and
weights are never touched; every added name starts with ``unknown_score/``."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from models.unknown.frames import UnknownError
from models.unknown.scores import PROFILE_OFFSET, Gaussians, VariationModel, pooled_blur_matrix, shifted
from service.infer import UNKNOWN_OUTPUT  # the runtime owns the graph contract

_PREFIX = "unknown_score/"


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
    accuracy on one 2-axis mean is worse, models.onnx_graph.split_spatial_means)."""
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


def add_variation_score(proto, input_name: str, v: VariationModel) -> None:
    """Append the variation model's nodes and the ``unknown`` (B,) output. The slice's position is its batch
    index modulo the number of positions: the runtime sends one part's slices in row-major order."""
    from onnx import TensorProto, helper, numpy_helper

    p = _PREFIX + "var/"
    n_pos = v.mean.shape[0]
    # (S, T, h, w): the model at each of the T = (2t+1)^2 tolerated shifts (T = 1 without a tolerance)
    inits = [numpy_helper.from_array(shifted(v.mean, v.tolerance).astype(np.float32), p + "mean"),
             numpy_helper.from_array(shifted(1.0 / v.scale, v.tolerance).astype(np.float32), p + "inv_scale"),
             numpy_helper.from_array(np.asarray(0, np.int64), p + "zero"),
             numpy_helper.from_array(np.asarray(1, np.int64), p + "one"),
             numpy_helper.from_array(np.asarray(n_pos, np.int64), p + "n_pos")]
    nodes = [helper.make_node("Cast", [input_name], [p + "x"], to=TensorProto.FLOAT)]                # (B, 1, H, W)
    x = p + "x"
    nodes.append(helper.make_node("AveragePool", [x], [p + "pool"], kernel_shape=[v.factor] * 2,
                                  strides=[v.factor] * 2))                                              # (B, 1, h, w)
    pooled = p + "pool"
    opset = _opset(proto)
    if v.shading == "profile":
        # log(pool + offset), minus the row medians (axis 3), then minus the column medians (axis 2); a median is the
        # last (odd length) or the mean of the last two (even) of TopK's n // 2 + 1 largest, sorted
        inits.append(numpy_helper.from_array(np.asarray(PROFILE_OFFSET, np.float32), p + "offset"))
        nodes += [helper.make_node("Add", [pooled, p + "offset"], [p + "lifted"]),
                  helper.make_node("Log", [p + "lifted"], [p + "log"])]
        cur = p + "log"
        for axis, n, tag in ((3, v.mean.shape[2], "row"), (2, v.mean.shape[1], "col")):
            k, m = n // 2 + 1, 1 if n % 2 else 2
            q = f"{p}{tag}_"
            inits += [numpy_helper.from_array(np.asarray([k], np.int64), q + "k"),
                      numpy_helper.from_array(np.asarray([k - m], np.int64), q + "start"),
                      numpy_helper.from_array(np.asarray([k], np.int64), q + "end"),
                      numpy_helper.from_array(np.asarray([axis], np.int64), q + "axis")]
            nodes += [helper.make_node("TopK", [cur, q + "k"], [q + "top", q + "top_index"], axis=axis, largest=1,
                                       sorted=1),
                      helper.make_node("Slice", [q + "top", q + "start", q + "end", q + "axis"], [q + "middle"])]
            _reduce(nodes, inits, "ReduceMean", q + "middle", [axis], 1, q + "median", opset)
            nodes.append(helper.make_node("Sub", [cur, q + "median"], [q + "removed"]))
            cur = q + "removed"
        pooled = cur
    elif v.highpass:
        # pool(x - GaussianBlur(x)) = pool(x) - M_h x M_w^T with M = pooling @ blur (reflect-101 borders folded in):
        # the same linear map as the reference's blur-then-pool, as two small MatMuls instead of two 97-tap
        # convolutions at full resolution (those cost about a fifth of the classifier's time per frame)
        h, w = v.mean.shape[1:]
        inits += [numpy_helper.from_array(pooled_blur_matrix(h * v.factor, v.factor, v.highpass).astype(np.float32),
                                          p + "blur_h"),                                               # (h, H)
                  numpy_helper.from_array(pooled_blur_matrix(w * v.factor, v.factor, v.highpass).T.astype(np.float32),
                                          p + "blur_wt")]                                              # (W, w)
        nodes += [helper.make_node("MatMul", [p + "blur_h", x], [p + "blur_rows"]),                   # (B, 1, h, W)
                  helper.make_node("MatMul", [p + "blur_rows", p + "blur_wt"], [p + "blur_pooled"]),  # (B, 1, h, w)
                  helper.make_node("Sub", [p + "pool", p + "blur_pooled"], [p + "pooled"])]
        pooled = p + "pooled"
    nodes += [
        helper.make_node("Shape", [input_name], [p + "shape"]),
        helper.make_node("Gather", [p + "shape", p + "zero"], [p + "batch"], axis=0),                 # B
        helper.make_node("Range", [p + "zero", p + "batch", p + "one"], [p + "index"]),               # 0..B-1
        helper.make_node("Mod", [p + "index", p + "n_pos"], [p + "position"]),
        helper.make_node("Gather", [p + "mean", p + "position"], [p + "mean_b"], axis=0),             # (B, 1, h, w)
        helper.make_node("Gather", [p + "inv_scale", p + "position"], [p + "inv_b"], axis=0),
        helper.make_node("Sub", [pooled, p + "mean_b"], [p + "diff"]),
        helper.make_node("Abs", [p + "diff"], [p + "abs"]),
        helper.make_node("Mul", [p + "abs", p + "inv_b"], [p + "dev"]),                               # (B, T, h, w)
    ]
    dev = p + "dev"
    if v.tolerance:  # the best-fitting shift
        dev = _reduce(nodes, inits, "ReduceMin", dev, [1], 1, p + "dev_min", opset)           # (B, 1, h, w)
    if v.smooth > 1:
        r = v.smooth // 2
        nodes.append(helper.make_node("AveragePool", [dev], [p + "smooth"], kernel_shape=[v.smooth] * 2,
                                      strides=[1, 1], pads=[r] * 4, count_include_pad=0))
        dev = p + "smooth"
    nodes.append(helper.make_node("ReduceMax", [dev], [UNKNOWN_OUTPUT], axes=[1, 2, 3], keepdims=0)
                 if opset < 18 else
                 helper.make_node("ReduceMax", [dev, p + "axes"], [UNKNOWN_OUTPUT], keepdims=0))
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.asarray([1, 2, 3], np.int64), p + "axes"))
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    proto.graph.output.append(helper.make_tensor_value_info(UNKNOWN_OUTPUT, TensorProto.FLOAT, ["batch"]))


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


def _with_features(proto, names: Sequence[str]):
    work = copy.deepcopy(proto)
    _expose(work, names)
    return work
