"""How big a trained run's BN gap is once the check sees more images (a diagnostic, not a recipe).

    python tools/bn_gap.py RUN [RUN ...] [--images 256,1024] [--recal 256,1024] [--threads 1]

For each run (a ``valve-model train`` folder) and each pair (recal, images): the saved weights, their BN
running statistics recomputed over the first ``recal`` of the run's BN images (``models.train.recalibrate_bn``,
the run's own seeded choice of training images, extended by the same permutation) and then
``models.train.bn_check`` over the first ``images`` of that permutation, exactly as training does at its end
(recal 256 and images 256 is what config.json's ``bn_check`` held before 2026-11-30; since then train checks up to
1024 images). Printed per row: batch-statistics and running-statistics accuracy and the gap in points.

docs/results.md ("The BN gap") reads these runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--images", default="256,1024")
    p.add_argument("--recal", default="256,1024")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from models.checkpoint import load
    from models.data import ImageDataset, load_samples, split_samples
    from models.train import bn_check, recalibrate_bn

    torch.set_num_threads(args.threads)
    rows = []
    for run in map(Path, args.runs):
        cfg = json.loads((run / "config.json").read_text())
        t = cfg["train"]
        data = load_samples(cfg["data"]["path"], cfg["data"]["format"])
        train_s, _ = split_samples(data, t["val_fraction"], t["seed"])
        order = np.random.default_rng([t["seed"], 7]).permutation(len(train_s))
        model = load(run / "model.safetensors", map_location="cpu").eval()
        saved = load_file(str(run / "model.safetensors"))
        ds = ImageDataset(train_s, model.config.input_size, None)
        for recal in (int(x) for x in args.recal.split(",")):
            model.load_state_dict(saved, strict=True)
            if recal != t["bn_recal"]:
                recalibrate_bn(model, ds, torch.device("cpu"), t["batch_size"], sorted(order[:recal].tolist()))
            for n in (int(x) for x in args.images.split(",")):
                idx = sorted(order[:n].tolist())
                check = bn_check(model, ds, torch.device("cpu"), t["batch_size"], idx)
                row = {"run": str(run), "recal": recal, **check}
                rows.append(row)
                print(f"{run}  recal {recal:5d}  images {check['images']:5d}  batch {check['batch_stats_acc']:.4f}  "
                      f"running {check['running_stats_acc']:.4f}  gap {check['gap_points']:.2f} points", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
