"""The unknown-defect score inside the graph: one more output, per slice, of the same ONNX Runtime run.

The paper ends on its limit: the classifier cannot tell a defect type it never saw; it gives it a
softmax over good / dirt / scratch / ec, often "good". ``attach`` adds an ``unknown`` output (B,) to an
exported graph by graph surgery (the classifier's nodes and weights are untouched), by one of two
methods (docs/model.md, "Unknown defects", has the measurements that chose the default):

**variation** (default): a variation model of the good parts, as machine vision's golden-part model.
Per slice position s (the batch index modulo the slices per part: the runtime sends one part's slices
in row-major order) and per f x f pooled pixel, the mean m_s and spread sd_s of the training frames'
good slices, on the slice with its shading removed (default "profile": the cylinder's lighting is a
profile across the valve, the ROI's rows, times the part's gain, so in log gray values the row and
column medians take it out):

    r = log(pool_f(x) + 1);  r -= median over each row;  r -= median over each column   # (B, 1, 48, 48)
    d = min over shifts within +-t px of | r - m_s | / (sd_s + median(sd))
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
    valve-model unknown loco [--dataset magnetic-tile] [--seeds 0] [--runs runs/realdata]   # leave one class out

FRAMES is a folder written by ``valve-inspect synth`` (frames/ and manifest.jsonl): the frames go
through the runtime's own ROI cut (service.roi.extract), so the scores are what the daemon sees.

The package, in the order a score is made:

    frames.py    the data: the runtime's slices of ``valve-inspect synth`` folders, a graph run over them; UnknownError
    scores.py    the float64 side: Gaussians and the variation model (fit, reference score), calibrate, auroc
    graph.py     the ONNX surgery: block outputs, pooled features, the score's nodes and output, strip_unknown
    command.py   attach, evaluate, measure, and ``valve-model unknown`` (build_parser, main)
"""

from __future__ import annotations

from models.unknown.command import (
    CANDIDATE_BLOCKS,
    DEFAULT_BLOCKS,
    DEFAULT_FALSE_FLAG_RATE,
    DEFAULT_METHOD,
    METHODS,
    MIN_CALIBRATION_GOOD,
    PARITY_TOLERANCE,
    attach,
    build_parser,
    evaluate,
    format_evaluation,
    main,
    measure,
)
from models.unknown.frames import (
    PartSlices,
    UnknownError,
    _session,
    load_parts,
    run_outputs,
    slice_label_index,
)
from models.unknown.graph import (
    _features_graph,
    add_pooled_features,
    add_score,
    add_variation_score,
    block_outputs,
    strip_unknown,
)
from models.unknown.scores import (
    SHADINGS,
    SHRINKAGE,
    VARIATION_FACTOR,
    VARIATION_SHADING,
    VARIATION_SMOOTH,
    VARIATION_TOLERANCE,
    Gaussians,
    VariationModel,
    auroc,
    calibrate,
    fit_gaussians,
    fit_variation,
    part_max,
)
from service.infer import UNKNOWN_OUTPUT

__all__ = [
    "CANDIDATE_BLOCKS", "DEFAULT_BLOCKS", "DEFAULT_FALSE_FLAG_RATE", "DEFAULT_METHOD", "METHODS",
    "MIN_CALIBRATION_GOOD", "PARITY_TOLERANCE", "SHADINGS", "SHRINKAGE", "UNKNOWN_OUTPUT", "VARIATION_FACTOR",
    "VARIATION_SHADING", "VARIATION_SMOOTH", "VARIATION_TOLERANCE", "Gaussians", "PartSlices", "UnknownError",
    "VariationModel", "_features_graph", "_session",
    "add_pooled_features", "add_score", "add_variation_score", "attach", "auroc", "block_outputs", "build_parser",
    "calibrate", "evaluate", "fit_gaussians", "fit_variation", "format_evaluation", "load_parts", "main", "measure",
    "part_max", "run_outputs", "slice_label_index", "strip_unknown",
]
