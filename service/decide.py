"""Per-part verdict from the model's per-slice prediction: accept, reject (which defects), or not inspected.

Rules, for one part whose frame gave N slices (normally 8) with probabilities ``probs`` (N, K):

1. Consistency first. The part is NotInspected, with a reason, never Accept, when:
   N != n_expected_slices; probs is not (N, K) with K = len(classes); any probability is NaN/inf,
   outside [0, 1] or a row does not sum to 1 (+-1e-3); masks (when given) are not (N, H, W);
   ``segmented`` does not match the classes; or a defect class of the model has no threshold in (0, 1].
2. Each slice's predicted class is its argmax (``Prediction.predicted``; ties go to the lower index,
   as in ``service.segment.masks_for``).
3. A slice rejects for its predicted class c when c is not "good" and probs[slice, c] >= thresholds[c]
   (equality rejects). A slice predicted as a defect class *below* that class's threshold does not
   reject: it counts as good (it is listed in ``extra["below_threshold"]`` and the reason). The
   threshold is the operator's knob for how sure the model must be; a defect class that "wins" the
   argmax with low confidence is the ambiguous case the threshold exists to let through.
4. dirt -> RejectDirt, scratch -> RejectScratch, ec -> RejectEC. Any other non-"good" class (none
   today; reserved for a future model) -> RejectUnknown, by the same threshold rule.
5. Several classes may reject at once (every bit is set). No slice rejects -> Accept.
6. Reported for every inspected part (accept or reject):
   ScoreDirt / ScoreScratch / ScoreEC = the highest probability of that class over the slices
   (0 when the model has no such class); DirtAreaPx / ScratchAreaPx = mask pixels summed over the
   slices that *reject* for dirt / scratch (a below-threshold slice counts as good, so its mask does
   not count either: an accepted part reports 0), 0 when ``masks`` is None or the class is not segmented.

7. Unknown defects. When the model has an unknown score (``Prediction.unknown``, (N,): models.unknown)
   and ``unknown_threshold`` is given, a slice whose score is >= the threshold is anomalous. With
   ``unknown_rule`` "unexplained" (the default) it is *unknown* only when no known class explains it:
   it does not reject for a defect class under rules 3-4 (it is predicted good, or a defect class below
   its threshold). With "any", every anomalous slice is unknown. An unknown slice gives the part
   RejectUnknown, whatever its class (an unknown slice predicted "good" does not let the part pass).
   Known defects keep their own bits: a part with a scratch slice and an unexplained anomalous slice has
   RejectScratch and RejectUnknown. A score that is not finite, negative or not (N,) makes the part
   NotInspected (rule 1); so does a threshold that is not a finite number > 0 or an unknown rule.

Class names are matched exactly (lower case, as in model.json).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from service.errors import ConfigError
from service.records import DEFECTS_TABLE, UNKNOWN_DEFECT, Prediction, Verdict

GOOD = "good"
# From service.records' defect table:
#: defect class -> the Verdict field its reject bit lives in; other non-good classes map to reject_unknown.
DEFECT_FLAGS = {d.name: d.reject for d in DEFECTS_TABLE if d is not UNKNOWN_DEFECT}
#: defect class -> the Verdict field of its highest slice probability / of its segmented pixels.
SCORE_FIELDS = {d.name: d.score for d in DEFECTS_TABLE if d.score is not None}
AREA_FIELDS = {d.name: d.area for d in DEFECTS_TABLE if d.area is not None}
PROB_ATOL = 1e-5
#: rule 7: which anomalous slices are unknown ([model] unknown_rule)
UNKNOWN_RULES = ("unexplained", "any")
SUM_ATOL = 1e-3


def _number(t: object) -> bool:
    return not isinstance(t, bool) and isinstance(t, (int, float, np.floating)) and math.isfinite(t)


def _valid_threshold(t: object) -> bool:
    return _number(t) and 0.0 < float(t) <= 1.0


def validate_thresholds(thresholds: Mapping[str, float], classes: Sequence[str]) -> dict[str, float]:
    """Check the reject thresholds against the model's classes; returns them as {class: float}.

    Every class except "good" needs a threshold, a number in (0, 1] as in service.config's
    [model.thresholds] (a slice rejects when its predicted class's probability is >= it). "good" takes none, and names the model does not have
    are refused (a typo would otherwise silently leave a class on a default).

    Raises:
        ConfigError: naming the class and the fix.
    """
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"thresholds must be a table of class = probability, got {thresholds!r}")
    out: dict[str, float] = {}
    for name, value in thresholds.items():
        if name == GOOD:
            raise ConfigError("thresholds.good: 'good' takes no threshold (a slice is good unless a defect class "
                              "rejects it). Fix: remove it.")
        if name not in classes:
            raise ConfigError(f"thresholds.{name}: the model has no class {name!r} (its classes: "
                              f"{', '.join(classes)}). Fix: correct or remove it.")
        if not _valid_threshold(value):
            raise ConfigError(f"thresholds.{name} = {value!r}: must be a probability in (0, 1]. "
                              f"Fix: e.g. {name} = 0.5.")
        out[name] = float(value)
    missing = [c for c in classes if c != GOOD and c not in out]
    if missing:
        raise ConfigError(f"no threshold for the model's class(es) {', '.join(missing)}. Fix: add e.g. "
                          + ", ".join(f"{c} = 0.5" for c in missing) + " to the thresholds table.")
    return out


def resolve_unknown_threshold(configured: float | None, model) -> float | None:
    """The unknown-score threshold in use: [model] unknown_threshold when > 0, else model.json's (None: no score).

    Raises:
        ConfigError: a threshold is configured for a model that has no unknown score, or it is not a number > 0.
    """
    has = bool(getattr(model, "has_unknown", False))
    if configured is None or (_number(configured) and float(configured) == 0.0):
        return model.unknown_threshold if has else None
    if not (_number(configured) and float(configured) > 0):
        raise ConfigError(f"model.unknown_threshold = {configured!r}: must be a finite number > 0. Fix: e.g. "
                          f"unknown_threshold = 1.5, or remove it to use the model's calibrated threshold.")
    if not has:
        raise ConfigError(f"model.unknown_threshold = {configured!r}, but the model {getattr(model, 'path', '')} has "
                          f"no unknown-defect score. Fix: remove the key, or use a model with the score "
                          f"(`valve-model unknown attach`).")
    return float(configured)


def _segmented_names(segmented: np.ndarray | Iterable[str] | Iterable[bool], classes: Sequence[str]) -> set[str]:
    """(K,) bool over classes, or class names -> set of names. Raises ValueError when inconsistent."""
    seg = list(segmented)
    if seg and all(isinstance(s, (bool, np.bool_)) for s in seg):
        if len(seg) != len(classes):
            raise ValueError(f"segmented has {len(seg)} flags for {len(classes)} classes")
        return {c for c, s in zip(classes, seg, strict=True) if s}
    names = {str(s) for s in seg}
    unknown = names - set(classes)
    if unknown:
        raise ValueError(f"segmented names {sorted(unknown)} not in classes {list(classes)}")
    return names


def _check(prediction: Prediction, masks: np.ndarray | None, n_expected: int) -> str:
    """'' when the prediction is complete and consistent, else the NotInspected reason."""
    probs = prediction.probs
    k = len(prediction.classes)
    if not isinstance(probs, np.ndarray) or probs.ndim != 2:
        return f"inconsistent prediction: probs of shape {getattr(probs, 'shape', None)}, expected (N, K)"
    n = probs.shape[0]
    if n != n_expected:
        return f"{n} of {n_expected} slices inspected"
    if probs.shape[1] != k:
        return f"inconsistent prediction: probs have {probs.shape[1]} classes, model has {k}"
    if not np.isfinite(probs).all():
        bad = sorted(set(np.nonzero(~np.isfinite(probs))[0].tolist()))
        return f"non-finite probabilities on slice(s) {bad}"
    if (probs < -PROB_ATOL).any() or (probs > 1 + PROB_ATOL).any():
        return "probabilities outside [0, 1]"
    sums = probs.sum(axis=1, dtype=np.float64)
    if not np.allclose(sums, 1.0, atol=SUM_ATOL):
        return f"probabilities do not sum to 1 (row sums {np.round(sums, 4).tolist()})"
    if masks is not None and (not isinstance(masks, np.ndarray) or masks.ndim != 3 or masks.shape[0] != n):
        return f"inconsistent masks: shape {getattr(masks, 'shape', None)} for {n} slices"
    unknown = prediction.unknown
    if unknown is not None:
        if not isinstance(unknown, np.ndarray) or unknown.shape != (n,):
            return f"inconsistent unknown scores: shape {getattr(unknown, 'shape', None)} for {n} slices"
        if not np.isfinite(unknown).all() or (unknown < 0).any():
            bad = sorted(set(np.nonzero(~np.isfinite(unknown) | (unknown < 0))[0].tolist()))
            return f"invalid unknown score (not finite, or < 0) on slice(s) {bad}"
    return ""


def decide(part_id: int, frame_id: int, prediction: Prediction, masks: np.ndarray | None,
           thresholds: Mapping[str, float], segmented: np.ndarray | Iterable[str] | Iterable[bool],
           inspect_ms: float, n_expected_slices: int = 8, unknown_threshold: float | None = None,
           unknown_rule: str = "unexplained") -> Verdict:
    """The verdict for one part (rules in the module docstring). Never raises for bad data: NotInspected instead.

    Args:
        part_id, frame_id: identify the part and its frame.
        prediction: the model's answer for the part's slices.
        masks: (N, H, W) bool Otsu masks (``service.segment.masks_for``), or None when not computed.
        thresholds: {defect class: probability}, normally from ``validate_thresholds``.
        segmented: (K,) bool over the classes, or the names of the segmented classes.
        inspect_ms: time from frame arrival to verdict, reported as is.
        n_expected_slices: slices a fully inspected part has.
        unknown_threshold: slices with ``prediction.unknown >= unknown_threshold`` are anomalous (rule 7); None
            switches the rule off (a model without the score).
        unknown_rule: "unexplained" (an anomalous slice that does not reject for a known class is unknown) or
            "any" (every anomalous slice is).
    """
    def not_inspected(reason: str) -> Verdict:
        return Verdict.make_not_inspected(part_id, reason, frame_id=frame_id, inspect_ms=inspect_ms)

    classes = tuple(prediction.classes)
    reason = _check(prediction, masks, n_expected_slices) if n_expected_slices >= 1 \
        else f"n_expected_slices = {n_expected_slices}, must be >= 1"
    if reason:
        return not_inspected(reason)
    try:
        seg_names = _segmented_names(segmented, classes)
    except ValueError as exc:
        return not_inspected(f"inconsistent segmented classes: {exc}")
    limits: dict[str, float] = {}
    for c in classes:
        if c == GOOD:
            continue
        t = thresholds.get(c) if isinstance(thresholds, Mapping) else None
        if not _valid_threshold(t):
            return not_inspected(f"no valid threshold for class {c!r} (got {t!r})")
        limits[c] = float(t)
    if unknown_threshold is not None and not (_number(unknown_threshold) and float(unknown_threshold) > 0):
        return not_inspected(f"invalid unknown threshold {unknown_threshold!r} (a finite number > 0)")
    if unknown_rule not in UNKNOWN_RULES:
        return not_inspected(f"invalid unknown rule {unknown_rule!r} (one of {', '.join(UNKNOWN_RULES)})")

    probs = prediction.probs
    predicted = probs.argmax(axis=1)
    slices = []
    rejecting: dict[str, list[int]] = {}
    below: dict[str, list[int]] = {}
    for i, ci in enumerate(predicted.tolist()):
        name = classes[ci]
        p = float(probs[i, ci])
        rejects = name != GOOD and p >= limits[name]
        slices.append({"class": name, "p": round(p, 6), "rejects": rejects})
        if rejects:
            rejecting.setdefault(name, []).append(i)
        elif name != GOOD:
            below.setdefault(name, []).append(i)

    fields: dict[str, object] = {}
    for name, fld in SCORE_FIELDS.items():
        fields[fld] = float(probs[:, classes.index(name)].max()) if name in classes else 0.0
    for name, fld in AREA_FIELDS.items():
        area = 0
        if masks is not None and name in classes and name in seg_names and rejecting.get(name):
            # only the slices that reject for this class: a below-threshold slice counts as good
            area = int(np.count_nonzero(masks[rejecting[name]]))
        fields[fld] = area

    unknown_idx: list[int] = []
    anomalous: list[int] = []
    if unknown_threshold is not None and prediction.unknown is not None:
        anomalous = np.nonzero(prediction.unknown >= float(unknown_threshold))[0].tolist()
        explained = {i for idx in rejecting.values() for i in idx} if unknown_rule == "unexplained" else set()
        unknown_idx = [i for i in anomalous if i not in explained]
        for i in unknown_idx:
            slices[i]["unknown"] = True

    notes = []
    for name, idx in rejecting.items():
        pmax = max(float(probs[i, classes.index(name)]) for i in idx)
        notes.append(f"{name} on slice(s) {idx} (max p {pmax:.3f} >= {limits[name]:.3f})")
    below_note = "; ".join(f"{name} below threshold on slice(s) {idx} (counted good)" for name, idx in below.items())
    if unknown_idx:
        umax = float(prediction.unknown[unknown_idx].max())
        notes.append(f"unknown on slice(s) {unknown_idx} (max score {umax:.3g} >= {float(unknown_threshold):.3g})")
    extra = {"slices": slices, "rejecting": rejecting, "below_threshold": below,
             "thresholds": {c: limits[c] for c in classes if c != GOOD}}
    if prediction.unknown is not None:
        extra["unknown"] = {"scores": [round(float(u), 4) for u in prediction.unknown], "slices": unknown_idx,
                            "anomalous": anomalous, "rule": unknown_rule,
                            "threshold": None if unknown_threshold is None else float(unknown_threshold)}

    if rejecting or unknown_idx:
        flags = {d.reject: False for d in DEFECTS_TABLE}
        for name in rejecting:
            flags[DEFECT_FLAGS.get(name, UNKNOWN_DEFECT.reject)] = True
        if unknown_idx:
            flags[UNKNOWN_DEFECT.reject] = True
        text = "reject: " + "; ".join(notes) + (f"; {below_note}" if below_note else "")
        return Verdict(part_id=part_id, frame_id=frame_id, inspect_ms=inspect_ms, reason=text, extra=extra,
                       **flags, **fields)
    text = f"all {len(slices)} slices good" + (f"; {below_note}" if below_note else "")
    return Verdict(part_id=part_id, frame_id=frame_id, accept=True, inspect_ms=inspect_ms, reason=text,
                   extra=extra, **fields)
