"""How many images and tiles of each class a real-data run trained, validated and was tested on.

    python tools/data_budget.py RUN_DIR [--json OUT]

RUN_DIR is one ``valve-model realdata train`` run (``<runs>/<dataset>-<labels>/seed<N>``); its tiles are in
``<runs>/tiles/<dataset>-<labels>/{train,test}`` and its split.json names the tiles it validated on (the
grouped split keeps an image's tiles on one side). Prints a Markdown table, one row per class: images and
tiles on the training, validation and test side. docs/results.md reads it as the data budget of a target:
how many examples of each defect a model learns from, and how many decide its validation figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def budget(run: Path) -> dict:
    run = Path(run)
    from models.experiments.realdata import run_tiles

    folders = {side: run_tiles(run, side) for side in ("train", "test")}
    for side, folder in folders.items():
        if not (folder / "tiles.json").is_file():
            raise SystemExit(f"{folder / 'tiles.json'} not found: give a run folder <runs>/<dataset>-<labels>/seed<N> "
                             f"whose runs folder still holds its tiles ({side} side)")
    if not (run / "split.json").is_file():
        raise SystemExit(f"{run / 'split.json'} not found: the run's validation split is needed")
    val = set(json.loads((run / "split.json").read_text())["val"])
    train = json.loads((folders["train"] / "tiles.json").read_text())
    test = json.loads((folders["test"] / "tiles.json").read_text())
    classes = train["classes"]
    images = {side: collections.Counter() for side in ("train", "val", "test")}
    tiles = {side: collections.Counter() for side in ("train", "val", "test")}
    for im in train["images"]:
        in_val = [t["file"] in val for t in im["tiles"]]
        if any(in_val) and not all(in_val):
            raise SystemExit(f"{im['source']} has tiles on both sides of the split: not a grouped split")
        side = "val" if im["tiles"] and all(in_val) else "train"
        images[side][im["label"]] += 1
        for t in im["tiles"]:
            tiles[side][t["label"]] += 1
    for im in test["images"]:
        images["test"][im["label"]] += 1
        for t in im["tiles"]:
            tiles["test"][t["label"]] += 1
    rows = [{"class": c, **{f"{side}_images": images[side][c] for side in images},
             **{f"{side}_tiles": tiles[side][c] for side in tiles}} for c in classes]
    return {"run": str(run), "labels": train.get("spec", {}).get("labels"), "classes": classes, "rows": rows}


def table(b: dict) -> str:
    lines = ["| class | training images (tiles) | validation images (tiles) | test images (tiles) |",
             "|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['class']} | " + " | ".join(f"{r[f'{s}_images']} ({r[f'{s}_tiles']})"
                                                    for s in ("train", "val", "test")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    b = budget(args.run)
    print(table(b))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(b, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
