"""How a trained run's BN check depends on the batch size of its batch-statistics side (a diagnostic).

    python tools/bn_batch_size.py RUN [RUN ...] [--sizes 16,64,256] [--json docs/results/bn-batch-size.json]

For each run (a ``valve-model train`` folder trained with ``--bn-draws balanced``): the saved weights as they
are (their running statistics recalibrated when they were saved) and ``models.train.bn_check`` over the run's own
check images (``balanced_draws(labels, 1024, seed)``, as training drew them) with the batch statistics taken
over batches of each size. Training checks with its batch size (16 on the real-data protocol); if the gap
shrinks with larger batches it is the noise of small batches' statistics, not a lag of the running ones.
docs/results.md ("The BN check measures the batch statistics' noise") reads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--sizes", default="16,64,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from models.checkpoint import load
    from models.data import ImageDataset, load_samples, split_samples
    from models.train import BN_CHECK_IMAGES, balanced_draws, bn_check

    torch.set_num_threads(args.threads)
    out = []
    for run in map(Path, args.runs):
        cfg = json.loads((run / "config.json").read_text())
        t = cfg["train"]
        if t.get("bn_draws") != "balanced":
            raise SystemExit(f"{run} was trained with --bn-draws {t.get('bn_draws', 'natural')}: this reads the "
                             "check images of a --bn-draws balanced run")
        data = load_samples(cfg["data"]["path"], cfg["data"]["format"])
        train_s, _ = split_samples(data, t["val_fraction"], t["seed"])
        labels = [s.label for s in train_s]
        model = load(run / "model.safetensors", map_location="cpu").eval()
        ds = ImageDataset(train_s, model.config.input_size, None)
        idx = balanced_draws(labels, max(t["bn_recal"], BN_CHECK_IMAGES), t["seed"])  # the run's own check images
        for bs in (int(x) for x in args.sizes.split(",")):
            c = bn_check(model, ds, torch.device("cpu"), bs, idx)
            out.append({"run": str(run), "batch": bs, **c})
            print(f"{run}  batch {bs:4d}  batch statistics {c['batch_stats_acc']:.4f}  running {c['running_stats_acc']:.4f}"
                  f"  running - batch {c['running_minus_batch_points']:+.2f} points", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
