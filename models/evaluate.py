"""``valve-model evaluate``: classification and segmentation metrics of a run on a dataset, and a report.

For every image: the model's logits and softmax, the saliency map (``models.saliency``, Grad-CAM++
by default) of the *predicted* class, and a mask by ``service.segment.masks_for`` (``--segmentation``:
``refined``, the runtime's default, or the paper's plain ``otsu``) when the predicted class is
segmented (``segmented_classes`` of the model's classes: dirt, scratch), empty otherwise -- exactly
what the runtime does. Scores: defect-only IoU (``iou``) beside the paper's eq. 18 mIoU
(``miou_paper``, the mean of the defect and the background IoU).

Segmentation is scored on the images that have a mask file and whose *true* class is segmented,
end to end: a dirt image predicted as good gets an empty mask and scores IoU 0. The scores are
also given for the correctly classified images alone. Metric definitions: ``models.metrics``
(``mean`` = average over images, ``pooled`` = over all pixels of all images).

The evaluation data's classes are matched to the model's classes by name; the data may hold a
subset of them, but a class the model does not know is an error.

REPORT_DIR gets ``metrics.json``, ``report.md``, ``predictions.csv``, ``confusion_matrix.png``,
``pr_curves.png`` and ``saliency_grid.png``.

Python API: ``evaluate(run, data, ...) -> dict`` (the content of metrics.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load as load_model
from models.checkpoint import read_metadata, resolve_weights
from models.data import FORMATS, load_samples
from models.errors import DataError, ValveModelError
from models.figures import (
    OverlayItem,
    plot_confusion_matrix,
    plot_pr_curves,
    plot_saliency_grid,
)
from models.images import INPUT_POLICY, read_image, read_mask
from models.ira_cnn import segmented_classes
from models.metrics import (
    aggregate_segmentation,
    classification_metrics,
    pixel_counts,
    pr_curves,
    scores_from_counts,
)
from models.saliency import METHODS, saliency
from models.samples import Sample, SampleSet, remap_classes
from service.segment import DEFAULT_METHOD as DEFAULT_SEGMENTATION
from service.segment import METHODS as SEGMENTATION_METHODS
from service.segment import masks_for, otsu_mask, refined_mask

PROG = "valve-model evaluate"


class EvalError(ValveModelError, ValueError):
    """A user error about the evaluation: the run, the options or the device."""


def select_samples(data: SampleSet, limit: int | None) -> list[Sample]:
    """All samples, or at most ``limit`` taken round-robin over the classes (in data order)."""
    if limit is None or limit >= len(data.samples):
        return list(data.samples)
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in data.samples:
        by_class[s.label].append(s)
    queues = [by_class[k] for k in sorted(by_class)]
    out: list[Sample] = []
    i = 0
    while len(out) < limit:
        for q in queues:
            if i < len(q) and len(out) < limit:
                out.append(q[i])
        i += 1
    return out


def _clean(obj):
    """numpy -> Python, NaN/inf -> None, so that json.dumps writes strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def content_box(path: Path, size: int) -> tuple[slice, slice] | None:
    """Where the image lies in its letterboxed size x size input, or None when it fills the input (square).

    Reads only the file's header (PIL opens lazily): the pixels were decoded once already.
    """
    from PIL import Image, UnidentifiedImageError

    from models.images import letterbox_geometry

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise EvalError(f"cannot read {path}: {exc}") from None
    if h == w:
        return None
    g = letterbox_geometry(h, w, size)
    return slice(g.top, g.top + g.inner_height), slice(g.left, g.left + g.inner_width)


def round_robin(queues: list[list], n: int, out: list | None = None) -> list:
    """Append the queues' items to ``out`` in turns (first of each, then second of each, ...) up to n items."""
    out = [] if out is None else out
    i = 0
    while len(out) < n and any(i < len(q) for q in queues):
        for q in queues:
            if i < len(q) and len(out) < n:
                out.append(q[i])
        i += 1
    return out


def pick_overlays(correct: dict[int, list], wrong: list, n: int) -> list:
    """Up to ``n`` overlay items: the first wrong ones (at most half), then the correct ones round-robin over
    the classes, masked first, then more wrong ones if room is left. Entries are (0 if masked else 1, item);
    ``correct`` maps a class to its entries."""
    take_wrong = min(len(wrong), n // 2)
    queues = [sorted(correct[k], key=lambda it: it[0]) for k in sorted(correct)]  # masked first
    chosen = round_robin(queues, n, list(wrong[:take_wrong]))
    chosen.extend(wrong[take_wrong:take_wrong + n - len(chosen)])
    return [it[1] for it in chosen]


def evaluate(run: str | Path, data: str | Path, fmt: str = "folders", method: str = "gradcam++",
             out: str | Path | None = None, batch_size: int = 32, threads: int | None = None,
             limit: int | None = None, device: str = "cpu", overlays: int = 12,
             progress: bool | None = None, segmentation: str = DEFAULT_SEGMENTATION) -> dict:
    """Evaluate a run (directory or .safetensors) on a dataset; write the report to ``out`` if given.

    Returns the metrics dictionary written to metrics.json. Raises DataError/EvalError on user errors.
    """
    if method not in METHODS:
        raise EvalError(f"unknown saliency method {method!r}: choose one of {', '.join(METHODS)}")
    if segmentation not in SEGMENTATION_METHODS:
        raise EvalError(f"unknown --segmentation {segmentation!r}: choose one of {', '.join(SEGMENTATION_METHODS)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, not {limit}")
    if threads is not None and threads < 1:
        raise EvalError(f"--threads must be at least 1, not {threads}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}, but this torch build sees no CUDA device: use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise EvalError(f"unknown --device {device!r}: use cpu or cuda")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _evaluate(Path(run), Path(data), fmt, method, None if out is None else Path(out), batch_size,
                         limit, device, overlays, progress, segmentation)
    finally:
        if threads:
            torch.set_num_threads(previous_threads)


def _evaluate(run: Path, data_root: Path, fmt: str, method: str, out: Path | None, batch_size: int,
              limit: int | None, device: str, n_overlays: int, progress: bool | None,
              segmentation: str = DEFAULT_SEGMENTATION) -> dict:
    t_start = time.perf_counter()
    try:
        weights = resolve_weights(run)
        model = load_model(weights, map_location=device)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(f"cannot load the model: {exc}") from None
    meta = read_metadata(weights)
    classes = tuple(model.config.classes)
    size = model.config.input_size
    data = remap_classes(load_samples(data_root, fmt), classes)
    samples = select_samples(data, limit)
    seg_names = segmented_classes(classes)
    seg_flags = np.array([c in seg_names for c in classes])

    y_true: list[int] = []
    y_pred: list[int] = []
    probs_all: list[np.ndarray] = []
    rows: list[dict] = []
    seg_counts: dict[str, list[np.ndarray]] = defaultdict(list)
    seg_counts_correct: dict[str, list[np.ndarray]] = defaultdict(list)
    no_mask = 0
    correct_items: dict[int, list] = defaultdict(list)
    wrong_items: list = []

    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(samples), desc="evaluate", file=sys.stderr, disable=not show, leave=False)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        images = np.stack([read_image(s.path, size) for s in batch])
        x = torch.from_numpy(images).unsqueeze(1).to(device)
        logits, maps = saliency(model, x, method)
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        maps_np = maps.float().cpu().numpy()
        pred = probs.argmax(axis=1)
        masks = masks_for(maps_np, pred, seg_flags, slices=images, method=segmentation)
        for i, s in enumerate(batch):
            # masks over the image, not the letterbox's padding
            if seg_flags[pred[i]] and (box := content_box(s.path, size)) is not None:
                masks[i] = False
                masks[i][box] = (refined_mask(images[i][box], maps_np[i][box]) if segmentation == "refined"
                                 else otsu_mask(maps_np[i][box]))
            t, p = int(s.label), int(pred[i])
            y_true.append(t)
            y_pred.append(p)
            probs_all.append(probs[i])
            row = {"image": data.relpath(s), "true": classes[t], "pred": classes[p],
                   "score": float(probs[i, p]), **{f"p_{c}": float(probs[i, k]) for k, c in enumerate(classes)},
                   "mask_pixels": int(masks[i].sum()), "iou": "", "pixel_accuracy": ""}
            true_mask = None
            if seg_flags[t]:
                if s.mask is not None:
                    true_mask = read_mask(s.mask, size)
                    c = pixel_counts(masks[i], true_mask)
                    seg_counts[classes[t]].append(c)
                    if p == t:
                        seg_counts_correct[classes[t]].append(c)
                    sc = scores_from_counts(c)
                    row["iou"], row["pixel_accuracy"] = sc["iou"], sc["pixel_accuracy"]
                else:
                    no_mask += 1
            rows.append(row)
            # keep a few candidates for the overlay figure (bounded memory)
            item_list = correct_items[t] if p == t else wrong_items
            if len(item_list) < n_overlays:
                title = f"{s.path.name}\ntrue {classes[t]} / pred {classes[p]} {probs[i, p]:.2f}"
                if row["iou"] != "":
                    title += f"\nIoU {row['iou']:.2f}"
                item = OverlayItem(image=images[i], saliency=maps_np[i], pred_mask=masks[i],
                                   true_mask=true_mask, title=title)
                item_list.append((0 if true_mask is not None else 1, item))
        bar.update(len(batch))
    bar.close()

    cls_metrics = classification_metrics(y_true, y_pred, classes)
    scores = np.stack(probs_all) if probs_all else np.zeros((0, len(classes)))
    curves = pr_curves(y_true, scores, classes)
    for name in classes:
        cls_metrics["per_class"][name]["ap"] = curves["per_class"][name]["ap"]
    cls_metrics["mean_ap"] = curves["mean_ap"]

    def seg_table(groups: dict[str, list[np.ndarray]]) -> dict:
        table = {name: aggregate_segmentation(groups.get(name, [])) for name in seg_names}
        table["all"] = aggregate_segmentation([c for name in seg_names for c in groups.get(name, [])])
        return table

    present = {s.label for s in data.samples}
    run_dir = run if run.is_dir() else weights.parent
    run_config = None
    if (run_dir / "config.json").is_file():
        try:
            run_config = json.loads((run_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            run_config = None
    metrics = {
        "run": {"path": str(run.resolve()), "weights": str(weights.resolve()), "epoch": meta.get("epoch"),
                "model": model.config.to_dict(),
                "train_seed": (run_config or {}).get("train", {}).get("seed"),
                "train_data": (run_config or {}).get("data", {}).get("path")},
        "data": {"path": str(data_root.resolve()), "format": fmt,
                 "classes_in_data": [c for k, c in enumerate(classes) if k in present],
                 "images": len(data.samples), "evaluated": len(samples), "limit": limit,
                 "counts": data.counts(samples), "input_policy": INPUT_POLICY},
        "saliency": method,
        "segmentation_method": segmentation,
        "device": device,
        "classification": cls_metrics,
        "pr_curves": {name: {"precision": c["precision"], "recall": c["recall"], "thresholds": c["thresholds"],
                             "ap": c["ap"], "positives": c["positives"]}
                      for name, c in curves["per_class"].items()},
        "segmentation": {
            "segmented_classes": list(seg_names),
            "scored_images": sum(len(v) for v in seg_counts.values()),
            "segmented_images_without_mask": no_mask,
            "mask_region": "the image content: on a letterboxed input the padding is left out of Otsu and of "
                           "the predicted mask (it is not image); the whole input otherwise",
            "method": segmentation,
            "definition": "images with a mask file whose true class is segmented; the predicted mask is "
                          f"service.segment's {segmentation!r} mask of the predicted class's saliency, empty when "
                          "that class is not segmented; iou = defect-only IoU, miou_paper = eq. 18 (mean of "
                          "defect and background IoU). "
                          "mean = average of per-image scores; pooled = scores of pixel counts summed "
                          "over all images; both-empty masks score 1.",
            "per_class": seg_table(seg_counts),
            "correctly_classified": seg_table(seg_counts_correct),
        },
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    metrics = _clean(metrics)
    if out is not None:
        write_report(out, metrics, rows, curves, pick_overlays(correct_items, wrong_items, n_overlays))
    return metrics


# ---------------------------------------------------------------------------------------------
# report


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report_markdown(m: dict) -> str:
    cm = m["classification"]
    classes = cm["classes"]
    lines = [
        "# Evaluation report", "",
        f"- run: `{m['run']['path']}` (weights `{Path(m['run']['weights']).name}`, epoch {m['run']['epoch']}; "
        f"{m['run']['model']['preset']} preset, attention {m['run']['model']['attention']}, "
        f"input {m['run']['model']['input_size']})",
        f"- data: `{m['data']['path']}` ({m['data']['format']}), {m['data']['evaluated']} of "
        f"{m['data']['images']} images: " + ", ".join(f"{k} {v}" for k, v in m["data"]["counts"].items()),
        f"- saliency: {m['saliency']}; Otsu masks for {', '.join(m['segmentation']['segmented_classes']) or '-'}",
        f"- time: {m['seconds']:.1f} s on {m['device']}", "",
        "## Classification", "",
        f"Accuracy: **{_f(cm['accuracy'], 4)}** ({cm['n']} images). Precision, recall and F-measure as in "
        "eqs 14-16 (0/0 = 0); AP is the step-wise average precision of the one-vs-rest softmax score.", "",
        "| class | precision | recall | F-measure | AP | support |",
        "|---|---|---|---|---|---|",
    ]
    for name in classes:
        r = cm["per_class"][name]
        lines.append(f"| {name} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f_measure'])} | "
                     f"{_f(r['ap'])} | {r['support']} |")
    mac = cm["macro"]
    lines += [f"| macro (classes present) | {_f(mac['precision'])} | {_f(mac['recall'])} | "
              f"{_f(mac['f_measure'])} | {_f(cm['mean_ap'])} (mean) | {cm['n']} |", "",
              "Confusion matrix (rows: true class, columns: predicted class):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for name, row in zip(classes, cm["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    seg = m["segmentation"]
    lines += ["", "## Segmentation", "",
              f"Scored images: {seg['scored_images']} ({seg['definition']}) "
              f"Segmented-class images without a mask file: {seg['segmented_images_without_mask']}.", ""]
    for title, table in (("All scored images (end to end)", seg["per_class"]),
                         ("Correctly classified images only", seg["correctly_classified"])):
        lines += [f"**{title}**", "",
                  "| class | images | PA | defect IoU | mIoU (eq. 18) | precision | recall | F-score | PA pooled | "
                  "IoU pooled |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, agg in table.items():
            mean, pooled = agg["mean"], agg["pooled"]
            lines.append(f"| {name} | {agg['n']} | {_f(mean['pixel_accuracy'])} | {_f(mean['iou'])} | "
                         f"{_f(mean.get('miou_paper'))} | "
                         f"{_f(mean['precision'])} | {_f(mean['recall'])} | {_f(mean['f_score'])} | "
                         f"{_f(pooled['pixel_accuracy'])} | {_f(pooled['iou'])} |")
        lines.append("")
    lines += ["## Figures", "", "![confusion matrix](confusion_matrix.png)", "",
              "![precision-recall curves](pr_curves.png)", "", "![saliency overlays](saliency_grid.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, rows: list[dict], curves: dict, overlays: list[OverlayItem]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(metrics))
    if rows:
        with (out / "predictions.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    c = metrics["classification"]
    plot_confusion_matrix(np.array(c["confusion_matrix"]), c["classes"], out / "confusion_matrix.png")
    plot_pr_curves(curves, out / "pr_curves.png")
    plot_saliency_grid(overlays, out / "saliency_grid.png",
                       title=f"{metrics['saliency']} saliency; true mask green, Otsu mask red dashed")


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a trained run: classification metrics, "
                                "saliency-based segmentation metrics, a Markdown report and figures.")
    p.add_argument("--run", required=True, help="run directory (model.safetensors) or a .safetensors file")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="folders", choices=sorted(FORMATS), help="dataset format (default folders)")
    p.add_argument("--saliency", default="gradcam++", choices=METHODS, help="saliency method (default gradcam++)")
    p.add_argument("--segmentation", default=DEFAULT_SEGMENTATION, choices=SEGMENTATION_METHODS,
                   help=f"mask method (default {DEFAULT_SEGMENTATION}: the map's region, the slice's pixels; otsu: the "
                        "paper's Otsu of the map)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--limit", type=int, help="evaluate at most N images, taken round-robin over the classes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        m = evaluate(args.run, args.data, args.format, args.saliency, args.out, args.batch_size, args.threads,
                     args.limit, args.device, segmentation=args.segmentation)
    except (DataError, EvalError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    seg = m["segmentation"]["per_class"].get("all", {}).get("mean", {})
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "accuracy": m["classification"]["accuracy"],
                      "macro_f": m["classification"]["macro"]["f_measure"], "defect_iou": seg.get("iou"),
                      "miou_paper": seg.get("miou_paper"), "segmentation": args.segmentation}))
    return 0
