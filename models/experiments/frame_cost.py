"""``valve-model frame-cost``: what each runtime stage costs per 8-slice frame, side by side in one run.

The daemon's path for one frame is ROI -> ONNX (classes, Grad-CAM++, the unknown score) -> masks -> decide.
This measures, on the same frames and interleaved (so a busy or slower machine shifts all figures alike
and the ratios stay comparable):

    infer (plain)    the graph without the unknown score (models.unknown.strip_unknown)
    infer (unknown)  the shipped graph, with it
    segment (otsu)   Otsu on the upsampled map
    segment (refined) the default (service/segment.py)
    decide

and prints mean, median and p90 per stage in ms, plus the two costs the issues bound: refined masks and the
unknown score, each relative to the whole frame (roi + infer + segment + decide, means) without it.

    valve-model frame-cost [--frames DIR] [--parts 16] [--repeats 5] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ms(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"mean_ms": round(float(a.mean()), 3), "median_ms": round(float(np.median(a)), 3),
            "p90_ms": round(float(np.quantile(a, 0.9)), 3), "n": len(a)}


def measure(frames: Path, model: Path | None, repeats: int, threads: int) -> dict:
    import cv2
    import onnx

    from models.unknown import strip_unknown
    from service.config import Thresholds
    from service.decide import decide
    from service.infer import InferenceModel, shipped_model_path
    from service.roi import RoiParams, extract
    from service.segment import masks_for
    from service.sim.synth import read_manifest

    model = Path(model) if model else shipped_model_path()
    with_u = InferenceModel(model, providers=("CPUExecutionProvider",), intra_op_threads=threads)
    tmp = Path(tempfile.mkdtemp(prefix="frame-cost-"))
    proto = onnx.load(str(model))
    if not strip_unknown(proto):
        raise SystemExit(f"frame-cost: {model} has no unknown score to compare against")
    onnx.save(proto, str(tmp / "model.onnx"))
    meta = json.loads(model.with_suffix(".json").read_text())
    meta.pop("unknown", None)
    meta["outputs"] = [o for o in meta["outputs"] if (o.get("name") if isinstance(o, dict) else o) != "unknown"]
    from service.infer import sha256_file
    meta["sha256"] = sha256_file(tmp / "model.onnx")
    (tmp / "model.json").write_text(json.dumps(meta))
    plain = InferenceModel(tmp / "model.onnx", providers=("CPUExecutionProvider",), intra_op_threads=threads)

    images = [cv2.imread(str(frames / r["file"]), cv2.IMREAD_GRAYSCALE) for r in read_manifest(frames)]
    thresholds = Thresholds().model_dump()
    t: dict[str, list[float]] = {k: [] for k in ("roi", "infer_plain", "infer_unknown", "segment_otsu",
                                                 "segment_refined", "decide")}
    for _ in range(repeats):
        for img in images:
            t0 = time.perf_counter()
            batch = extract(img, RoiParams())
            t["roi"].append(time.perf_counter() - t0)
            for key, m in (("infer_plain", plain), ("infer_unknown", with_u)):
                t0 = time.perf_counter()
                pred = m.run(batch.slices)
                t[key].append(time.perf_counter() - t0)
            for method in ("otsu", "refined"):
                t0 = time.perf_counter()
                masks = masks_for(pred.saliency, pred.predicted, with_u.segmented, slices=batch.slices,
                                  method=method)
                t[f"segment_{method}"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            decide(1, 1, pred, masks, thresholds, with_u.segmented, inspect_ms=0.0,
                   unknown_threshold=with_u.unknown_threshold)
            t["decide"].append(time.perf_counter() - t0)
    stats = {k: _ms(v) for k, v in t.items()}
    med = {k: v["mean_ms"] for k, v in stats.items()}  # means: most slices need no mask, the cost is in the tail
    base_otsu = med["roi"] + med["infer_plain"] + med["segment_otsu"] + med["decide"]
    base_refined = med["roi"] + med["infer_plain"] + med["segment_refined"] + med["decide"]
    return {"model": str(model), "frames": str(frames), "parts": len(images), "repeats": repeats,
            "threads": threads, "stages": stats,
            "refined_over_otsu_frame": round((med["segment_refined"] - med["segment_otsu"]) / base_otsu, 4),
            "unknown_over_plain_frame": round((med["infer_unknown"] - med["infer_plain"]) / base_refined, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="valve-model frame-cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default=None, help="a `valve-inspect synth` folder (default: render --parts)")
    p.add_argument("--parts", type=int, default=16)
    p.add_argument("--seed", type=int, default=909)
    p.add_argument("--model", default=None, help="model.onnx with the unknown score (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    frames = Path(args.frames) if args.frames else None
    if frames is None:
        from service.sim.synth import write_dataset

        frames = Path(tempfile.mkdtemp(prefix="frame-cost-frames-"))
        write_dataset(frames, args.parts, seed=args.seed, mix="good=1,dirt=1,scratch=1,ec=1", overwrite=True)
    r = measure(frames, args.model, args.repeats, args.threads)
    for k, v in r["stages"].items():
        print(f"  {k:16s} mean {v['mean_ms']:8.3f} ms   median {v['median_ms']:8.3f} ms   p90 {v['p90_ms']:8.3f} ms"
              f"   (n={v['n']})")
    print(f"refined masks add {100 * r['refined_over_otsu_frame']:.1f} % to a frame with Otsu masks; the unknown "
          f"score adds {100 * r['unknown_over_plain_frame']:.1f} % to a frame without it")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
