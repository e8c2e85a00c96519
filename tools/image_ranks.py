"""Where named test images rank in scored realdata runs (a diagnostic for "what limits the AP").

    python tools/image_ranks.py RUN [RUN ...] --images kos14/Part7.jpg[,kos32/Part2.jpg] [--json PATH]

Each RUN is a scored ``valve-model realdata`` run (its ``image_metrics.json`` holds every test image's
``defect_logodds``) with its ``config.json`` (the classes, to know which one is good). For each run: the
image-level defect-vs-good AP, and for each named image its log-odds, how many images of the other side
rank beyond it (for a defective image the good images scoring above it; for a good image the defective ones
below it) and the AP without it, the same leave-one-out as the summary's "what limits the AP" table
(``models.experiments.realdata.ap_limits``), which lists only each run's top three images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.experiments.realdata import ap_limits
from models.tiles import good_index


def ranks(run: Path, images: list[str]) -> dict:
    metrics_path, config_path = run / "image_metrics.json", run / "config.json"
    for p in (metrics_path, config_path):
        if not p.is_file():
            raise SystemExit(f"{run}: no {p.name}; score the run first (valve-model realdata train scores it)")
    per_image = json.loads(metrics_path.read_text())["per_image"]
    good = good_index(json.loads(config_path.read_text())["model"]["classes"])
    rows = {r["image"]: r for r in ap_limits([per_image], good, top=len(per_image))}
    scores = {r["source"]: r.get("defect_logodds", r.get("defect_score")) for r in per_image}
    missing = [i for i in images if i not in scores]
    if missing:
        raise SystemExit(f"{run}: no test image {', '.join(missing)} (its test images are named like "
                         f"{next(iter(scores))})")
    ap = next(iter(rows.values()))["ap"][0] if rows else None
    out = {"run": str(run), "ap": ap, "images": {}}
    for name in images:
        r = rows.get(name)
        out["images"][name] = {"logodds": scores[name],
                               "defective": None if r is None else r["defective"],
                               "beyond": None if r is None else r["beyond"][0],
                               "ap_without": None if r is None else r["ap_without"][0]}
    return out


def _num(v, spec: str = ".4f") -> str:
    """A figure for the printout, "-" where there is none (an image the leave-one-out cannot rank)."""
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--images", required=True, help="comma list of test images, as the summary names them")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    images = [s.strip() for s in args.images.split(",") if s.strip()]
    found = [ranks(run, images) for run in args.runs]
    for f in found:
        print(f"{f['run']}: AP {_num(f['ap'])}")
        for name, r in f["images"].items():
            side = {True: "defective", False: "good", None: "not ranked"}[r["defective"]]
            print(f"  {name} ({side}): log-odds {_num(r['logodds'], '.2f')}, {_num(r['beyond'], 'd')} beyond, "
                  f"AP without {_num(r['ap_without'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": images, "runs": found}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
