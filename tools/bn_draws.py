"""Which images the BN recalibration should read: the training side as it lies, or drawn as training draws it.

    python tools/bn_draws.py RUN [RUN ...] --train-tiles DIR --test-tiles DIR [--recal 256] [--check 1024] [--json F]

A diagnostic, not a recipe. For each run's saved weights it recomputes the BN running statistics three ways
and scores each:

* ``natural-sorted``: what ``valve-model train`` did before 2026-12-02: the first 256 training images of a seeded
  permutation (the class mix as it lies: Magnetic-tile's training tiles are 86 % good), batched in index order.
  A dataset lists its images class by class, so every batch held one class and the running variance (the mean
  of the batches' variances) missed the variance between the classes;
* ``natural``: the same images batched in a fixed shuffled order (``models.train.recalibrate_bn`` now);
* ``balanced``: 256 images drawn as class-balanced sampling draws the training batches (1/6 good on
  Magnetic-tile), shuffled: the statistics the weights were trained with (``valve-model train --bn-draws
  balanced``).

For each it reports:

* ``bn_check`` as training runs it (``natural``: batches of the first ``--check`` images of the same
  permutation) and over class-balanced draws (``balanced``: ``--check`` indices drawn as the training sampler
  draws, a class uniformly, then an image of it; seeded), i.e. batches composed as the training batches were;
* the validation side's tile-level balanced accuracy and image-level calibrated balanced accuracy;
* the test side's image metrics: AP, accuracy at the daemon's 0.5, and at the bound calibrated on validation.

The weights of each variant are written beside the run as ``bn-<draws>.safetensors`` (removed afterwards
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def measure(run: Path, args: argparse.Namespace) -> list[dict]:
    """The rows of one run (one per recalibration variant)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from models.checkpoint import load, save_weights
    from models.data import ImageDataset, load_samples, split_samples
    from models.tiles import (
        calibrate_threshold,
        good_index,
        image_metrics,
        image_scores,
        read_tiles_manifest,
        tile_probabilities,
        validation_manifest,
    )
    from models.train import balanced_draws, bn_check, recalibrate_bn, recalibrate_bn_in_order

    rows = []
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["train"]
    data = load_samples(cfg["data"]["path"], cfg["data"]["format"])
    train_s, _ = split_samples(data, t["val_fraction"], t["seed"])
    labels = [s.label for s in train_s]
    order = np.random.default_rng([t["seed"], 7]).permutation(len(train_s))
    model = load(run / args.weights, map_location="cpu").eval()
    saved = load_file(str(run / args.weights))
    ds = ImageDataset(train_s, model.config.input_size, None)
    dev = torch.device("cpu")
    # "natural-sorted" is what train.py did before 2026-12-02: the natural draws in index order, i.e. class by class
    # (a dataset lists its images class by class), so each recalibration batch held one class
    draws = {"natural-sorted": sorted(order[:args.recal].tolist()), "natural": order[:args.recal].tolist(),
             "balanced": balanced_draws(labels, args.recal, t["seed"])}
    if args.variants:
        draws = {k: v for k, v in draws.items() if k in args.variants.split(",")}
    checks = {"natural": sorted(order[:args.check].tolist()), "balanced": balanced_draws(labels, args.check, t["seed"] + 1)}
    val_manifest = validation_manifest(run, Path(args.train_tiles))
    test_manifest = read_tiles_manifest(Path(args.test_tiles))
    good = good_index(list(model.config.classes))
    for name, idx in draws.items():
        model.load_state_dict(saved, strict=True)
        if name == "natural-sorted":
            recalibrate_bn_in_order(model, ds, dev, t["batch_size"], idx)
        else:  # batched in a fixed shuffled order
            recalibrate_bn(model, ds, dev, t["batch_size"], idx)
        wname = f"bn-{name}.safetensors"
        save_weights(run / wname, model, {"recal": name})
        row: dict = {"run": str(run), "recal_draws": name, "recal_images": len(idx),
                     "recal_good_share": round(float(np.mean([labels[i] == good for i in idx])), 3)}
        for cname, cidx in checks.items():
            c = bn_check(model, ds, dev, t["batch_size"], cidx)
            row[f"check_{cname}"] = {k: c[k] for k in ("images", "batch_stats_acc", "running_stats_acc",
                                                       "running_minus_batch_points")}
        vprobs = tile_probabilities(run, Path(args.train_tiles), val_manifest, weights=wname, cache=False)
        classes = val_manifest["classes"]
        per = {}
        for im in val_manifest["images"]:
            for tile in im["tiles"]:
                true = classes.index(tile["label"]) if "label" in tile else None
                if true is None:
                    continue
                ok = int(np.argmax(vprobs[tile["file"]]) == true)
                c = per.setdefault(true, [0, 0])
                c[0] += ok
                c[1] += 1
        row["val_tile_balanced_acc"] = float(np.mean([a / b for a, b in per.values()])) if per else None
        vscored = image_scores(val_manifest, vprobs)
        cal = calibrate_threshold(vscored)
        row["val_image_calibrated_balanced"] = cal["balanced_accuracy"]
        tprobs = tile_probabilities(run, Path(args.test_tiles), test_manifest, weights=wname, cache=False)
        at05 = image_metrics(image_scores(test_manifest, tprobs))
        atcal = image_metrics(image_scores(test_manifest, tprobs, threshold_logodds=cal["threshold_logodds"]))
        row["test"] = {"ap": at05["ap"], "class_ap": at05["class_ap"], "accuracy_at_0.5": at05["accuracy"],
                       "balanced_at_0.5": at05["balanced_accuracy"], "calibrated_accuracy": atcal["accuracy"],
                       "calibrated_balanced": atcal["balanced_accuracy"], "calibrated_recall": atcal["recall"]}
        rows.append(row)
        cn, cb = row["check_natural"], row["check_balanced"]
        print(f"{run} recal {name:14s} (good share {row['recal_good_share']:.2f}): check natural batch "
              f"{cn['batch_stats_acc']:.4f} running {cn['running_stats_acc']:.4f} ({cn['running_minus_batch_points']:+.2f}); "
              f"balanced batch {cb['batch_stats_acc']:.4f} running {cb['running_stats_acc']:.4f} "
              f"({cb['running_minus_batch_points']:+.2f}); val tile bal {row['val_tile_balanced_acc']:.3f}; "
              f"test AP {row['test']['ap']:.3f} acc@0.5 {row['test']['accuracy_at_0.5']:.3f} "
              f"cal acc {row['test']['calibrated_accuracy']:.3f} cal bal {row['test']['calibrated_balanced']:.3f}",
              flush=True)
        if not args.keep:
            (run / wname).unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--train-tiles", required=True)
    p.add_argument("--test-tiles", required=True)
    p.add_argument("--recal", type=int, default=256)
    p.add_argument("--check", type=int, default=1024)
    p.add_argument("--weights", default="model.safetensors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--variants", default=None, help="comma-separated subset of natural-sorted,natural,balanced")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for run in map(Path, args.runs):
        rows += measure(run, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
