"""Where to put the image rule's threshold inside the validation gap: what each choice does on the test images
(a diagnostic for commissioning, not a recipe).

    python tools/threshold_rules.py RUN [RUN ...] [--json PATH]

Each RUN is a scored realdata run (its image_metrics.json holds the test images' scores and the calibration on
its validation images: ``good_max``, the highest good validation image, and ``defect_min``, the lowest
defective one). For four bounds on the image log-odds, and a ceiling:

* ``daemon``: 0, the daemon's p >= 0.5;
* ``good_max``: just above the highest good validation image (the most sensitive bound with no false reject
  on validation);
* ``midpoint``: the calibrated bound the results use;
* ``defect_min``: the lowest defective validation image (the least sensitive bound that still finds every
  validation defect);
* ``hindsight``: the bound with the best accuracy on the test images themselves (the lowest on ties): what
  the run's ranking allows at best, not a rule (it is set on the images it scores); +inf (written null)
  when calling nothing defective is best;

the test images' good recall (1 - false reject rate), defect recall (1 - escape rate) and accuracy, with the
defective test images each bound lets through. docs/results.md ("Where the bound sits") reads these rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from models.experiments.results.stats import mean_std

RULES = ("daemon", "good_max", "midpoint", "defect_min", "hindsight")


def bounds(calibration: dict) -> dict[str, float]:
    return {"daemon": 0.0, "good_max": math.nextafter(calibration["good_max"], math.inf),
            "midpoint": calibration["threshold_logodds"], "defect_min": calibration["defect_min"]}


def hindsight(per_image: list[dict]) -> float:
    """The bound with the highest accuracy on these very images (the lowest such bound on ties): what the
    ranking allows at best, a ceiling no rule set on other images can pass; not a rule anyone can use."""
    candidates = sorted({i["defect_logodds"] for i in per_image} | {math.inf})
    return max(candidates, key=lambda b: (score(per_image, b)["accuracy"], -b))


def score(per_image: list[dict], bound: float) -> dict:
    """Recalls and accuracy when an image is defective at log-odds >= ``bound``; label 0 is good."""
    good = [i for i in per_image if i["true"] == 0]
    bad = [i for i in per_image if i["true"] != 0]
    ok_good = sum(i["defect_logodds"] < bound for i in good)
    found = [i for i in bad if i["defect_logodds"] >= bound]
    return {"good_recall": ok_good / len(good), "defect_recall": len(found) / len(bad),
            "accuracy": (ok_good + len(found)) / len(per_image),
            "escaped": sorted(i["source"] for i in bad if i["defect_logodds"] < bound)}


def mean_and_std(values) -> dict:
    m, s, _ = mean_std(values)
    return {"mean": m, "std": s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in args.runs:
        m = json.loads((Path(name) / "image_metrics.json").read_text())
        cal = m.get("calibrated", {}).get("calibration")
        if cal is None or "good_max" not in cal:
            raise SystemExit(f"{name}/image_metrics.json has no calibration: run `valve-model realdata calibrate` first")
        if len({i["true"] for i in m["per_image"]}) != 2:
            raise SystemExit(f"{name}: this diagnostic is for a good-vs-defective dataset (KolektorSDD)")
        bound_of = {**bounds(cal), "hindsight": hindsight(m["per_image"])}
        # JSON has no infinity: a hindsight bound of +inf (nothing called defective is best) is written as null
        row = {"run": name, "validation_images": cal["images"], "validation_defective": cal["defect_images"],
               "bounds": {k: None if math.isinf(b) else b for k, b in bound_of.items()}, "rules": {}}
        for rule, b in bound_of.items():
            row["rules"][rule] = score(m["per_image"], b)
            r = row["rules"][rule]
            print(f"{name}  {rule:10s} bound {b:7.2f}  good {100 * r['good_recall']:5.1f} %  defect "
                  f"{100 * r['defect_recall']:5.1f} %  accuracy {100 * r['accuracy']:5.1f} %  escaped "
                  f"{', '.join(r['escaped']) or '-'}")
        rows.append(row)
    mean = {rule: {k: mean_and_std(r["rules"][rule][k] for r in rows)
                   for k in ("good_recall", "defect_recall", "accuracy")} for rule in RULES}
    for rule in RULES:
        print(f"mean over {len(rows)} runs  {rule:10s} " + "  ".join(
            f"{k} {100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] is not None else "")
            for k, v in mean[rule].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "rows": rows, "mean": mean}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
