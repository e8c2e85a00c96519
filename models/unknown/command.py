"""``valve-model unknown``: attach (fit, calibrate, parity-check, write), evaluate (part-level rates on known and
novel folders) and measure (every candidate score side by side), then the parser and main."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.unknown.frames import (
    PartSlices,
    UnknownError,
    _positions,
    load_parts,
    run_outputs,
    slice_label_index,
)
from models.unknown.graph import (
    _PREFIX,
    _expose,
    _features_graph,
    _with_features,
    add_score,
    add_variation_score,
    block_outputs,
    strip_unknown,
)
from models.unknown.scores import (
    PROFILE_OFFSET,
    SHADINGS,
    SHRINKAGE,
    VARIATION_FACTOR,
    VARIATION_HIGHPASS,
    VARIATION_SHADING,
    VARIATION_SMOOTH,
    VARIATION_TOLERANCE,
    VariationModel,
    auroc,
    calibrate,
    fit_gaussians,
    fit_variation,
    part_max,
)
from service.infer import UNKNOWN_OUTPUT, sha256_file  # the runtime owns the graph contract

#: the blocks whose pooled features the score uses, by default (1-based, in graph order)
DEFAULT_BLOCKS = (1, 2, 3)
#: the part-level false-flag rate the threshold is calibrated to on held-out parts
DEFAULT_FALSE_FLAG_RATE = 0.005
PARITY_TOLERANCE = 1e-4  # relative, ONNX Runtime vs the float64 numpy reference
#: good parts the calibration needs at least (0.5 % of 100 parts is no part at all: the largest score + eps)
MIN_CALIBRATION_GOOD = 100
METHODS = ("variation", "mahalanobis")
DEFAULT_METHOD = "variation"


def attach(model: str | Path, fit: str | Path, calibration: str | Path, out: str | Path, *,
           method: str = DEFAULT_METHOD, blocks: Sequence[int] = DEFAULT_BLOCKS,
           rate: float = DEFAULT_FALSE_FLAG_RATE, factor: int = VARIATION_FACTOR, smooth: int = VARIATION_SMOOTH,
           highpass: float = VARIATION_HIGHPASS, tolerance: int = VARIATION_TOLERANCE,
           shading: str = VARIATION_SHADING, threads: int = 0, limit: int | None = None) -> dict:
    """Fit the score on ``fit``, calibrate its threshold on ``calibration``'s good parts, write ``out``/model.onnx +
    model.json. ``method``: "variation" (the pixels' variation model of good parts) or "mahalanobis" (pooled block
    features); ``shading`` (variation): "profile" or "highpass" (scores.SHADINGS). Nothing is written unless
    the graph's score agrees with the float64 reference (PARITY_TOLERANCE)."""
    import onnx

    if method not in METHODS:
        raise UnknownError(f"method {method!r}: one of {', '.join(METHODS)}")
    if tolerance < 0:
        raise UnknownError(f"--tolerance {tolerance}: a number of pooled px, 0 or more (0 = pixel to pixel; "
                           f"default {VARIATION_TOLERANCE})")
    if shading not in SHADINGS:
        raise UnknownError(f"--shading {shading!r}: one of {', '.join(SHADINGS)} (default {VARIATION_SHADING})")
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
        v = fit_variation(fit_parts, factor, smooth, highpass, tolerance, shading)
        work = copy.deepcopy(proto)
        add_variation_score(work, proto.graph.input[0].name, v)
        extra: list[str] = []

        def reference(parts: PartSlices, _outs: dict) -> np.ndarray:
            x = parts.slices.reshape(-1, *parts.slices.shape[2:])
            return v.score(x, _positions(len(parts.part_class), n_slices))

        residual = (f"log(f x f pooled gray value + {PROFILE_OFFSET:g}) minus its row medians, then minus its column "
                    "medians (the cylinder's shading profile)" if shading == "profile" else
                    "f x f pooled high-pass residual (slice - Gaussian low-pass, reflect-101 borders)")
        described = {"method": "variation", "pooling": factor, "smoothing": smooth, "shading": shading,
                     **({"highpass_sigma": highpass} if shading == "highpass" else {"profile_offset": PROFILE_OFFSET}),
                     "tolerance_px": tolerance,
                     "features": f"per slice position: mean and spread of the good slices' {residual}; score = max "
                                 "of the k x k smoothed min over shifts within +-tolerance pooled px of "
                                 "|x - mean| / (std + median std), the spread fitted on the best-shift residuals",
                     "positions": "batch index modulo the slices per part (one part's slices in row-major order)",
                     "floor": round(v.floor, 4)}
        meaning = ("per slice: the largest smoothed deviation of its pooled, shading-removed gray values from the good parts' "
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


# ----------------------------------------------------------------------------- evaluation

def decide_part(probs: np.ndarray, unknown: np.ndarray, classes: Sequence[str], thresholds: dict,
                unknown_threshold: float | None, rule: str):
    """The daemon's verdict (service.decide) for one part's (S, K) probabilities and (S,) unknown scores."""
    from service.decide import decide
    from service.records import Prediction

    probs = np.ascontiguousarray(probs, np.float32)
    pred = Prediction(logits=np.log(np.clip(probs, 1e-12, None)), probs=probs,
                      saliency=np.zeros((len(probs), 1, 1), np.float32), classes=tuple(classes),
                      unknown=np.ascontiguousarray(unknown, np.float32))
    v = decide(0, 0, pred, None, thresholds, [], inspect_ms=0.0, n_expected_slices=len(probs),
               unknown_threshold=unknown_threshold, unknown_rule=rule)
    if v.not_inspected:
        raise UnknownError(f"the daemon's rules could not inspect a part: {v.reason}")
    return v


def evaluate(model: str | Path, sets: Sequence[tuple[str, str | Path]], threshold: float | None = None,
             threads: int = 0, limit: int | None = None, class_threshold: float = 0.5) -> dict:
    """Part-level rates of an attached model on synthetic folders (known and novel), per class/subtype and per folder.

    Each part goes through service.decide (the daemon's rules; every defect class at ``class_threshold``, the
    daemon's default 0.5): ``flagged`` (RejectUnknown under the rule "any": some slice's unknown score >= the
    threshold), ``unexplained`` (RejectUnknown under the default rule "unexplained"), ``classifier`` (a known
    Reject bit without the unknown score), ``rejected`` (not accepted) and ``escaped`` (accepted)."""
    import onnx

    model = Path(model)
    meta = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))
    if "unknown" not in meta:
        raise UnknownError(f"{model}: model.json has no 'unknown' section. Fix: `valve-model unknown attach` first.")
    t = float(meta["unknown"]["threshold"]) if threshold is None else float(threshold)
    classes = meta["classes"]
    thresholds = {c: class_threshold for c in classes if c != "good"}
    proto = onnx.load(str(model))
    rows: dict[str, dict] = {}
    per_set: list[dict] = []
    scores: dict[str, list[float]] = {}
    for name, folder in sets:
        parts = load_parts(folder, limit)
        out = run_outputs(proto, parts, ["probs", UNKNOWN_OUTPUT], threads=threads)
        n = len(parts.part_class)
        pm = part_max(out[UNKNOWN_OUTPUT], n)
        # each part through the daemon's own rules (service.decide): the classifier alone, rule "any", rule
        # "unexplained" (whose Accept is also rule "any"'s: an anomalous slice is either explained or not)
        probs = out["probs"].reshape(n, -1, len(classes))
        scores_ = out[UNKNOWN_OUTPUT].reshape(n, -1)
        alone, anyr, unexpl = ([decide_part(probs[i], scores_[i], classes, thresholds, u, rule) for i in range(n)]
                               for u, rule in ((None, "unexplained"), (t, "any"), (t, "unexplained")))
        classifier = np.asarray([bool(v.defects) for v in alone])
        flagged = np.asarray([v.reject_unknown for v in anyr])
        unexplained = np.asarray([v.reject_unknown for v in unexpl])
        rejected = np.asarray([not v.accept for v in unexpl])
        kinds = ["novel" if c == "novel" else ("good" if c == "good" else "known defect") for c in parts.part_class]
        entry = {"set": name, "folder": str(folder), "parts": n}
        for kind in ("good", "known defect", "novel"):
            m = np.asarray([k == kind for k in kinds])
            if m.any():
                entry[kind] = {"parts": int(m.sum()), "flagged": round(float(flagged[m].mean()), 4),
                               "unexplained": round(float(unexplained[m].mean()), 4),
                               "rejected": round(float(rejected[m].mean()), 4),
                               "classifier_rejected": round(float(classifier[m].mean()), 4)}
        per_set.append(entry)
        for i in range(n):
            key = parts.part_class[i] if parts.part_class[i] != "novel" else f"novel:{parts.subtype[i]}"
            r = rows.setdefault(key, {"parts": 0, "flagged": 0, "unexplained": 0, "classifier": 0, "rejected": 0,
                                      "escaped": 0})
            r["unexplained"] += int(unexplained[i])
            r["parts"] += 1
            r["flagged"] += int(flagged[i])
            r["classifier"] += int(classifier[i])
            r["rejected"] += int(rejected[i])
            r["escaped"] += int(not rejected[i])
            scores.setdefault(key, []).append(float(pm[i]))
    for r in rows.values():
        for k in ("flagged", "unexplained", "classifier", "rejected", "escaped"):
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
                        for what in ("flagged", "unexplained", "rejected", "classifier_rejected")}}


def format_evaluation(s: dict) -> str:
    lines = [f"unknown threshold {s['threshold']:.4g}: good parts flagged {s['good_flagged_rate']}, novel parts "
             f"flagged {s['novel_flagged_rate']}, AUROC novel vs good {s['auroc_novel_vs_good']}",
             f"  {'class':16s} {'parts':>6s} {'flagged':>8s} {'unexplained':>12s} {'classifier':>11s} {'rejected':>9s} "
             f"{'escaped':>8s} "
             f"{'AUROC':>6s}"]
    for k, r in sorted(s["classes"].items()):
        lines.append(f"  {k:16s} {r['parts']:6d} {r['flagged_rate']:8.3f} {r['unexplained_rate']:12.3f} "
                     f"{r['classifier_rate']:11.3f} "
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
    for f, k, hp, tol in ((4, 3, 0.0, 0), (4, 1, 0.0, 0), (8, 1, 0.0, 0), (4, 3, 6.0, 0), (4, 3, VARIATION_HIGHPASS, 0),
                          (4, 3, 20.0, 0), (4, 5, VARIATION_HIGHPASS, 0), (4, 3, VARIATION_HIGHPASS, 1),
                          (4, 3, VARIATION_HIGHPASS, 2)):
        cands[f"variation f{f} k{k} hp{hp:g} t{tol}"] = fit_variation(fit_parts, f, k, hp, tol, "highpass")
    for f, k, tol in ((4, 3, 0), (4, 3, 1), (4, 3, 2), (4, 5, 1), (8, 3, 1)):
        cands[f"variation f{f} k{k} profile t{tol}"] = fit_variation(fit_parts, f, k, 0.0, tol, "profile")
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
    import models.unknown  # its docstring's first paragraph describes the command

    p = argparse.ArgumentParser(prog="valve-model unknown", description=models.unknown.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attach", help="fit the score, calibrate its threshold, write model.onnx + model.json")
    a.add_argument("--model", required=True, help="model.onnx (with model.json beside it)")
    a.add_argument("--fit", required=True, help="synthetic frames of the training side (known classes)")
    a.add_argument("--calibrate", required=True, help="held-out synthetic frames, >= 100 good parts (another seed; "
                   "e.g. `valve-inspect synth --mix good=1`)")
    a.add_argument("--out", required=True, help="folder for model.onnx and model.json")
    a.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="variation (the good parts' pixels, default) or mahalanobis (pooled block features)")
    a.add_argument("--shading", choices=SHADINGS, default=VARIATION_SHADING,
                   help=f"variation: how the shading is removed first (default {VARIATION_SHADING}: log gray values "
                        f"minus row and column medians; highpass: minus a Gaussian low-pass of --highpass px)")
    a.add_argument("--highpass", type=float, default=None,
                   help=f"variation with --shading highpass: the Gaussian sigma removed, px (default "
                        f"{VARIATION_HIGHPASS:g}; 0 = raw gray values)")
    a.add_argument("--tolerance", type=int, default=VARIATION_TOLERANCE,
                   help=f"variation: position tolerance in pooled px each way (default {VARIATION_TOLERANCE}; 0 = "
                        f"pixel to pixel)")
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
    from models.unknown.loco import add_arguments

    add_arguments(sub.add_parser("loco", help="leave one class out of Magnetic-tile: the score's AUROC on the class "
                                              "a training never saw, and the known classes' accuracy it costs"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "loco":
            from models.unknown.loco import run

            args.argv = argv[argv.index("loco") + 1:]
            run(args)
        elif args.cmd == "attach":
            if not 0 < args.false_flag_rate < 1:
                raise UnknownError(f"--false-flag-rate {args.false_flag_rate}: must be in (0, 1), e.g. 0.005")
            if args.highpass is not None and not (args.method == "variation" and args.shading == "highpass"):
                raise UnknownError(f"--highpass {args.highpass:g} sets the sigma of --shading highpass, but the score "
                                   f"is --method {args.method} --shading {args.shading}. Fix: add --shading highpass, "
                                   f"or drop --highpass.")
            u = attach(args.model, args.fit, args.calibrate, args.out, method=args.method, blocks=args.blocks,
                       highpass=VARIATION_HIGHPASS if args.highpass is None else args.highpass,
                       tolerance=args.tolerance, shading=args.shading,
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
