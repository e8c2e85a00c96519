"""Classification and segmentation metrics, numpy only (no sklearn).

Classification, from the confusion matrix ``cm`` (rows: true class, columns: predicted class),
for class k with TP = cm[k, k], FP = column sum - TP, FN = row sum - TP (paper eqs 14-16):

    precision_k = TP / (TP + FP)          recall_k = TP / (TP + FN)
    F_k         = 2 * precision_k * recall_k / (precision_k + recall_k)

Every 0/0 here is defined as 0 (a class never predicted has precision 0; a class absent from the
data has recall 0 and F 0). Accuracy is trace(cm) / cm.sum(). Macro averages are the unweighted
means over the classes that occur in the data (support > 0).

Precision-recall curves are one-vs-rest on the class's score, one point per distinct threshold.
Average precision is the step-wise sum ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the thresholds in
decreasing order (as sklearn's ``average_precision_score``, no interpolation); it is NaN for a
class without positives and such classes are left out of the mean AP.

Segmentation, per image from the predicted and true bool masks (paper eqs 17-18):

    pixel accuracy PA = (TP + TN) / (TP + TN + FP + FN)
    IoU = TP / (TP + FP + FN)       precision = TP / (TP + FP)      recall = TP / (TP + FN)
    F = 2 * precision * recall / (precision + recall)

When both masks are empty the prediction is perfect: IoU, precision, recall and F are 1. Every
other 0/0 is 0 (e.g. precision of an empty prediction against a non-empty truth). Two
aggregates: ``mean`` averages the per-image values (each image weighs the same); ``pooled`` sums
TP/FP/FN/TN over all pixels of all images first and then applies the formulas (large defects
weigh more).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SEG_KEYS = ("pixel_accuracy", "iou", "precision", "recall", "f_score", "background_iou", "miou_paper")


def _div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den elementwise with 0/0 (and x/0) = 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ---------------------------------------------------------------------------------------------
# classification


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; cm[i, j] = samples of true class i predicted as j."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def precision_recall_f(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F-measure (eqs 14-16) from a confusion matrix; 0/0 = 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    precision = _div(tp, cm.sum(axis=0))
    recall = _div(tp, cm.sum(axis=1))
    f = _div(2 * precision * recall, precision + recall)
    return precision, recall, f


def accuracy(cm: np.ndarray) -> float:
    cm = np.asarray(cm)
    return float(_div(np.trace(cm), cm.sum()))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Confusion matrix, per-class P/R/F and support, accuracy and macro averages, as plain Python."""
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    p, r, f = precision_recall_f(cm)
    support = cm.sum(axis=1)
    present = support > 0
    per_class = {name: {"precision": float(p[i]), "recall": float(r[i]), "f_measure": float(f[i]),
                        "support": int(support[i])} for i, name in enumerate(classes)}
    macro = {key: float(v[present].mean()) if present.any() else 0.0
             for key, v in (("precision", p), ("recall", r), ("f_measure", f))}
    return {"classes": list(classes), "confusion_matrix": cm.tolist(), "per_class": per_class,
            "accuracy": accuracy(cm), "macro": macro, "n": int(cm.sum())}


def pr_curve(y_true: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest precision-recall curve: (precision, recall, thresholds), thresholds decreasing.

    Point n predicts positive for every score >= thresholds[n]. With no positives the recall is 0
    everywhere. Empty input gives empty arrays.
    """
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError("y_true and scores differ in length")
    if s.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    precision = _div(tps, tps + fps)
    recall = _div(tps, y.sum())
    return precision, recall, s[last]


def average_precision(y_true: Sequence[bool], scores: Sequence[float]) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) P_n (R_0 = 0); NaN when there are no positives."""
    y = np.asarray(y_true, dtype=bool)
    if not y.any():
        return float("nan")
    precision, recall, _ = pr_curve(y, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curves(y_true: Sequence[int], scores: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class: one-vs-rest curve and AP from (N, K) scores (e.g. softmax); plus mean AP."""
    y = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    out: dict = {"per_class": {}}
    aps = []
    for k, name in enumerate(classes):
        pos = y == k
        p, r, t = pr_curve(pos, scores[:, k]) if len(y) else (np.zeros(0),) * 3
        ap = average_precision(pos, scores[:, k]) if len(y) else float("nan")
        out["per_class"][name] = {"precision": p, "recall": r, "thresholds": t, "ap": ap,
                                  "positives": int(pos.sum())}
        if not np.isnan(ap):
            aps.append(ap)
    out["mean_ap"] = float(np.mean(aps)) if aps else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# segmentation


def pixel_counts(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(TP, FP, FN, TN) int64 for one pair of bool masks of the same shape."""
    pred = np.asarray(pred, dtype=bool)
    true = np.asarray(true, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, true {true.shape}")
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    return np.array([tp, fp, fn, pred.size - tp - fp - fn], dtype=np.int64)


def scores_from_counts(counts: np.ndarray) -> dict[str, float]:
    """TP, FP, FN, TN -> PA, IoU, precision, recall, F (eqs 17-18); both-empty is perfect.

    ``iou`` is the defect-only IoU, TP / (TP + FP + FN); ``background_iou`` the same for the background,
    TN / (TN + FN + FP); ``miou_paper`` their mean, the paper's eq. 18 (which a mask of all background
    scores about 0.5 on on a small defect: report it beside the defect-only IoU, never alone).
    """
    tp, fp, fn, tn = (float(v) for v in counts)
    pa = float(_div(tp + tn, tp + fp + fn + tn))
    bg = float(_div(tn, tn + fn + fp)) if tn + fn + fp else 1.0
    if tp + fp + fn == 0:  # nothing predicted, nothing true
        return {"pixel_accuracy": pa, "iou": 1.0, "precision": 1.0, "recall": 1.0, "f_score": 1.0,
                "background_iou": bg, "miou_paper": (1.0 + bg) / 2}
    p = float(_div(tp, tp + fp))
    r = float(_div(tp, tp + fn))
    iou = float(_div(tp, tp + fp + fn))
    return {"pixel_accuracy": pa, "iou": iou, "precision": p, "recall": r,
            "f_score": float(_div(2 * p * r, p + r)), "background_iou": bg, "miou_paper": (iou + bg) / 2}


def segmentation_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """PA, IoU, precision, recall and F-score of one predicted mask against its true mask."""
    return scores_from_counts(pixel_counts(pred, true))


def aggregate_segmentation(counts: Sequence[np.ndarray]) -> dict:
    """Per-image counts -> {"n", "mean": per-image scores averaged, "pooled": scores of summed counts}."""
    counts = [np.asarray(c, dtype=np.int64) for c in counts]
    if not counts:
        return {"n": 0, "mean": {k: None for k in SEG_KEYS}, "pooled": {k: None for k in SEG_KEYS}}
    per_image = [scores_from_counts(c) for c in counts]
    mean = {k: float(np.mean([s[k] for s in per_image])) for k in SEG_KEYS}
    return {"n": len(counts), "mean": mean, "pooled": scores_from_counts(np.sum(counts, axis=0))}
