"""What limits the shipped demo model's held-out slice accuracy (docs/model.md, "What limits the demo model").

    python tools/demo_limits.py [--model service/data/model.onnx] [--work runs/demo-limits] [--json PATH]

Renders the demo model's held-out parts (``valve-model demo-model``'s test set: 120 parts, seed 2, its class
mix; reused when ``--work`` already holds them), cuts every frame with ``service.roi.extract`` exactly as the
runtime does, classifies the slices with the exported model through ONNX Runtime (argmax of the softmax, as
the held-out report counts them) and, for every slice, measures what the labels cannot say:

* ``defect_px``: defect-mask pixels in the slice. synth labels a dirt or scratch slice with its part's
  defect at ``min_defect_px`` (40) or more pixels and *good* below, so a good slice of a dirt part may hold
  up to 39 pixels of dirt (a blob's rim spilling over a slice border).
* ``snr``: the defect's local visibility, |mean gray inside the mask - mean gray of a ring 2-8 px around it|
  divided by the ring's standard deviation (the surface's texture and shading there, at least one gray
  level: the saturated specular band has none); ``weber``: the same
  difference over the ring's mean gray.

It prints and writes (``--json``) the accuracy, the confusion of the errors, and the recall of the defect
slices and the false-alarm rate of the good slices by those measures, so the shortfall to the issue's 0.99
can be split into slices the labels make ambiguous, defects too faint to see, and the rest. A diagnostic, not
a recipe: nothing here changes the model or its labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from service.sim.synth import SEGMENTED

PX_BINS = ((1, 39), (40, 99), (100, 299), (300, 999), (1000, 10 ** 9))
SNR_BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, float("inf")))
RING = (2, 8)
#: gray levels: the ring's spread is never taken below one level (a ring in the saturated specular band has none)
NOISE_FLOOR = 1.0


def ring_contrast(slice_img: np.ndarray, mask: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """(snr, weber) of the masked pixels against a ring RING px around them in the same slice; None when the
    mask or the ring is empty."""
    if not mask.any():
        return None, None
    m = mask.astype(np.uint8)
    inner = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RING[0] + 1,) * 2)).astype(bool)
    outer = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RING[1] + 1,) * 2)).astype(bool)
    ring = outer & ~inner
    if ring.sum() < 10:
        return None, None
    g = slice_img.astype(np.float64)
    inside, around = g[mask], g[ring]
    diff = abs(inside.mean() - around.mean())
    return float(diff / max(around.std(), NOISE_FLOOR)), float(diff / max(around.mean(), 1.0))


def in_bin(value: float, lo: float, hi: float) -> bool:
    return lo <= value < hi if isinstance(hi, float) else lo <= value <= hi


def measure(model_path: Path | None, work: Path, parts: int, seed: int, mix: str, threads: int) -> list[dict]:
    from service.infer import InferenceModel
    from service.roi import extract
    from service.sim.synth import CLASSES, MANIFEST, read_manifest, slice_labels, write_dataset

    manifest = work / MANIFEST
    if not manifest.is_file():
        print(f"rendering {parts} parts (seed {seed}, mix {mix}) -> {work}", flush=True)
        write_dataset(work, parts=parts, seed=seed, mix=mix, overwrite=True)
    else:
        print(f"reusing the parts in {work}", flush=True)
    rows = read_manifest(manifest)
    seeds = {row["seed"] for row in rows}
    if len(rows) != parts or seeds != {seed}:
        raise SystemExit(f"{work} holds {len(rows)} parts of seed(s) {sorted(seeds)}, not {parts} of seed {seed}: "
                         f"pass another --work, or delete {work} to render them again")
    model = InferenceModel(model_path, intra_op_threads=threads)
    names = list(model.classes)
    if set(names) != set(CLASSES):
        raise SystemExit(f"{model.path}: classes {names} are not synth's {list(CLASSES)}")
    out = []
    for row in rows:
        frame = cv2.imread(str(work / row["file"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(work / row["mask"]), cv2.IMREAD_UNCHANGED) if row["mask"] else None
        # cut and labelled as synth's label_frame does, keeping the mask's slices for the contrast below
        batch = extract(frame)
        mask_slices = batch.frame_to_slices(mask > 0) if mask is not None else None
        labels, px = slice_labels(row["class"], mask_slices, row["min_defect_px"])
        if labels != row["slice_labels"]:
            raise SystemExit(f"{row['file']}: labels {labels} differ from the manifest's {row['slice_labels']}")
        pred = model.run(batch.slices)
        for i, label in enumerate(labels):
            snr = weber = None
            if mask_slices is not None:
                snr, weber = ring_contrast(batch.slices[i, 0], mask_slices[i].astype(bool))
            p = pred.probs[i]
            out.append({"part": row["part"], "slice": i, "part_class": row["class"], "label": label,
                        "pred": names[int(np.argmax(p))], "p_label": float(p[names.index(label)]),
                        "defect_px": int(px[i]), "snr": snr, "weber": weber})
    return out


def accuracy_where(slices: list[dict], keep) -> float:
    """Accuracy over the slices ``keep`` accepts (0 when it accepts none)."""
    kept = [s for s in slices if keep(s)]
    return sum(s["pred"] == s["label"] for s in kept) / len(kept) if kept else 0.0


def summarise(slices: list[dict]) -> dict:
    right = [s["pred"] == s["label"] for s in slices]
    errors = [s for s in slices if s["pred"] != s["label"]]
    confusion = Counter(f"{s['label']}->{s['pred']}" for s in errors)
    defect = [s for s in slices if s["label"] in SEGMENTED]
    good = [s for s in slices if s["label"] == "good"]

    def recall(rows: list[dict]) -> dict:
        return {"n": len(rows), "found": sum(r["pred"] == r["label"] for r in rows),
                "called_good": sum(r["pred"] == "good" for r in rows)}

    by_px = {f"{lo}+" if hi >= 10 ** 9 else f"{lo}-{hi}":
             {c: recall([s for s in defect if s["label"] == c and in_bin(s["defect_px"], lo, hi)])
              for c in SEGMENTED} for lo, hi in PX_BINS[1:]}
    by_snr = {f"{lo:g}-{hi:g}" if hi != float("inf") else f"{lo:g}+":
              {c: recall([s for s in defect if s["label"] == c and s["snr"] is not None and in_bin(s["snr"], lo, hi)])
               for c in SEGMENTED} for lo, hi in SNR_BINS}

    def false_alarms(rows: list[dict]) -> dict:
        return {"n": len(rows), "flagged": sum(r["pred"] != "good" for r in rows),
                "as": dict(Counter(r["pred"] for r in rows if r["pred"] != "good"))}

    good_groups = {
        "good parts": false_alarms([s for s in good if s["part_class"] == "good"]),
        "defect parts, no defect pixel": false_alarms([s for s in good if s["part_class"] != "good"
                                                       and s["defect_px"] == 0]),
        "defect parts, 1-39 defect px (below the label's 40)": false_alarms(
            [s for s in good if s["part_class"] != "good" and s["defect_px"] > 0]),
    }
    ambiguous = [s for s in errors if s["label"] == "good" and s["defect_px"] > 0]
    faint = [s for s in errors if s["label"] in SEGMENTED and s["pred"] == "good"
             and s["snr"] is not None and s["snr"] < 1.0]
    small = [s for s in errors if s["label"] in SEGMENTED and s["defect_px"] < 100]
    by_part: dict[int, list[dict]] = {}
    for s in slices:
        by_part.setdefault(s["part"], []).append(s)
    # a cut-off slice called a defect changes the part's accept/reject only when no other slice of the part is
    # called a defect, and adds a Reject bit of its own when no other slice is called that class
    cutoff_parts = {
        "flips_accept": sum(not any(o["pred"] != "good" for o in by_part[s["part"]] if o is not s) for s in ambiguous),
        "adds_a_class": sum(not any(o["pred"] == s["pred"] for o in by_part[s["part"]] if o is not s)
                            for s in ambiguous),
    }
    n = len(slices)
    return {
        "slices": n, "accuracy": sum(right) / n, "errors": len(errors), "confusion": dict(confusion.most_common()),
        "defect_recall_by_px": by_px, "defect_recall_by_snr": by_snr, "good_false_alarms": good_groups,
        "errors_explained": {
            "good label, 1-39 defect px (the label's cut-off)": len(ambiguous),
            "defect label, 40-99 px, any wrong class": len(small),
            "defect called good, 40-99 px": sum(s["pred"] == "good" for s in small),
            "defect called good, snr < 1 (fainter than the texture)": len(faint),
        },
        "cutoff_errors_in_their_parts": cutoff_parts,
        "accuracy_without_cutoff_slices": accuracy_where(
            slices, lambda s: not (s["label"] == "good" and s["defect_px"] > 0)),
        "accuracy_without_1_99_px_slices": accuracy_where(slices, lambda s: not 0 < s["defect_px"] < 100),
    }


def print_table(summary: dict) -> None:
    print(f"slices {summary['slices']}  accuracy {summary['accuracy']:.4f}  errors {summary['errors']}")
    print("confusion of the errors:", summary["confusion"])
    for title, key in (("defect px", "defect_recall_by_px"), ("snr", "defect_recall_by_snr")):
        print(f"recall by {title}:")
        for b, per in summary[key].items():
            print(f"  {b:>10}  " + "  ".join(f"{c} {v['found']}/{v['n']} (good {v['called_good']})"
                                            for c, v in per.items()))
    print("good slices flagged:")
    for g, v in summary["good_false_alarms"].items():
        print(f"  {g}: {v['flagged']}/{v['n']} {v['as']}")
    print("errors explained:", summary["errors_explained"])
    print("cut-off errors in their parts:", summary["cutoff_errors_in_their_parts"])
    print(f"accuracy without the good-labelled slices holding 1-39 defect px: "
          f"{summary['accuracy_without_cutoff_slices']:.4f}")
    print(f"accuracy without the slices holding 1-99 defect px: {summary['accuracy_without_1_99_px_slices']:.4f}")


def main(argv: list[str] | None = None) -> int:
    from models.demo_model import DEFAULT_MIX

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model.onnx (default: the shipped one)")
    ap.add_argument("--work", type=Path, default=Path("runs/demo-limits"), help="where the held-out parts go")
    ap.add_argument("--parts", type=int, default=120)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--mix", default=DEFAULT_MIX)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the summary (and every slice) here")
    args = ap.parse_args(argv)
    from service.sim.synth import CLASSES, parse_mix
    other = sorted(k for k, w in parse_mix(args.mix).items() if w > 0 and k not in CLASSES)
    if other:
        ap.error(f"--mix {args.mix!r} names {', '.join(other)}: the demo model knows only {', '.join(CLASSES)}")
    t0 = time.monotonic()
    slices = measure(args.model, args.work, args.parts, args.seed, args.mix, args.threads)
    summary = summarise(slices)
    print_table(summary)
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python tools/demo_limits.py " + " ".join(argv or sys.argv[1:]),
                                         "parts": args.parts, "seed": args.seed, "mix": args.mix,
                                         "summary": summary, "slices": slices}, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
