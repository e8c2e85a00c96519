"""Pool the per-seed figures of several ``valve-model realdata summary`` files into one mean ± std.

    python tools/pool_seeds.py SUMMARY.json [SUMMARY.json ...] --dataset magnetic-tile [--labels mask] [--json OUT]

``realdata summary`` reads each seed's run folder, and run folders are not committed: when the seeds of one
recipe were trained in different sessions (one folder lost between them), each session's summary holds its
own seeds. This tool takes the per-seed ``values`` those files keep, checks that they describe the same
recipe (the same protocol text, the same test images, no seed twice) and writes the pooled figures, with
the file each seed came from. It refuses files that disagree, naming the difference: pooling seeds of two
recipes would report a spread that is not the seeds'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: the per-seed figures a summary's label mode holds as {"values": [...]}; pooled in this order.
METRICS = ("accuracy", "accuracy_calibrated", "balanced_accuracy", "balanced_accuracy_calibrated", "ap",
           "defect_vs_good_accuracy", "defect_iou", "miou_paper")
#: lists with one entry per seed, carried over beside the pooled figures.
PER_SEED = ("thresholds_logodds", "best_epochs", "epochs_run", "train_wall_s", "bn_check_gap_points")


def stat(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v),
            "values": values}


def entry_of(path: Path, dataset: str, labels: str) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read a summary ({e}); give files written by `valve-model realdata "
                         f"summary --summary FILE`") from e
    if dataset not in summary:
        raise SystemExit(f"{path} has no {dataset!r} entry (it has {sorted(summary)}); check --dataset")
    modes = summary[dataset].get("label_modes", {})
    if labels not in modes:
        raise SystemExit(f"{path}: {dataset} has no {labels!r} labels (it has {sorted(modes)}); check --labels")
    return modes[labels]


def legacy_protocol(protocol: str) -> str:
    """A protocol text written before ``realdata`` named the augmentation, with the augmentation those runs had.

    Summaries written before the augmentation became an option (b1ee67a) leave it out of the text; those runs
    trained with the then fixed jitter, which is ``LEGACY_OPTIONS``'s (flips, brightness +-10, contrast +-0.1), the
    same rule ``realdata`` applies to such runs' config.json. A text that names its augmentation is kept as it is.
    """
    if "augmentation" in protocol or "BN recalibration" not in protocol:
        return protocol
    from models.data import Augment
    from models.experiments.realdata import augmentation_text
    from models.run_dir import LEGACY_OPTIONS

    legacy = Augment(**{k: LEGACY_OPTIONS[k] for k in ("rot90", "brightness", "contrast")})  # as train.py builds it
    return protocol.replace("BN recalibration", augmentation_text({"augmentation": legacy.to_dict()})
                            + "BN recalibration", 1)


def pool(paths: list[Path], dataset: str, labels: str) -> dict:
    entries = [(p, entry_of(p, dataset, labels)) for p in paths]
    legacy = []
    for p, e in entries:
        text = legacy_protocol(e["protocol"])
        if text != e["protocol"]:
            legacy.append(str(p))
            e["protocol"] = text
    first_path, first = entries[0]
    for p, e in entries[1:]:
        if e["protocol"] != first["protocol"]:
            raise SystemExit(f"{p} and {first_path} describe different recipes:\n  {e['protocol']}\n  "
                             f"{first['protocol']}\npool only the seeds of one recipe")
        if e.get("test_images") != first.get("test_images"):
            raise SystemExit(f"{p} was tested on {e.get('test_images')} images, {first_path} on "
                             f"{first.get('test_images')}: not the same test set")
    seeds: list[int] = []
    source: list[str] = []
    for p, e in entries:
        for s in e["seeds"]:
            if s in seeds:
                raise SystemExit(f"seed {s} is in {p} and in {source[seeds.index(s)]}: each seed once")
            seeds.append(s)
            source.append(str(p))
    out: dict = {"dataset": dataset, "labels": labels, "protocol": first["protocol"], "seeds": seeds,
                 "sources": source, "test_images": first.get("test_images")}
    if legacy:
        out["augmentation_read_as_legacy"] = legacy  # their text predates the augmentation clause
    for m in METRICS:
        if all(m in e for _, e in entries):
            out[m] = stat([v for _, e in entries for v in e[m]["values"]])
    for k in PER_SEED:
        if all(k in e for _, e in entries):
            out[k] = [v for _, e in entries for v in e[k]]
    return out


def fmt(s: dict, percent: bool) -> str:
    if s["mean"] is None:
        return "-"
    scale, unit = (100, " %") if percent else (1, "")
    digits = 1 if percent else 3
    text = f"{s['mean'] * scale:.{digits}f}"
    if s["std"] is not None:
        text += f" ± {s['std'] * scale:.{digits}f}"
    return text + unit


def table(pooled: dict) -> str:
    cols = [(m, m.endswith("accuracy") or m.endswith("calibrated") or "iou" in m) for m in METRICS if m in pooled]
    lines = ["| seeds | " + " | ".join(m for m, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| " + ", ".join(map(str, pooled["seeds"])) + " | "
             + " | ".join(fmt(pooled[m], pct) for m, pct in cols) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summaries", nargs="+", type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--labels", default="mask")
    ap.add_argument("--json", type=Path, help="write the pooled figures here")
    args = ap.parse_args(argv)
    pooled = pool(args.summaries, args.dataset, args.labels)
    print(table(pooled))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(pooled, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
