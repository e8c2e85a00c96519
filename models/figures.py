"""PNG figures for training and evaluation reports (matplotlib, Agg canvas).

The figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly: no
pyplot, no global backend switch, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Counts, coloured by the row-normalised share (recall); rows true, columns predicted."""
    cm = np.asarray(cm)
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows != 0)
    fig = Figure(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return _save(fig, path)


def plot_pr_curves(curves: dict, path: str | Path, title: str = "Precision-recall (one vs rest)") -> Path:
    """The ``per_class`` curves of :func:`models.metrics.pr_curves`, AP in the legend."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    for name, c in curves["per_class"].items():
        if c["positives"] == 0 or len(c["recall"]) == 0:
            continue
        r = np.r_[0.0, c["recall"]]
        p = np.r_[c["precision"][0], c["precision"]]
        ax.step(r, p, where="post", label=f"{name} (AP {c['ap']:.3f}, n={c['positives']})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


@dataclass
class OverlayItem:
    """One tile of the saliency grid."""

    image: np.ndarray  # (S, S) uint8
    saliency: np.ndarray  # (S, S) float in [0, 1]
    pred_mask: np.ndarray  # (S, S) bool
    true_mask: np.ndarray | None  # (S, S) bool or None
    title: str


def plot_saliency_grid(items: Sequence[OverlayItem], path: str | Path, cols: int = 4,
                       title: str = "Saliency (jet) with true mask (green) and Otsu mask (red dashed)") -> Path:
    """Gray image, saliency overlay, the true mask outlined in green, the predicted mask in red."""
    n = max(1, len(items))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.4))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= len(items):
            continue
        it = items[i]
        ax.imshow(it.image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(it.saliency, cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0)
        if it.true_mask is not None and it.true_mask.any():
            ax.contour(it.true_mask.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        if it.pred_mask.any():
            ax.contour(it.pred_mask.astype(float), levels=[0.5], colors="red", linewidths=0.9,
                       linestyles="dashed")
        ax.set_title(it.title, fontsize=8)
    if not items:
        fig.axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss and accuracy per epoch from log.jsonl records (train solid, validation dashed)."""
    fig = Figure(figsize=(9, 3.5))
    ax_l, ax_a = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ep = [h["epoch"] for h in history]
    for ax, key in ((ax_l, "loss"), (ax_a, "acc")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        val = [h.get(f"val_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(ep, [np.nan if v is None else v for v in val], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_a.set_ylim(0.0, 1.02)
    return _save(fig, path)
