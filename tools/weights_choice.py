"""Which weights of a realdata run to keep: the best validation epoch's or the last epoch's (a diagnostic).

    python tools/weights_choice.py RUN [RUN ...] [--segmentation] [--json PATH]

Each RUN is a ``valve-model realdata`` run folder (``<runs>/<dataset>-<labels>/seed<N>``); its test and training
tiles are the ones beside it (``<runs>/tiles/<dataset>-<labels>/{test,train}``). For both weight files the run
saves (``model.safetensors``: the best validation balanced accuracy; ``last.safetensors``: the final epoch, both
BN-recalibrated when saved; for a run trained with ``--ema`` the final epoch's weights are the average's,
``ema.safetensors``, since the kept weights and the logged validation figures are the average's too) the test images are scored exactly as ``valve-model realdata train`` scores them
(``models.tiles.evaluate_images``: AP of the image log-odds, accuracy at the daemon's 0.5 and at the threshold
calibrated on the run's validation images; with ``--segmentation`` the runtime masks' defect IoU too). The run's
cached probabilities are not touched (``cache=False``).

docs/results.md ("Which weights to keep") reads these rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WEIGHTS = ("model.safetensors", "last.safetensors")


def weight_files(run: Path) -> tuple[str, str]:
    """The kept and the final epoch's weight files of ``run``: the average's (ema.safetensors) where it trained
    with --ema, so that both are the weights validation scored."""
    train = json.loads((run / "config.json").read_text()).get("train", {})
    return (WEIGHTS[0], "ema.safetensors") if train.get("ema") else WEIGHTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--segmentation", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from models.experiments.realdata import best_epoch, run_tiles
    from models.run_dir import LOG_NAME, read_log
    from models.tiles import evaluate_images

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.runs:
        run = Path(name)
        tiles = run_tiles(run, "train").parent  # <runs>/tiles/<dataset>-<labels> (the image tiles for mil)
        log = read_log(run / LOG_NAME)
        row = {"run": str(run), "epochs": len(log), "best_epoch": best_epoch(run),
               "val_bal_acc": {"best": max(r["val_bal_acc"] for r in log), "last": log[-1]["val_bal_acc"]},
               "weights": {}}
        for weights in weight_files(run):
            if not (run / weights).is_file():
                raise SystemExit(f"{run / weights} is missing: this diagnostic needs a run saved by valve-model train")
            t0 = time.time()
            m = evaluate_images(run, tiles / "test", None, segmentation=args.segmentation,
                                calibrate_on=tiles / "train", weights=weights, cache=False)
            cal = m["calibrated"]
            row["weights"][weights] = {
                "ap": m["ap"], "accuracy": m["accuracy"], "calibrated_accuracy": cal["accuracy"],
                "threshold_logodds": cal["calibration"]["threshold_logodds"],
                "defect_iou": m.get("defect_iou"), "wall_s": round(time.time() - t0, 1)}
            w = row["weights"][weights]
            print(f"{run}  {weights:18s} AP {w['ap']:.4f}  acc@0.5 {w['accuracy']:.3f}  "
                  f"calibrated {w['calibrated_accuracy']:.3f}  bound {w['threshold_logodds']:.2f}"
                  + (f"  IoU {w['defect_iou']:.3f}" if w["defect_iou"] is not None else ""), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
