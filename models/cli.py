"""``valve-model``: the model side's command line (torch). Dispatch only; see service.cli.

Each command reports its own user errors; a model-side error that escapes one (any
models.errors.ValveModelError) ends here as ``valve-model <command>: error: <message>`` and exit 2
(or the error's own ``exit_code``: export's ParityError exits 1), never as a traceback. Other
exceptions are bugs and propagate.
"""

from __future__ import annotations

import sys

from models.errors import ValveModelError
from service.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.train:main", "train IRA-CNN on a dataset"),
    "evaluate": ("models.evaluate:main", "evaluate a run: classification and segmentation metrics, report"),
    "export": ("models.export:main", "export a run to ONNX with Grad-CAM++ inside the graph"),
    "build-dataset": ("models.build_dataset:main", "slice camera frames into the 'folders' dataset format"),
    "tiles": ("models.tiles:main", "cut real images into S x S tiles at native resolution; image verdicts from tiles"),
    "bench": ("models.experiments.saliency_bench:main", "PyTorch eager+autograd vs ONNX Runtime in-graph Grad-CAM++"),
    "demo-model": ("models.demo_model:main", "regenerate the shipped demo model end to end (synthetic data)"),
    "realdata": ("models.experiments.realdata:main", "the paper's slicing on KolektorSDD/Magnetic-tile: tiles, "
                 "train (seeds), summary.json"),
    "frame-cost": ("models.experiments.frame_cost:main", "per-stage cost of one 8-slice frame: refined masks and "
                   "the unknown score side by side"),
    "unknown": ("models.unknown:main", "the unknown-defect score: attach (fit + calibrate), evaluate, measure"),
    "results": ("models.experiments.results.command:main", "regenerate one table of docs/results.md (cached runs, "
                "seeds, timing)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch("valve-model", COMMANDS, argv)
    except ValveModelError as exc:
        print(f"valve-model {argv[0]}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
