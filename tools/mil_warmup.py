"""Whether multiple-instance training needs a warm-up: made-up bags, seeds x warm-up epochs.

    python tools/mil_warmup.py [--seeds 0,1,2,3,4,5] [--warmups 0,1,2] [--epochs 8] [--json F]

A diagnostic, not a result on real data. Each "image" is four 48 x 48 tiles of gray noise; in a defective image
one tile (a seeded position) also holds a bright 12 x 12 square. With image labels every tile of a defective image
is labelled defect, so three quarters of the defect labels are wrong. ``valve-model train --mil 1 --mil-warmup W``
trains the compact model on 12 good and 12 defective images (input 48, batch 16, 96 draws an epoch, one thread)
and the table reports, per seed and W, the share of selected tiles that hold the square in each epoch
(``mil_hit``, from the masks beside the tiles, which never train) and the best validation balanced accuracy of the
image verdicts.

Selecting from the first epoch (W = 0) reads the initialisation, which ranks the tiles at random; a noise tile
selected first is learnt as the defect and keeps being selected. A warm-up of W epochs on every tile with its
image's label lets the square, the only thing the defective images have and the good ones lack, rank first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SIZE = 48


def make_bag_dataset(root: Path, n_good: int = 12, n_defect: int = 12, tiles: int = 4, seed: int = 0) -> Path:
    """Image-labelled tiles ``<img>__t<k>.png`` in good/ or defect/; in a defect image one tile holds a bright
    square, the others are noise like the good tiles; masks beside the defect images' tiles (the square)."""
    rng = np.random.default_rng(seed)
    for cls, n in (("good", n_good), ("defect", n_defect)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            hot = int(rng.integers(tiles)) if cls == "defect" else -1
            for k in range(tiles):
                img = rng.normal(100, 12, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                if k == hot:
                    y, x = rng.integers(4, SIZE - 16, 2)
                    img[y:y + 12, x:x + 12] = 230
                    mask[y:y + 12, x:x + 12] = 255
                stem = f"{cls}{i:02d}__t{k}"
                cv2.imwrite(str(root / cls / f"{stem}.png"), img)
                if cls == "defect":
                    cv2.imwrite(str(root / cls / f"{stem}_mask.png"), mask)
    return root


def run(seeds: list[int], warmups: list[int], epochs: int, precision: str, work: Path) -> list[dict]:
    import torch

    from models.cli import main as cli_main

    torch.set_num_threads(1)
    data = make_bag_dataset(work / "data")
    rows = []
    for warmup in warmups:
        for seed in seeds:
            out = work / f"w{warmup}-s{seed}"
            t0 = time.time()
            rc = cli_main(["train", "--data", str(data), "--out", str(out), "--preset", "compact", "--input-size",
                           str(SIZE), "--threads", "1", "--batch-size", "16", "--epochs", str(epochs), "--mil", "1",
                           "--mil-warmup", str(warmup), "--epoch-size", "96", "--seed", str(seed),
                           "--precision", precision])
            if rc != 0:
                raise SystemExit(f"training {out} failed ({rc})")
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            rows.append({"warmup": warmup, "seed": seed, "mil_hit": [r.get("mil_hit") for r in log],
                         "best_val_bal_acc": max(r["val_bal_acc"] for r in log), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4,5")
    p.add_argument("--warmups", default="0,1,2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--precision", default="fp32", help="fp32 (default) or auto")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mil-warmup-"))
    try:
        rows = run([int(s) for s in args.seeds.split(",")], [int(w) for w in args.warmups.split(",")], args.epochs,
                   args.precision, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| warm-up epochs | seeds whose last selection holds the square | best validation balanced accuracy |")
    print("|---|---|---|")
    for w in sorted({r["warmup"] for r in rows}):
        rs = [r for r in rows if r["warmup"] == w]
        found = sum(1 for r in rs if r["mil_hit"][-1] == 1.0)
        accs = ", ".join(f"{r['best_val_bal_acc']:.2f}" for r in rs)
        print(f"| {w} | {found} of {len(rs)} | {accs} |")
    if args.json:
        import platform

        Path(args.json).write_text(json.dumps({
            "command": "python tools/mil_warmup.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
