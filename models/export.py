"""``valve-model export``: IRA-CNN -> ONNX with Grad-CAM++ inside the graph, plus model.json.

The graph (docs/onnx-contract.md):

    slices   uint8 (B, 1, S, S), gray values 0..255, B dynamic, S = 192
    normalise (x/255 - 0.5) / 0.25                     # IRACNN.normalise, inside the graph
    A = features(x)                                    # (B, C, 24, 24)
    logits, c, g = classifier.forward_with_grad(A)     # c = argmax, g = d logit_c / d A, plain ops
    raw = weighted_map("gradcam++", A, g)              # (B, 24, 24), models.saliency
    saliency = scale_map(raw, S)                       # bilinear to (B, S, S), min-max per slice
    outputs: logits (B, K), probs = softmax(logits) (B, K), saliency (B, S, S) in [0, 1]

There is no autograd in the graph: the head is piecewise linear, so its gradient is the
explicit backprop of :meth:`IRAHead.forward_with_grad`. The graph and the autograd reference
(:func:`models.saliency.saliency`) share :func:`weighted_map` and :func:`scale_map`.

Export writes the graph to a temporary file beside ``--out``, checks it with ONNX Runtime
(CPUExecutionProvider) against the autograd reference, and only when every figure is within
1e-4 moves it to ``--out`` and writes ``<stem>.json`` beside it (atomically). A failed check
leaves an existing model.onnx/model.json pair untouched.

Exporter: the TorchScript exporter (``dynamo=False``) is the default for opset 17..20. In
torch 2.13 it exports this graph at exactly the requested opset, in about a third of the time
and with a smaller graph; the dynamo exporter cannot produce opset 17 (it builds opset 18 and
its down-conversion to 17 fails on a reduction's axes input). Opsets above 20, ``--exporter
dynamo``, or a torch whose TorchScript exporter fails or is gone use ``dynamo=True`` (opset >= 18).

After export the file gets the contract's static shapes and its global average pools split into
two means (:func:`models.onnx_graph.split_spatial_means`, for ONNX Runtime's float32 accuracy).

Exit codes: 0 exported and checked; 1 parity check failed; 2 bad input (missing run,
unreadable config or metrics, unsupported opset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.checkpoint import resolve_weights
from models.errors import ValveModelError
from models.ira_cnn import IRACNN, ModelConfig, segmented_classes
from models.onnx_graph import split_spatial_means
from models.saliency import saliency, scale_map, weighted_map
from service.infer import INPUT_NAME, OUTPUT_NAMES, sha256_file  # the runtime owns the graph contract
from service.infer import MODEL_FORMAT as FORMAT

BATCH_DIM = "batch"
DEFAULT_OPSET = 17
MIN_OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest implemented opset in torch 2.13
EXPORTERS = ("auto", "torchscript", "dynamo")
#: max-abs bar for logits and saliency, ONNX Runtime vs the torch autograd reference
TOLERANCE = 1e-4
#: batch sizes the check runs the graph at, besides the whole check batch (dynamic batch)
SMALL_BATCHES = (1, 3)
STRUCTURED = ("gray", "disc", "line", "gradient")
CHECK_SEED = 0


class ExportError(ValveModelError):
    """A problem the user can fix (missing run, bad metrics path, unsupported opset); exit 2."""

    exit_code = 2


class ParityError(ExportError):
    """ONNX Runtime and the torch reference disagree beyond the tolerance; exit 1."""

    exit_code = 1


class SaliencyGraph(nn.Module):
    """What the ONNX graph computes: uint8 slices -> (logits, probs, Grad-CAM++ saliency).

    Wraps an :class:`IRACNN` in eval mode; the saliency target is each slice's argmax class.
    """

    def __init__(self, model: IRACNN) -> None:
        super().__init__()
        self.model = model
        self.size = model.config.input_size

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acts = self.model.features(slices)  # (B, C, 24, 24); normalise is the model's first step
        logits, _, grads = self.model.classifier.forward_with_grad(acts)  # (B, K), _, (B, C, 24, 24)
        raw = weighted_map("gradcam++", acts, grads)  # (B, 24, 24)
        sal = scale_map(raw, self.size)  # (B, S, S) in [0, 1]
        return logits, torch.softmax(logits, dim=1), sal


@dataclass(frozen=True)
class ExportResult:
    exporter: str
    opset: int
    rewrites: int
    seconds: float


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' harmless chatter; anything else still reaches the user.

    Harmless here: the TorchScript exporter's DeprecationWarning; the TracerWarning for
    ``float(h * w)`` in the GAP head's gradient (the feature map's side is fixed by the input
    size, so the constant is right); the dynamo exporter's progress lines, its "torchvision is
    not installed" notes and its FutureWarnings from torch.export internals.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def declare_io_shapes(model_proto, size: int, num_classes: int) -> None:
    """Write the contract's shapes on the graph's input and outputs; in place.

    The exporters leave symbolic names on the saliency's spatial axes (e.g.
    ``Wheresaliency_dim_1``); the contract fixes them to S, with only the batch axis dynamic.
    """
    shapes = {INPUT_NAME: (BATCH_DIM, 1, size, size), "logits": (BATCH_DIM, num_classes),
              "probs": (BATCH_DIM, num_classes), "saliency": (BATCH_DIM, size, size)}
    for vi in [*model_proto.graph.input, *model_proto.graph.output]:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        want = shapes[vi.name]
        if len(dims) != len(want):
            raise ExportError(f"the exported {vi.name!r} has rank {len(dims)}, the contract says {len(want)}")
        for d, w in zip(dims, want, strict=True):
            if isinstance(w, str):
                d.dim_param = w
            else:
                d.dim_value = w


def _finish_graph(path: Path, size: int, num_classes: int) -> tuple[int, int]:
    """Post-process a freshly exported file: contract shapes, split spatial means, check; (opset, rewrites)."""
    import onnx

    model_proto = onnx.load(str(path))
    opset = next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
    declare_io_shapes(model_proto, size, num_classes)
    rewrites = split_spatial_means(model_proto)
    onnx.save(model_proto, str(path))
    del model_proto
    onnx.checker.check_model(str(path))
    return opset, rewrites


def check_opset(opset: int, exporter: str = "auto") -> None:
    """Raise :class:`ExportError` unless ``exporter`` can write ``opset`` and the contract accepts it."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the contract needs opset {MIN_OPSET} or newer")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ExportError(f"the TorchScript exporter stops at opset {TORCHSCRIPT_MAX_OPSET}: "
                          f"use --exporter dynamo for opset {opset}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter starts at opset {DYNAMO_MIN_OPSET}: pass --opset "
                          f"{DYNAMO_MIN_OPSET} or use --exporter torchscript for opset {opset}")


def export_onnx(model: IRACNN, path: str | Path, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> ExportResult:
    """Write ``SaliencyGraph(model)`` to ``path`` as one self-contained ONNX file, batch dynamic.

    ``exporter``: ``torchscript`` (dynamo=False), ``dynamo`` (dynamo=True, opset >= 18) or
    ``auto`` (TorchScript up to opset 20, dynamo above or where TorchScript fails).
    Returns the exporter used and the opset actually written.
    """
    check_opset(opset, exporter)
    path = Path(path)
    model = model.eval()
    graph = SaliencyGraph(model).eval()
    size = model.config.input_size
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(CHECK_SEED))
    order = ["torchscript", "dynamo"] if exporter == "auto" and opset <= TORCHSCRIPT_MAX_OPSET else \
        ["dynamo"] if exporter == "auto" else [exporter]
    errors = []
    for kind in order:
        t0 = time.perf_counter()
        try:
            with _quiet_exporter(), torch.no_grad():
                if kind == "torchscript":
                    torch.onnx.export(
                        graph, (example,), str(path), dynamo=False, opset_version=opset,
                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                        dynamic_axes={n: {0: BATCH_DIM} for n in (INPUT_NAME, *OUTPUT_NAMES)},
                        do_constant_folding=True)
                else:
                    dyn_opset = max(opset, DYNAMO_MIN_OPSET)
                    torch.onnx.export(
                        graph, (example,), str(path), dynamo=True, opset_version=dyn_opset,
                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_DIM, min=1, max=4096)}},
                        external_data=False, verbose=False, optimize=True)
        except Exception as exc:  # report every exporter's failure together
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        finally:
            model.eval()  # torch.onnx.export restores the wrapper's mode; stay in eval whatever happened
        opset_written, rewrites = _finish_graph(path, size, model.config.num_classes)
        return ExportResult(exporter=kind, opset=opset_written, rewrites=rewrites,
                            seconds=time.perf_counter() - t0)
    raise ExportError("ONNX export failed:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------- parity


def structured_slices(size: int) -> torch.Tensor:
    """A few valve-like test slices, (4, 1, S, S) uint8: flat gray, a dark disc on bright
    (dirt), a dark line on bright (scratch), a horizontal gradient."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    gray = torch.full((size, size), 128.0)
    disc = torch.where((yy - 0.4 * size) ** 2 + (xx - 0.6 * size) ** 2 < (0.08 * size) ** 2,
                       torch.tensor(40.0), torch.tensor(200.0))
    line = torch.where((yy - 0.3 * xx - 0.3 * size).abs() < 2.0, torch.tensor(30.0), torch.tensor(190.0))
    grad = xx * (255.0 / (size - 1))
    out = torch.stack([gray, disc, line, grad]).round().clamp(0, 255).to(torch.uint8)
    return out.unsqueeze(1)


def check_slices(n_random: int, size: int, seed: int = CHECK_SEED) -> torch.Tensor:
    """The parity check's inputs: ``n_random`` seeded uniform uint8 slices, then the structured ones."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 256, (n_random, 1, size, size), dtype=torch.uint8, generator=g)
    return torch.cat([rand, structured_slices(size)])


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, NaN (so that it fails every <= test) when either side has a NaN."""
    if a.size == 0:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("nan") if np.isnan(d).any() else float(d.max())


def reference_outputs(model: IRACNN, x: torch.Tensor, class_idx: torch.Tensor | None = None,
                      chunk: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The torch autograd reference (:func:`models.saliency.saliency`): (logits, saliency) numpy.

    Runs in chunks with the weights frozen, so autograd keeps only the head's graph.
    """
    req = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        logits, maps = [], []
        for i in range(0, x.shape[0], chunk):
            ci = None if class_idx is None else class_idx[i:i + chunk]
            lo, sa = saliency(model, x[i:i + chunk], "gradcam++", class_idx=ci)
            logits.append(lo.numpy())
            maps.append(sa.numpy())
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
    return np.concatenate(logits), np.concatenate(maps)


def ort_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime session on the CPU provider (default graph optimisations, as deployed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _per_slice_max_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N,) max |a - b| per slice in float64; NaN where either side has a NaN."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(a.shape[0], -1)
    return np.where(np.isnan(d).any(axis=1), np.nan, np.nanmax(d, axis=1, initial=0.0))


def _compare(model: IRACNN, x: torch.Tensor, logits: np.ndarray, sal: np.ndarray, ref_logits: np.ndarray,
             ref_sal: np.ndarray) -> dict:
    """One ORT run against the reference: per-slice logits and saliency max-abs, classes, flips.

    Where the argmax classes agree the graph's map is compared with the reference's own map;
    where a near-tie flipped the class, with the reference recomputed for the graph's class.
    """
    cls, ref_cls = logits.argmax(1), ref_logits.argmax(1)
    flipped = np.flatnonzero(cls != ref_cls)
    target = ref_sal.copy()
    if flipped.size:
        _, own = reference_outputs(model, x[flipped], class_idx=torch.from_numpy(cls[flipped]))
        target[flipped] = own
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    return {"logits": _per_slice_max_abs(logits, ref_logits), "saliency": _per_slice_max_abs(sal, target),
            "agree": cls == ref_cls, "flipped": flipped, "gaps": top2[:, 1] - top2[:, 0]}


def _raw_map_conditioning(model: IRACNN, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per slice (range, max |value|) of the raw 24x24 Grad-CAM++ map, by autograd.

    Min-max scaling divides by the range, so a range far below the values' magnitude turns
    float32 rounding into visible saliency differences; reported when the check fails.
    """
    model.eval()
    with torch.no_grad():
        acts = model.features(x)
    with torch.enable_grad():
        leaf = acts.detach().requires_grad_(True)
        out = model.head(leaf)
        (grads,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), leaf)
    raw = weighted_map("gradcam++", acts, grads).flatten(1)
    return ((raw.amax(1) - raw.amin(1)).numpy(), raw.abs().amax(1).numpy())


def parity_check(model: IRACNN, onnx_path: str | Path, n_random: int = 8, seed: int = CHECK_SEED,
                 tol: float | None = None) -> dict:
    """ONNX Runtime (CPU) vs the torch autograd reference on the check slices; the figures as a dict.

    Logits are compared on every slice. Saliency is compared where the two argmax classes agree
    (the reference's own Grad-CAM++, ``saliency_max_abs``); where a near-tie flips the class, the
    graph's map is compared with the reference computed for the graph's class
    (``saliency_max_abs_flipped``), so no slice goes unchecked. The graph also runs at batch sizes
    1 and 3 (dynamic batch), each compared the same way. ``passed`` is true when logits, probs and
    every saliency figure are within ``tol`` max-abs and the maps lie in [0, 1].
    """
    import onnxruntime as ort

    tol = TOLERANCE if tol is None else tol
    size = model.config.input_size
    x = check_slices(n_random, size, seed)
    n = x.shape[0]
    sess = ort_session(onnx_path)
    t0 = time.perf_counter()
    logits, probs, sal = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    ort_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_logits, ref_sal = reference_outputs(model, x)
    ref_s = time.perf_counter() - t0
    ref_probs = torch.softmax(torch.from_numpy(ref_logits), dim=1).numpy()
    full = _compare(model, x, logits, sal, ref_logits, ref_sal)
    agree, flipped = full["agree"], full["flipped"]

    def worst(v: np.ndarray) -> float:
        return float("nan") if np.isnan(v).any() else float(v.max(initial=0.0))

    # dynamic batch: the first slices again at batch sizes 1 and 3, against the same reference
    small = {}
    for b in SMALL_BATCHES:
        if b >= n:
            continue
        lo_b, _, sa_b = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x[:b].numpy()})
        c = _compare(model, x[:b], lo_b, sa_b, ref_logits[:b], ref_sal[:b])
        small[str(b)] = {"logits_max_abs": worst(c["logits"]), "saliency_max_abs": worst(c["saliency"]),
                         "class_agreement": int(c["agree"].sum())}

    figures = {
        "provider": "CPUExecutionProvider",
        "onnxruntime": ort.__version__,
        "reference": "models.saliency.saliency (torch autograd, float32)",
        "inputs": {"random_uint8": n_random, "seed": seed, "structured": list(STRUCTURED), "total": n},
        "batch_sizes": [n, *(int(b) for b in small)],
        "tolerance": tol,
        "logits_max_abs": worst(full["logits"]),
        "probs_max_abs": _max_abs(probs, ref_probs),
        "saliency_max_abs": worst(full["saliency"][agree]),
        "class_agreement": int(agree.sum()),
        "class_total": n,
        "flipped_slices": [int(i) for i in flipped],
        "flipped_top2_gap": [float(full["gaps"][i]) for i in flipped],
        "saliency_max_abs_flipped": worst(full["saliency"][flipped]),
        "per_slice": {"logits_max_abs": [float(v) for v in full["logits"]],
                      "saliency_max_abs": [float(v) for v in full["saliency"]]},
        "saliency_range": [float(np.min(sal)), float(np.max(sal))],
        "small_batches": small,
        "ort_seconds": round(ort_s, 3),
        "reference_seconds": round(ref_s, 3),
    }
    checked = [figures["logits_max_abs"], figures["probs_max_abs"], figures["saliency_max_abs"],
               figures["saliency_max_abs_flipped"]]
    checked += [v for s in small.values() for v in (s["logits_max_abs"], s["saliency_max_abs"])]
    in_range = figures["saliency_range"][0] >= 0.0 and figures["saliency_range"][1] <= 1.0
    figures["passed"] = bool(all(v <= tol for v in checked) and in_range)  # NaN fails <=
    if not figures["passed"]:
        bad = np.flatnonzero(~(full["saliency"] <= tol))
        if bad.size:
            rng, mag = _raw_map_conditioning(model, x[bad])
            figures["failing_saliency_slices"] = [
                {"slice": int(i), "saliency_max_abs": float(full["saliency"][i]), "raw_range": float(r),
                 "raw_abs_max": float(m)} for i, r, m in zip(bad, rng, mag, strict=True)]
    return figures


def format_parity(f: dict) -> str:
    lines = [
        f"parity (ONNX Runtime CPU vs torch autograd, {f['inputs']['total']} slices: "
        f"{f['inputs']['random_uint8']} random seed {f['inputs']['seed']} + {len(f['inputs']['structured'])} "
        f"structured; batch sizes {', '.join(map(str, f['batch_sizes']))}):",
        f"  logits   max-abs {f['logits_max_abs']:.3g}",
        f"  probs    max-abs {f['probs_max_abs']:.3g}",
        f"  saliency max-abs {f['saliency_max_abs']:.3g} over the {f['class_agreement']} slices whose classes agree",
        f"  class agreement  {f['class_agreement']}/{f['class_total']}",
    ]
    if f["flipped_slices"]:
        gaps = ", ".join(f"{g:.2g}" for g in f["flipped_top2_gap"])
        lines.append(f"  near-ties flipped at slices {f['flipped_slices']} (top-2 logit gaps {gaps}); their "
                     f"saliency vs the reference for the graph's class: max-abs {f['saliency_max_abs_flipped']:.3g}")
    for b, s in f["small_batches"].items():
        lines.append(f"  batch {b}: logits {s['logits_max_abs']:.3g}, saliency {s['saliency_max_abs']:.3g}, "
                     f"classes {s['class_agreement']}/{b}")
    for s in sorted(f.get("failing_saliency_slices", []), key=lambda s: -s["saliency_max_abs"])[:5]:
        lines.append(f"  slice {s['slice']}: saliency off by {s['saliency_max_abs']:.3g}; its raw Grad-CAM++ map "
                     f"spans {s['raw_range']:.3g} at values up to {s['raw_abs_max']:.3g} (min-max scaling "
                     "multiplies float32 rounding by 1/range)")
    lines.append(f"  tolerance {f['tolerance']:g}: {'PASS' if f['passed'] else 'FAIL'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- model.json


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temporary file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the daemon may run as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def load_run(run: str | Path) -> tuple[IRACNN, Path, Path | None, dict | None]:
    """A run directory or a .safetensors file -> (model in eval mode, weights, run dir, config.json).

    config.json is looked for beside the weights; it is optional, but when present its "model"
    section must describe the same model as the weights' own metadata.
    """
    from models.checkpoint import load

    run = Path(run)
    if not run.exists():
        raise ExportError(f"no run directory or checkpoint at {run}: pass --run with a directory written by "
                          "'valve-model train' (holding model.safetensors) or a .safetensors file")
    try:
        weights = resolve_weights(run)
        model = load(weights)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    except Exception as exc:  # a corrupt or foreign file: safetensors, JSON or state-dict errors
        raise ExportError(f"cannot load {run}: {type(exc).__name__}: {exc}") from exc
    run_dir = run if run.is_dir() else run.parent
    cfg_path = run_dir / "config.json"
    run_config = _read_json(cfg_path, "run config") if cfg_path.is_file() else None
    if run_config and "model" in run_config:
        try:
            declared = ModelConfig.from_dict(run_config["model"]).to_dict()
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{cfg_path}: its \"model\" section is not a valid ModelConfig: {exc}") from exc
        if declared != model.config.to_dict():
            mine = model.config.to_dict()
            diff = {k: (declared.get(k), mine.get(k)) for k in sorted(declared.keys() | mine.keys())
                    if declared.get(k) != mine.get(k)}  # a key either side lacks shows as None there
            raise ExportError(f"{cfg_path} describes a different model than {weights} (config.json vs weights: "
                              f"{diff}): export the matching checkpoint or fix config.json")
    return model, weights, run_dir if run_config is not None else None, run_config


def _versions() -> dict:
    import onnx
    import onnxruntime

    from service import __version__

    return {"valve_inspect": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}


def build_metadata(model: IRACNN, onnx_path: Path, result: ExportResult, parity: dict, weights: Path,
                   run_config: dict | None, metrics: dict | None, metrics_path: Path | None) -> dict:
    """The model.json document (schema: docs/onnx-contract.md)."""
    cfg = model.config
    s, k = cfg.input_size, cfg.num_classes
    segmented = segmented_classes(cfg.classes)
    return {
        "format": FORMAT,
        "model_file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "classes": list(cfg.classes),
        "segmented_classes": list(segmented),
        "segmented_mask": [c in segmented for c in cfg.classes],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [BATCH_DIM, 1, s, s], "layout": "NCHW",
                  "range": [0, 255],
                  "normalisation": "inside the graph: (x / 255 - 0.5) / 0.25"},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [BATCH_DIM, k]},
            {"name": "probs", "dtype": "float32", "shape": [BATCH_DIM, k], "meaning": "softmax(logits)"},
            {"name": "saliency", "dtype": "float32", "shape": [BATCH_DIM, s, s], "range": [0.0, 1.0],
             "method": "gradcam++", "target": "argmax(logits) per slice",
             "scaling": "bilinear (align_corners=False) from the feature map, then min-max per slice; "
                        "a flat map is all zeros"},
        ],
        "preset": cfg.preset,
        "attention": cfg.attention,
        "model_config": cfg.to_dict(),
        "opset": result.opset,
        "exporter": result.exporter,
        "graph_rewrites": {"split_spatial_reduce_mean": result.rewrites},
        "source": {"weights": str(weights.resolve()), "weights_sha256": sha256_file(weights)},
        "training": None if run_config is None else {
            "data": run_config.get("data"), "train": run_config.get("train"),
            # a run continued with --resume: from which epoch, with which command (train.command is the first)
            **({"resumed": run_config["resumed"]} if run_config.get("resumed") else {})},
        # the figures, not the PR curves' point lists (those stay in the report's metrics.json)
        "evaluation": None if metrics is None else {
            "path": str(metrics_path), "metrics": {k: v for k, v in metrics.items() if k != "pr_curves"}},
        "parity": parity,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # UTC, ISO 8601
    }


# --------------------------------------------------------------------------- the command


def export_run(run: str | Path, out: str | Path, metrics: str | Path | None = None, opset: int = DEFAULT_OPSET,
               batch_check: int = 8, exporter: str = "auto", log=print) -> dict:
    """Export a run to ``out`` and ``out.with_suffix('.json')``; returns the model.json dict.

    Raises :class:`ExportError` for bad input and :class:`ParityError` when the check fails
    (then nothing is written to ``out``).
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out} must end in .onnx (model.json is written beside it with the same stem)")
    if batch_check < 1:
        raise ExportError(f"--batch-check must be at least 1, not {batch_check}")
    check_opset(opset, exporter)
    if metrics is not None and not Path(metrics).is_file():
        raise ExportError(f"--metrics {metrics} does not exist: pass the metrics.json written by "
                          "'valve-model evaluate', or leave --metrics out")
    model, weights, run_dir, run_config = load_run(run)
    metrics_path = Path(metrics) if metrics is not None else (run_dir or weights.parent) / "report" / "metrics.json"
    metrics_data = _read_json(metrics_path, "metrics") if metrics_path.is_file() else None
    if metrics_data is None:
        metrics_path = None
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out.with_suffix(".json")
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.onnx")
    cfg = model.config
    log(f"exporting {weights} ({cfg.preset}, attention {cfg.attention}, classes {', '.join(cfg.classes)})")
    try:
        result = export_onnx(model, tmp, opset=opset, exporter=exporter)
        log(f"wrote the graph with the {result.exporter} exporter, opset {result.opset}, "
            f"{tmp.stat().st_size / 1e6:.1f} MB, in {result.seconds:.1f} s "
            f"({result.rewrites} global average pools split for ONNX Runtime's accuracy)")
        parity = parity_check(model, tmp, n_random=batch_check)
        log(format_parity(parity))
        if not parity["passed"]:
            raise ParityError(
                f"parity check failed: ONNX Runtime differs from the torch autograd reference by more than "
                f"{parity['tolerance']:g} (logits {parity['logits_max_abs']:.3g}, saliency "
                f"{parity['saliency_max_abs']:.3g}), so {out} was not written and any model there is "
                "unchanged. The figures above name the output and slices; docs/onnx-contract.md "
                "(Parity check) lists the known causes")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    meta = build_metadata(model, out, result, parity, weights, run_config, metrics_data, metrics_path)
    write_json_atomic(meta_path, meta)
    log(f"wrote {out} (sha256 {meta['sha256'][:16]}...) and {meta_path}")
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="valve-model export",
        description="Export a trained IRA-CNN to ONNX with Grad-CAM++ inside the graph, check it against the "
                    "torch autograd reference, and write model.json beside it.")
    p.add_argument("--run", required=True, type=Path,
                   help="run directory written by 'valve-model train', or a .safetensors checkpoint")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write; <stem>.json goes beside it")
    p.add_argument("--metrics", type=Path, default=None,
                   help="evaluation metrics.json to embed (default: RUN/report/metrics.json when present)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} or newer "
                   f"(default {DEFAULT_OPSET})")
    p.add_argument("--batch-check", type=int, default=8, metavar="N",
                   help="random uint8 slices in the parity check, besides 4 structured ones (default 8)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch.onnx exporter: torchscript (dynamo=False, opset 17-20), dynamo (opset >= 18), "
                        "auto (torchscript where it can, default)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        export_run(args.run, args.out, metrics=args.metrics, opset=args.opset, batch_check=args.batch_check,
                   exporter=args.exporter)
    except ExportError as exc:
        print(f"valve-model export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
