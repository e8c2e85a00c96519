"""The first epochs of several training runs side by side, read from their run directories.

    python tools/early_epochs.py RUN_DIR [RUN_DIR ...] [--epochs 3] [--json OUT]

Prints a Markdown table (per run: model channels, precision, seed, the training loss and validation
balanced accuracy of each of the first ``--epochs`` epochs, seconds per epoch) and writes the same rows as
JSON. docs/results.md's KolektorSDD trainability probe is built from it: runs stopped after a few epochs
of the real-data protocol, to see which ones leave the chance level (training loss ln 2 = 0.693 for two
classes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(run: Path, epochs: int) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()][:epochs]
    if len(log) < epochs:
        raise SystemExit(f"{run} logged {len(log)} epochs, fewer than --epochs {epochs}")
    m, t = cfg["model"], cfg["train"]
    channels = m.get("channels")
    if channels is None:
        from models.ira_cnn import ModelConfig

        mc = ModelConfig.from_dict(m)
        channels = [mc.stem_channels, *mc.block_channels]
    return {"run": str(run), "channels": list(channels), "width": m.get("width"), "head_pool": m.get("head_pool"),
            "precision": t.get("precision"), "seed": t.get("seed"), "threads": t.get("threads"),
            "train_loss": [r["train_loss"] for r in log], "val_bal_acc": [r["val_bal_acc"] for r in log],
            "seconds_per_epoch": sum(r["seconds"] for r in log) / len(log)}


def table(rows: list[dict]) -> str:
    n = len(rows[0]["train_loss"])
    head = ["run", "channels (stem, blocks)", "precision", "seed", *[f"loss ep {i + 1}" for i in range(n)],
            f"val bal. acc ep {n}", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([Path(r["run"]).name, ",".join(map(str, r["channels"])), str(r["precision"]),
                                        str(r["seed"]), *[f"{v:.3f}" for v in r["train_loss"]],
                                        f"{r['val_bal_acc'][-1]:.3f}", f"{r['seconds_per_epoch']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, not {args.epochs}")
    rows = [row(r, args.epochs) for r in args.runs]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"command": "python tools/early_epochs.py " + " ".join(
            str(r) for r in args.runs) + f" --epochs {args.epochs}", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
