"""What ``valve-model results`` trains and evaluates: the protocol per dataset, the runs a table needs,
and the command's options (:class:`ResultsOptions`). Everything else reads the protocol through
:func:`protocol` (or ``ResultsOptions.proto``), never the table directly.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ValveModelError

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "datasets"
TABLES = ("table3", "table6", "table4", "figures")

#: settings shared by both datasets: the paper's optimiser (Adam, lr 1e-3) with batch 8 instead of
#: the paper's 32, the compact preset, class-balanced sampling, no validation hold-out (train on the
#: whole training side, the final epoch's weights), one torch thread per job. Why batch 8, balance
#: and these sizes: pilot runs on this 2-core CPU (docs/results.md, "Protocol"): at batch 32 the
#: 159 KolektorSDD training images give 5 steps an epoch, and 40 epochs at input 128 (balanced or
#: not) stayed at chance; at batch 8 and input 160 the training accuracy left chance after ~12 epochs.
_COMMON = {"preset": "compact", "balance": True, "val_fraction": 0.0, "batch_size": 8, "lr": 1e-3,
           "augment": True, "threads": 1}

#: the protocol per dataset; ``data`` is relative to --data-root (or absolute)
PROTOCOL: dict[str, dict] = {
    "kolektorsdd": {**_COMMON, "name": "KolektorSDD", "data": "kolektorsdd", "train_format": "kolektorsdd-train",
                    "test_format": "kolektorsdd-test", "input_size": 160, "epochs": 25},
    "magnetic-tile": {**_COMMON, "name": "Magnetic-tile", "data": "magnetic-tile",
                      "train_format": "magnetic-tile-train", "test_format": "magnetic-tile-test",
                      "input_size": 96, "epochs": 35},
}

#: the attention variants of the ablation (Table 6) and the saliency methods of Table 4
ABLATION = ("none", "iam-no-spatial", "cbam", "iam")
SALIENCY_METHODS = ("cam", "gradcam", "gradcam++")


class ResultsError(ValveModelError, RuntimeError):
    """A user error, or a training/evaluation that failed."""


@dataclass(frozen=True)
class Run:
    """One training: dataset, attention, seed under the (effective) protocol."""

    dataset: str
    attention: str
    seed: int
    epochs: int
    input_size: int

    @property
    def name(self) -> str:
        return f"{self.attention}-s{self.seed}-e{self.epochs}-i{self.input_size}"

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.name}"


def protocol(dataset: str, epochs: int | None = None) -> dict:
    """The dataset's protocol, with --epochs applied."""
    p = dict(PROTOCOL[dataset])
    p["protocol_epochs"] = p["epochs"]
    if epochs is not None:
        p["epochs"] = epochs
    return p


def dataset_names() -> list[str]:
    """The datasets the protocol knows, in its order."""
    return list(PROTOCOL)


@dataclass
class ResultsOptions:
    """One ``valve-model results`` command: the table, where runs and the doc go, datasets, seeds, jobs."""

    table: str
    runs: Path
    doc: Path
    datasets: list[str]
    seeds: list[int]
    jobs: int = 2
    epochs: int | None = None
    data_root: Path = DEFAULT_DATA_ROOT
    dry_run: bool = False
    argv: list[str] = field(default_factory=list)

    def proto(self, dataset: str) -> dict:
        return protocol(dataset, self.epochs)

    def data_path(self, dataset: str) -> Path:
        return (self.data_root / self.proto(dataset)["data"]).resolve()

    def run(self, dataset: str, attention: str, seed: int) -> Run:
        p = self.proto(dataset)
        return Run(dataset, attention, seed, p["epochs"], p["input_size"])

    def run_dir(self, run: Run) -> Path:
        return self.runs / run.dataset / run.name

    @property
    def figure_seed(self) -> int:
        return 0 if 0 in self.seeds else self.seeds[0]

    @property
    def command(self) -> str:
        return shlex.join(["valve-model", "results", *self.argv])


def needs(s: ResultsOptions) -> list[tuple[Run, tuple[str, ...]]]:
    """(run, evaluation methods) for the table."""
    out = []
    for ds in s.datasets:
        if s.table == "table3":
            out += [(s.run(ds, "iam", seed), ("gradcam++",)) for seed in s.seeds]
        elif s.table == "table6":
            out += [(s.run(ds, att, seed), ("gradcam++",)) for att in ABLATION for seed in s.seeds]
        elif s.table == "table4":
            out += [(s.run(ds, "iam", seed), SALIENCY_METHODS) for seed in s.seeds]
        elif s.table == "figures":
            out.append((s.run(ds, "iam", s.figure_seed), ("gradcam++",)))
    return out
