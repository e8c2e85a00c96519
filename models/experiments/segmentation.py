"""``python -m models.experiments.segmentation``: the runtime's masks and PLC areas on unseen synthetic parts.

Renders ``--parts`` synthetic parts (``valve-inspect synth``, a seed the demo model never trained on),
runs each frame through the runtime's own pipeline (service.pipeline.inspect_frame: ROI -> ONNX ->
masks -> decide) with the shipped (or a given) model, and scores:

* per defect slice (dirt, scratch; the slices of build-dataset with their mask): defect-only IoU and
  the paper's eq. 18 mIoU of the masks of each method in service.segment (``otsu``, ``refined``),
  end to end (a slice classified as good scores IoU 0) and on the correctly classified slices;
* per part: DirtAreaPx / ScratchAreaPx (what the PLC receives) against the true defect area in the
  same slices; the median relative error |area - true| / true over the dirt and the scratch parts.

Writes a JSON (``--out``) that docs/model.md's "Segmentation" section is written from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def iou_scores(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(defect-only IoU, eq. 18 mIoU) by models.metrics, the evaluation's own definitions."""
    from models.metrics import segmentation_scores

    sc = segmentation_scores(pred, true)
    return sc["iou"], sc["miou_paper"]


def run(parts: int, seed: int, model_path: str | None, work: Path) -> dict:
    from models.build_dataset import main as build_dataset
    from service.infer import InferenceModel
    from service.pipeline import inspect_frame
    from service.records import Frame
    from service.roi import RoiParams
    from service.segment import METHODS, masks_for
    from service.sim.synth import write_dataset

    frames_dir, slices_dir = work / "frames", work / "slices"
    write_dataset(frames_dir, parts=parts, seed=seed, overwrite=True)
    if build_dataset(["--frames", str(frames_dir), "--out", str(slices_dir)]) != 0:
        raise SystemExit("build-dataset failed")
    model = InferenceModel(model_path, providers=("CPUExecutionProvider",), intra_op_threads=1)
    classes = list(model.classes)
    rows = [json.loads(line) for line in (slices_dir / "slices.jsonl").read_text().splitlines() if line.strip()]

    # slice level: masks of both methods on every dirt/scratch slice that has a mask
    defect_rows = [r for r in rows if r["label"] in ("dirt", "scratch") and r.get("mask")]
    per = {m: {c: {"iou": [], "miou": [], "iou_correct": []} for c in ("dirt", "scratch")} for m in METHODS}
    for i in range(0, len(defect_rows), 8):
        chunk = defect_rows[i:i + 8]
        x = np.stack([cv2.imread(str(slices_dir / r["file"]), cv2.IMREAD_GRAYSCALE) for r in chunk])[:, None]
        truth = [cv2.imread(str(slices_dir / r["mask"]), cv2.IMREAD_GRAYSCALE) > 0 for r in chunk]
        pred = model.run(x)
        for method in METHODS:
            masks = masks_for(pred.saliency, pred.predicted, model.segmented, slices=x, method=method)
            for r, m, t, p in zip(chunk, masks, truth, pred.predicted, strict=True):
                d, mi = iou_scores(m, t)
                per[method][r["label"]]["iou"].append(d)
                per[method][r["label"]]["miou"].append(mi)
                if classes[int(p)] == r["label"]:
                    per[method][r["label"]]["iou_correct"].append(d)

    # part level: the PLC's areas from the runtime's pipeline against the true areas of the same slices
    true_area: dict[int, int] = {}
    for r in rows:
        if r.get("mask"):
            true_area[r["part"]] = true_area.get(r["part"], 0) + int(
                (cv2.imread(str(slices_dir / r["mask"]), cv2.IMREAD_GRAYSCALE) > 0).sum())
    manifest = [json.loads(line) for line in (frames_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    areas = {"dirt": [], "scratch": []}
    thresholds = {c: 0.5 for c in classes if c != "good"}
    roi = RoiParams()
    segment_ms = []
    for part in manifest:
        cls = part["class"]
        if cls not in areas:
            continue
        truth = true_area.get(part["part"], 0)
        if truth <= 0:
            continue
        image = cv2.imread(str(frames_dir / part["file"]), cv2.IMREAD_GRAYSCALE)
        verdict, extras = inspect_frame(Frame(image=image, frame_id=part["part"], arrival=time.monotonic()),
                                        part["part"], roi, model, thresholds)
        if extras is not None:
            segment_ms.append(extras["timings"]["segment_ms"])
        got = verdict.dirt_area_px if cls == "dirt" else verdict.scratch_area_px
        areas[cls].append({"part": part["part"], "true_px": truth, "area_px": int(got),
                           "rel_error": abs(got - truth) / truth})

    def stat(v: list[float]) -> float | None:
        return float(np.mean(v)) if v else None

    out = {"parts": parts, "seed": seed, "model": str(model.path), "model_sha256": model.sha256,
           "slices": {m: {c: {"n": len(v["iou"]), "defect_iou": stat(v["iou"]), "miou_paper": stat(v["miou"]),
                              "defect_iou_correctly_classified": stat(v["iou_correct"]),
                              "n_correct": len(v["iou_correct"])} for c, v in d.items()} for m, d in per.items()},
           "areas": {c: {"parts": len(v), "median_rel_error": float(np.median([a["rel_error"] for a in v])) if v else None,
                         "per_part": v} for c, v in areas.items()},
           "segment_ms_median": float(np.median(segment_ms)) if segment_ms else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.experiments.segmentation", description=__doc__.split("\n")[0])
    p.add_argument("--parts", type=int, default=96)
    p.add_argument("--seed", type=int, default=909, help="a seed the demo model never trained on (default 909)")
    p.add_argument("--model", default=None, help="model.onnx (default: the shipped demo model)")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seg-") as tmp:
        out = run(args.parts, args.seed, args.model, Path(tmp))
    for method, d in out["slices"].items():
        print(f"{method:8s} " + "  ".join(f"{c}: IoU {v['defect_iou']:.3f} (correct-class {v['defect_iou_correctly_classified']:.3f}"
                                          f", n {v['n']}) mIoU {v['miou_paper']:.3f}" for c, v in d.items()))
    for c, v in out["areas"].items():
        print(f"{c} areas: median relative error {v['median_rel_error']:.3f} over {v['parts']} parts")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
