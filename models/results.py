"""``valve-model results``: regenerate one section of docs/results.md per command.

::

    valve-model results {table3,table6,table4,figures} [--runs runs/results] [--doc docs/results.md]
                        [--datasets kolektorsdd,magnetic-tile] [--seeds 0,1,2] [--jobs 2]
                        [--epochs N] [--data-root ../shared/datasets] [--dry-run]

The protocol is :data:`PROTOCOL` (one entry per dataset). Every table trains on the fixed seed-0
split (train:test 2:3, the ``*-train`` / ``*-test`` formats); the seeds are *training* seeds
(initialisation, shuffling, augmentation), not split seeds.

Runs live in ``RUNS/<dataset>/<attention>-s<seed>-e<epochs>-i<size>/`` (the ``valve-model train``
run directory, plus ``train.log``), and each evaluation in ``RUN/eval-<saliency>/`` (the
``valve-model evaluate`` report, log in ``RUN/eval-<saliency>.log``). Everything is cached:

- a training is skipped when its config.json matches the protocol (format, data path, preset,
  attention, input size, batch, lr, val_fraction, seed, balance, augment, epochs), its log.jsonl
  reached the protocol's epochs and model.safetensors exists; a run interrupted after at least one
  epoch is continued with ``--resume``; a run directory trained with other settings is an error
  (it is never overwritten);
- an evaluation is skipped when its metrics.json (and the figure written last) is newer than the
  weights and was made with the same saliency method and test format.

Trainings and evaluations are subprocesses (``python -m models.cli train|evaluate ...``), at
most ``--jobs`` at once, one torch thread each. A failure makes the command end with a non-zero exit
naming the log (the other runs still finish); the section of docs/results.md is then left as it was. The numbers also go to
``RUNS/<table>.json``. Each command rewrites only its own section, between
``<!-- BEGIN name -->`` and ``<!-- END name -->``.

``--epochs`` overrides the protocol's epochs for smoke runs; the run directories then differ
(their names hold the epochs) and the output and the section say loudly that these are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import fcntl
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PROG = "valve-model results"
REPO = Path(__file__).resolve().parents[1]
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

ABLATION = ("none", "iam-no-spatial", "cbam", "iam")
LABELS = {"none": "no attention", "iam-no-spatial": "IAM without spatial", "cbam": "CBAM", "iam": "IAM"}
#: the paper's Table 6 (accuracy %, their private valve data)
PAPER_ABLATION = {"none": 92.2, "iam-no-spatial": 96.2, "cbam": 96.2, "iam": 97.7}
SALIENCY_METHODS = ("cam", "gradcam", "gradcam++")
SEG_KEYS = ("pixel_accuracy", "iou", "precision", "recall", "f_score")
FIGURE_CASES = 8  # images per figure

ANCHORS_TABLE3 = [
    "Paper, Table 3: accuracy 97.7 % on the authors' private valve data (IRA-CNN with IAM).",
    "KolektorSDD, weakly supervised: 99.5 % accuracy (Xu et al., the paper's ref. [25]); another "
    "method, split and input size, not like-for-like.",
    "Magnetic-tile, fully supervised segmentation: mIoU 66.9 (DEU-Net, Appl. Sci. 2024); pixel-level "
    "training labels and another metric, not like-for-like (our segmentation is in Table 4).",
]

DOC_HEADER = """\
# Results: IRA-CNN on KolektorSDD and Magnetic-tile

Every section below is written by one command, `valve-model results <table>` (code:
`models/results.py`, tests: `tests/models/test_results.py`). Each command rewrites only its own
section, between the `<!-- BEGIN name -->` and `<!-- END name -->` markers; text outside the markers
is kept. Each section records the exact command, the protocol, the machine, the wall-clock time
and the date; the numbers are also in `runs/results/<table>.json`.

| section | command | runs it needs |
|---|---|---|
| Table 3: classification with IAM | `valve-model results table3` | IAM, every seed, both datasets; Grad-CAM++ evaluation |
| Table 6: attention ablation | `valve-model results table6` | none, IAM without spatial, CBAM, IAM; every seed |
| Table 4: weakly supervised segmentation | `valve-model results table4` | the IAM runs, evaluated with CAM, Grad-CAM, Grad-CAM++ |
| Figures: saliency, correct and wrong | `valve-model results figures` | seed 0's IAM runs (Grad-CAM++ evaluation) |

Options: `--datasets kolektorsdd,magnetic-tile` `--seeds 0,1,2` (training seeds) `--jobs 2` (trainings
and evaluations at once, one torch thread each: on this 2-core machine 2 x 1 thread is the most
efficient) `--runs runs/results` `--doc docs/results.md` `--data-root ../shared/datasets`
`--dry-run` (print what would run, and what is cached, and stop).

**Protocol** (`models.results.PROTOCOL`, as when this header was written; each section records the
values it used): compact preset; KolektorSDD at input 160, 25 epochs; Magnetic-tile at input 96,
35 epochs; class-balanced sampling; no validation hold-out (the whole training side, the final
epoch's weights); Adam lr 1e-3 (the paper's), batch 8 (the paper's is 32, see "Protocol choices");
the default augmentation. The split
is always the fixed seed-0 split (train:test 2:3, `docs/real-data.md`); the seeds are training
seeds (initialisation, shuffling, augmentation), so the spread over seeds is the training noise on
one test set, not the split noise. Mean ± std is over seeds with the sample std (ddof 1).

**Caching**: runs are in `runs/results/<dataset>/<attention>-s<seed>-e<epochs>-i<size>/` and shared
between the tables (Table 3, Table 4 and the figures use the same IAM runs). A training whose
config matches and whose log reached the epochs is not repeated; an interrupted one is resumed
(`valve-model train --resume`); an evaluation is repeated only when the weights are newer than its
`metrics.json`. So a command interrupted with Ctrl-C is continued by running it again, and
`table6` after `table3` trains only the three other attention variants. A run directory trained
with other settings is reported and never overwritten. A failed training or evaluation makes the
command end with a non-zero exit and the path of its log (`RUN/train.log`,
`RUN/eval-<saliency>.log`, where `RUN/eval-<saliency>/` is the `valve-model evaluate` report); the
other runs still finish, so running the command again redoes only what failed, and the section is
not rewritten until every step has succeeded. Figures go to `docs/results/` (next to `--doc`).

**Smoke run** (checks the pipeline in minutes; the numbers mean nothing):

```
valve-model results table3 --datasets kolektorsdd --seeds 0 --epochs 1 \\
    --runs /tmp/results-smoke --doc /tmp/results-smoke/results.md
```

`--epochs` overrides the protocol; the run directories then differ (`-e1-`), the numbers go to
`RUNS/<table>-e1.json`, and the output and the section say that these are not results. Give another `--doc` as above so that docs/results.md keeps
the real numbers.
"""

SECTION_TITLES = {
    "table3": "Table 3: classification with IAM",
    "table6": "Table 6: attention ablation",
    "table4": "Table 4: weakly supervised segmentation (saliency + Otsu)",
    "figures": "Figures: saliency overlays, correct and wrong cases",
}


class ResultsError(RuntimeError):
    """A user error, or a training/evaluation that failed."""


# ---------------------------------------------------------------------------------------------
# statistics and formatting


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof 1), n) of the finite values; std None with fewer than 2, mean None with 0."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) >= 2 else None), len(vals)


def summary(values: Sequence[float | None]) -> dict:
    """The JSON form of :func:`mean_std`, with the per-seed values."""
    m, s, n = mean_std(values)
    return {"mean": m, "std": s, "n": n, "values": list(values)}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100.0 * v:.{digits}f}"


def fmt_ms(values: Sequence[float | None], digits: int = 1, expected: int | None = None) -> str:
    """'97.1 ± 0.8' in percent; one value: '97.1'; a count when fewer values than ``expected``."""
    m, s, n = mean_std(values)
    if m is None:
        return "-"
    text = pct(m, digits) + ("" if s is None else f" ± {pct(s, digits)}")
    if expected is not None and n < expected:
        text += f" (n={n})"
    return text


def ordering_sentence(stats: dict[str, tuple[float | None, float | None]], paper: dict[str, float],
                      labels: dict[str, str], metric: str = "accuracy") -> str:
    """Our order of the variants by mean, whether it agrees with the paper's on every pair the paper
    orders strictly, and which pairs differ by less than their std (percent points)."""
    have = {k: v for k, v in stats.items() if v[0] is not None}
    if len(have) < 2:
        return f"Fewer than two variants have a {metric}: no ordering."
    ours = sorted(have, key=lambda k: -have[k][0])

    def chain(keys: Sequence[str], value: Callable[[str], float]) -> str:
        out = f"{labels[keys[0]]} {value(keys[0]):.1f}"
        for a, b in zip(keys, keys[1:], strict=False):
            out += f" {'=' if round(value(a), 6) == round(value(b), 6) else '>'} {labels[b]} {value(b):.1f}"
        return out

    paper_keys = sorted((k for k in paper if k in have), key=lambda k: -paper[k])
    text = (f"Ours ({metric}, mean over seeds, %): {chain(ours, lambda k: 100 * have[k][0])}. "
            f"Paper (accuracy %, their valve data): {chain(paper_keys, lambda k: paper[k])}. ")
    pairs = [(a, b) for i, a in enumerate(paper_keys) for b in paper_keys[i + 1:] if paper[a] != paper[b]]
    wrong = [(a, b) for a, b in pairs if not have[a][0] > have[b][0]]
    if not pairs:
        text += "The paper orders no pair of these variants."
    elif not wrong:
        text += f"Our ordering agrees with the paper's on all {len(pairs)} pairs the paper orders."
    else:
        text += (f"Our ordering disagrees with the paper's on {len(wrong)} of the {len(pairs)} pairs the paper "
                 "orders: " + "; ".join(f"{labels[a]} vs {labels[b]} (paper {labels[a]} higher, ours "
                                        f"{'equal' if have[a][0] == have[b][0] else labels[b] + ' higher'})"
                                        for a, b in wrong) + ".")
    keys = list(have)
    if any(have[k][1] is None for k in keys):
        text += (" With a single seed there is no std: the spread between trainings is unknown, and no "
                 "difference here can be told from training noise.")
        return text
    noisy = []
    for i, a in enumerate(ours):
        for b in ours[i + 1:]:
            diff = have[a][0] - have[b][0]
            spread = max(have[a][1], have[b][1])
            if diff < spread:
                noisy.append(f"{labels[a]} vs {labels[b]} (difference {100 * diff:.1f}, std "
                             f"{100 * have[a][1]:.1f} / {100 * have[b][1]:.1f})")
    if noisy:
        text += (" **The std over seeds is larger than the difference** for: " + "; ".join(noisy)
                 + ". These seeds do not separate those variants.")
    else:
        text += " Every difference between variants is larger than both variants' std."
    return text


# ---------------------------------------------------------------------------------------------
# the doc file


def marker(name: str, end: bool = False) -> str:
    return f"<!-- {'END' if end else 'BEGIN'} {name} -->"


def new_doc() -> str:
    parts = [DOC_HEADER]
    for name in TABLES:
        parts.append(f"\n{marker(name)}\n## {SECTION_TITLES[name]}\n\nNot generated yet: run "
                     f"`valve-model results {name}`.\n{marker(name, end=True)}\n")
    return "".join(parts)


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between the markers of ``name`` (appending the pair if absent)."""
    begin, end = marker(name), marker(name, end=True)
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if (i < 0 and end in text) or (i >= 0 and j < 0):
        raise ResultsError(f"the markers of {name} are broken: need {begin} before {end}")
    body = "\n" + body.strip("\n") + "\n"
    if i < 0:
        return text.rstrip("\n") + f"\n\n{begin}{body}{end}\n"
    return text[:i + len(begin)] + body + text[j:]


def write_section(doc: Path, name: str, body: str) -> None:
    """Rewrite one section of ``doc`` (created with the header if missing), under a file lock."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    with open(doc, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = doc.read_text()
        if not text.strip():
            text = new_doc()
        tmp = doc.with_name(doc.name + ".tmp")
        tmp.write_text(replace_section(text, name, body))
        tmp.replace(doc)


# ---------------------------------------------------------------------------------------------
# runs and their state


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


@dataclass
class Settings:
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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                out.append(json.loads(line))
    return out


def config_diffs(cfg: dict, run: Run, proto: dict, data_path: Path) -> list[str]:
    """How a run's config.json differs from what the protocol asks (epochs not included)."""
    t, d = cfg.get("train", {}), cfg.get("data", {})
    want = {"preset": proto["preset"], "attention": run.attention, "input_size": run.input_size,
            "batch_size": proto["batch_size"], "lr": proto["lr"], "val_fraction": proto["val_fraction"],
            "seed": run.seed, "balance": proto["balance"], "augment": proto["augment"]}
    diffs = [f"{k} {t.get(k)!r} (protocol: {v!r})" for k, v in want.items() if t.get(k) != v]
    if d.get("format") != proto["train_format"]:
        diffs.append(f"format {d.get('format')!r} (protocol: {proto['train_format']!r})")
    if d.get("path") != str(data_path):
        diffs.append(f"data {d.get('path')!r} (protocol: {str(data_path)!r})")
    return diffs


def train_state(run_dir: Path, run: Run, proto: dict, data_path: Path) -> tuple[str, str]:
    """("done" | "resume" | "new" | "conflict", detail) of a run directory."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "new", "no run yet"
    cfg = read_json(cfg_path)
    if cfg is None:
        return "conflict", f"{cfg_path} is unreadable"
    diffs = config_diffs(cfg, run, proto, data_path)
    if diffs:
        return "conflict", f"{run_dir} was trained with other settings: " + "; ".join(diffs)
    done = max((int(r.get("epoch", 0)) for r in read_log(run_dir / "log.jsonl")), default=0)
    planned = cfg.get("train", {}).get("epochs")
    if done > run.epochs or (done == run.epochs and planned != run.epochs):
        return "conflict", f"{run_dir} holds {done} epochs of a run planned for {planned}, the protocol wants {run.epochs}"
    if done == run.epochs and (run_dir / "model.safetensors").is_file():
        return "done", f"{done} epochs"
    if done >= 1 and (run_dir / "train_state.pt").is_file() and (run_dir / "last.safetensors").is_file():
        return "resume", f"at epoch {done} of {run.epochs}"
    return "new", "restart (nothing to resume)"


def report_dir(run_dir: Path, method: str) -> Path:
    return run_dir / f"eval-{method}"


def eval_state(run_dir: Path, method: str, proto: dict) -> tuple[str, str]:
    """("done" | "new", detail): done when metrics.json is newer than the weights, same method and format."""
    rep, weights = report_dir(run_dir, method), run_dir / "model.safetensors"
    m = rep / "metrics.json"
    if not (m.is_file() and (rep / "saliency_grid.png").is_file() and weights.is_file()):
        return "new", "no report"
    if m.stat().st_mtime_ns <= weights.stat().st_mtime_ns:
        return "new", "weights newer than the report"
    metrics = read_json(m)
    if metrics is None or metrics.get("saliency") != method or metrics.get("data", {}).get("format") != proto[
            "test_format"]:
        return "new", "report of another method or format"
    return "done", "cached"


# ---------------------------------------------------------------------------------------------
# steps and their execution


@dataclass
class Step:
    kind: str  # "train" or "evaluate"
    label: str
    args: list[str]  # after `python -m models.cli`
    log: Path
    state: str = "new"
    detail: str = ""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "models.cli", *self.args]


@dataclass
class Outcome:
    step: Step
    ok: bool
    code: int | None
    seconds: float
    skipped: bool = False  # not run: cached
    blocked: str = ""  # not run because an earlier step failed


def plan_steps(s: Settings, run: Run, methods: Sequence[str]) -> list[Step]:
    """The steps of one run (cached ones included, with state "done")."""
    proto, data = s.proto(run.dataset), s.data_path(run.dataset)
    rd = s.run_dir(run)
    state, detail = train_state(rd, run, proto, data)
    common = ["--epochs", str(run.epochs), "--threads", str(proto["threads"])]
    if state == "resume":
        args = ["train", "--out", str(rd), "--resume", *common]
    else:
        args = ["train", "--format", proto["train_format"], "--data", str(data), "--out", str(rd),
                "--preset", proto["preset"], "--attention", run.attention, "--input-size", str(run.input_size),
                "--seed", str(run.seed), "--val-fraction", str(proto["val_fraction"]),
                "--batch-size", str(proto["batch_size"]), "--lr", str(proto["lr"]), *common]
        if proto["balance"]:
            args.append("--balance")
        if not proto["augment"]:
            args.append("--no-augment")
        # the directory holds at least train.log; "new" means no config.json or nothing to resume, and
        # --force removes only the files a run writes (a conflicting run never gets here)
        args.append("--force")
    steps = [Step("train", f"train {run.label}", args, rd / "train.log", state, detail)]
    for method in methods:
        est, edetail = eval_state(rd, method, proto) if state == "done" else ("new", "after training")
        steps.append(Step("evaluate", f"evaluate {run.label} {method}",
                          ["evaluate", "--run", str(rd), "--format", proto["test_format"], "--data", str(data),
                           "--saliency", method, "--out", str(report_dir(rd, method)),
                           "--threads", str(proto["threads"])],
                          rd / f"eval-{method}.log", est, edetail))
    return steps


class Executor:
    """Runs the steps of several runs, at most ``jobs`` subprocesses at once; steps of one run in order."""

    def __init__(self, jobs: int, out=None):
        self.jobs = jobs
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.cancelled = threading.Event()
        self.started = 0
        self.total = 0

    def say(self, msg: str) -> None:
        with self.lock:
            print(msg, file=self.out, flush=True)

    def env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
        return env

    def run_step(self, step: Step, threads: int) -> Outcome:
        step.log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.started += 1
            n = self.started
        self.say(f"[{n}/{self.total}] {step.label}: {'resuming ' + step.detail if step.state == 'resume' else 'started'}"
                 f" (log {step.log})")
        t0 = time.perf_counter()
        with step.log.open("a") as log:
            log.write(f"\n===== {dt.datetime.now().isoformat(timespec='seconds')} {shlex.join(step.command)}\n")
            log.flush()
            proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, env=self.env(threads))
            with self.lock:
                self.procs[proc.pid] = proc
            try:
                code = proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(proc.pid, None)
        seconds = time.perf_counter() - t0
        ok = code == 0
        self.say(f"[{n}/{self.total}] {step.label}: {'done' if ok else f'FAILED (exit {code})'} in {seconds:.0f} s")
        return Outcome(step, ok, code, seconds)

    def run_chain(self, s: Settings, run: Run, methods: Sequence[str]) -> list[Outcome]:
        """Lock the run (another `results` process may work on it), re-plan, run what is not cached."""
        lock_path = s.runs / run.dataset / f".{run.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        outcomes: list[Outcome] = []
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            threads = s.proto(run.dataset)["threads"]
            steps = plan_steps(s, run, methods)
            for i, step in enumerate(steps):
                if step.state == "done":
                    outcomes.append(Outcome(step, True, 0, 0.0, skipped=True))
                    continue
                if step.state == "conflict":
                    outcomes.append(Outcome(step, False, None, 0.0))
                    outcomes += [Outcome(x, False, None, 0.0, blocked=step.label) for x in steps[i + 1:]]
                    break
                if self.cancelled.is_set():
                    outcomes += [Outcome(x, False, None, 0.0, blocked="interrupted") for x in steps[i:]]
                    break
                if step.kind == "evaluate" and step.detail == "after training":
                    step.state, step.detail = eval_state(s.run_dir(run), step.args[step.args.index("--saliency") + 1],
                                                         s.proto(run.dataset))
                    if step.state == "done":
                        outcomes.append(Outcome(step, True, 0, 0.0, skipped=True))
                        continue
                o = self.run_step(step, threads)
                outcomes.append(o)
                if not o.ok:
                    outcomes += [Outcome(x, False, None, 0.0, blocked=step.label) for x in steps[i + 1:]]
                    break
        return outcomes

    def run_all(self, s: Settings, chains: list[tuple[Run, Sequence[str]]]) -> list[Outcome]:
        results: list[Outcome] = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(self.run_chain, s, run, methods) for run, methods in chains]
            try:
                for f in futures:
                    results += f.result()
            except KeyboardInterrupt:
                self.cancelled.set()
                with self.lock:
                    procs = list(self.procs.values())
                for p in procs:  # only the subprocesses this command started
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
                raise
        return results


def tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


# ---------------------------------------------------------------------------------------------
# what each table needs


def needs(s: Settings) -> list[tuple[Run, tuple[str, ...]]]:
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


def load_metrics(s: Settings, run: Run, method: str) -> dict:
    m = read_json(report_dir(s.run_dir(run), method) / "metrics.json")
    if m is None:
        raise ResultsError(f"no metrics in {report_dir(s.run_dir(run), method)}")
    return m


def train_seconds(s: Settings, run: Run) -> float:
    return float(sum(r.get("seconds") or 0.0 for r in read_log(s.run_dir(run) / "log.jsonl")))


# ---------------------------------------------------------------------------------------------
# section text shared by the tables


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"cpus": os.cpu_count(), "cpu": cpu, "torch": torch_version, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def preamble(s: Settings, info: dict, timing: dict, runs: list[Run]) -> list[str]:
    lines = [f"## {SECTION_TITLES[s.table]}", ""]
    if s.epochs is not None:
        given = ", ".join(f"{ds} {PROTOCOL[ds]['epochs']}" for ds in s.datasets)
        lines += [f"> **SMOKE RUN, NOT RESULTS**: `--epochs {s.epochs}` overrides the protocol's epochs "
                  f"({given}). These numbers only show that the pipeline runs.", ""]
    lines += [f"- Command: `{s.command}`"]
    for ds in s.datasets:
        p = s.proto(ds)
        lines.append(
            f"- Protocol, {p['name']}: `{p['train_format']}` / `{p['test_format']}` (fixed seed-0 split, "
            f"train:test 2:3), {p['preset']} preset, input {p['input_size']}, {plural(p['epochs'], 'epoch')}"
            f"{' (protocol: ' + str(p['protocol_epochs']) + ')' if p['epochs'] != p['protocol_epochs'] else ''}, "
            f"balance {'on' if p['balance'] else 'off'}, val_fraction {p['val_fraction']:g} (final epoch's "
            f"weights), Adam lr {p['lr']:g}, batch {p['batch_size']}, augment {'on' if p['augment'] else 'off'}, "
            f"{p['threads']} torch thread per job")
    trained_with = sorted({str((read_json(s.run_dir(r) / "config.json") or {}).get("train", {}).get("torch"))
                           for r in runs})
    lines += [
        f"- Seeds: {', '.join(map(str, s.seeds if s.table != 'figures' else [s.figure_seed]))} (training seeds: "
        "initialisation, shuffling, augmentation; the split is always seed 0). Mean ± std over seeds, sample "
        "std (ddof 1); values in %.",
        f"- Machine: {info['cpus']} CPUs ({info['cpu']}), torch {info['torch']} (runs trained with "
        f"{', '.join(trained_with)}), Python {info['python']}; load average at the start "
        f"{' / '.join(str(v) for v in info['load_average'])}; {s.jobs} job(s) at once.",
        f"- Wall-clock: training {timing['train_seconds']:.0f} s (sum of the epoch times in log.jsonl over "
        f"{plural(timing['train_runs'], 'run')}), evaluation {timing['eval_seconds']:.0f} s (sum over "
        f"{plural(timing['eval_reports'], 'report')}); this command took {timing['elapsed']:.0f} s and ran "
        f"{plural(timing['ran_train'], 'training')} and {plural(timing['ran_eval'], 'evaluation')} (the rest "
        "was cached). With several jobs at once the sums exceed the elapsed time; the epoch times leave out "
        "process start and data loading.",
        f"- Date: {timing['date']}",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# table 3


def table3(s: Settings) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    for ds in s.datasets:
        p = s.proto(ds)
        ms = [load_metrics(s, s.run(ds, "iam", seed), "gradcam++") for seed in s.seeds]
        classes = ms[0]["classification"]["classes"]
        cls = [m["classification"] for m in ms]
        per_class = {c: {k: summary([x["per_class"][c][k] for x in cls]) for k in ("precision", "recall",
                                                                                  "f_measure", "ap")}
                     for c in classes}
        cms = [x["confusion_matrix"] for x in cls]
        summed = [[sum(cm[i][j] for cm in cms) for j in range(len(classes))] for i in range(len(classes))]
        d = {"classes": classes, "seeds": s.seeds, "per_class": per_class,
             "support": {c: cls[0]["per_class"][c]["support"] for c in classes},
             "accuracy": summary([x["accuracy"] for x in cls]),
             "macro": {k: summary([x["macro"][k] for x in cls]) for k in ("precision", "recall", "f_measure")},
             "mean_ap": summary([x.get("mean_ap") for x in cls]),
             "confusion_matrix_per_seed": dict(zip(map(str, s.seeds), cms, strict=True)),
             "confusion_matrix_summed": summed,
             "test_images": ms[0]["data"]["evaluated"], "test_counts": ms[0]["data"]["counts"]}
        data[ds] = d
        n = len(s.seeds)
        lines += [f"### {p['name']}", "",
                  f"Test side: {d['test_images']} images (" + ", ".join(f"{k} {v}" for k, v in d["test_counts"].items())
                  + "). Accuracy **" + fmt_ms(d["accuracy"]["values"], 1, n) + " %** (per seed: "
                  + ", ".join(f"s{seed} {pct(v)}" for seed, v in zip(s.seeds, d["accuracy"]["values"], strict=True))
                  + ").", "",
                  "| class | precision % | recall % | F-measure % | AP % | support |", "|---|---|---|---|---|---|"]
        for c in classes:
            r = per_class[c]
            lines.append(f"| {c} | {fmt_ms(r['precision']['values'], 1, n)} | {fmt_ms(r['recall']['values'], 1, n)} | "
                         f"{fmt_ms(r['f_measure']['values'], 1, n)} | {fmt_ms(r['ap']['values'], 1, n)} | "
                         f"{d['support'][c]} |")
        mac = d["macro"]
        lines += [f"| macro | {fmt_ms(mac['precision']['values'], 1, n)} | {fmt_ms(mac['recall']['values'], 1, n)} | "
                  f"**{fmt_ms(mac['f_measure']['values'], 1, n)}** | {fmt_ms(d['mean_ap']['values'], 1, n)} (mean AP) | "
                  f"{d['test_images']} |", "",
                  f"Confusion matrix **summed over {plural(n, 'seed')}** ({n} x {d['test_images']} predictions; rows "
                  "true, columns predicted):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for c, row in zip(classes, summed, strict=True):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
        lines += ["", "Per seed (rows true, columns predicted): "
                  + "; ".join(f"s{seed} `{cm}`" for seed, cm in zip(s.seeds, cms, strict=True)) + ".", ""]
        fig_seed = s.figure_seed
        rep = report_dir(s.run_dir(s.run(ds, "iam", fig_seed)), "gradcam++")
        figs = s.doc.parent / "results"
        figs.mkdir(parents=True, exist_ok=True)
        for src, name in (("confusion_matrix.png", f"{ds}-confusion.png"), ("pr_curves.png", f"{ds}-pr.png")):
            shutil.copyfile(rep / src, figs / name)
        lines += [f"Seed {fig_seed}: ![{p['name']} confusion matrix](results/{ds}-confusion.png) "
                  f"![{p['name']} precision-recall](results/{ds}-pr.png)", ""]
    lines += ["**Published figures for context** (not comparable one to one):", ""]
    lines += [f"- {a}" for a in ANCHORS_TABLE3]
    lines.append("")
    return lines, data


# ---------------------------------------------------------------------------------------------
# table 6


def table6(s: Settings) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    n = len(s.seeds)
    for ds in s.datasets:
        p = s.proto(ds)
        d: dict = {"variants": {}}
        for att in ABLATION:
            ms = [load_metrics(s, s.run(ds, att, seed), "gradcam++") for seed in s.seeds]
            d["variants"][att] = {
                "accuracy": summary([m["classification"]["accuracy"] for m in ms]),
                "macro_f": summary([m["classification"]["macro"]["f_measure"] for m in ms]),
                "paper_accuracy": PAPER_ABLATION[att] / 100.0,
                "train_seconds": [train_seconds(s, s.run(ds, att, seed)) for seed in s.seeds]}
        v = d["variants"]
        acc = {a: (v[a]["accuracy"]["mean"], v[a]["accuracy"]["std"]) for a in ABLATION}
        mf = {a: (v[a]["macro_f"]["mean"], v[a]["macro_f"]["std"]) for a in ABLATION}
        d["ordering_accuracy"] = ordering_sentence(acc, PAPER_ABLATION, LABELS, "accuracy")
        d["ordering_macro_f"] = ordering_sentence(mf, PAPER_ABLATION, LABELS, "macro-F")
        data[ds] = d
        lines += [f"### {p['name']}", "",
                  "| attention | paper accuracy % (valve data) | accuracy % | macro-F % | training s per run |",
                  "|---|---|---|---|---|"]
        for att in ABLATION:
            secs = mean_std(v[att]["train_seconds"])[0]
            lines.append(f"| {LABELS[att]} (`{att}`) | {PAPER_ABLATION[att]:.1f} | "
                         f"{fmt_ms(v[att]['accuracy']['values'], 1, n)} | {fmt_ms(v[att]['macro_f']['values'], 1, n)} | "
                         f"{'-' if secs is None else f'{secs:.0f}'} |")
        lines += ["", "Accuracy % per seed:", "",
                  "| attention | " + " | ".join(f"s{seed}" for seed in s.seeds) + " |",
                  "|---|" + "---|" * n]
        for att in ABLATION:
            lines.append(f"| {LABELS[att]} | " + " | ".join(pct(x) for x in v[att]["accuracy"]["values"]) + " |")
        lines += ["", d["ordering_accuracy"], "", d["ordering_macro_f"].replace(
            "Paper (accuracy %", "Paper (accuracy %, not macro-F"), ""]
    return lines, data


# ---------------------------------------------------------------------------------------------
# table 4


def table4(s: Settings) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    n = len(s.seeds)
    for ds in s.datasets:
        p = s.proto(ds)
        d: dict = {"methods": {}}
        policy = None
        for method in SALIENCY_METHODS:
            ms = [load_metrics(s, s.run(ds, "iam", seed), method) for seed in s.seeds]
            policy = ms[0]["data"].get("input_policy")
            seg = [m["segmentation"] for m in ms]
            d["methods"][method] = {
                "images": seg[0]["per_class"]["all"]["n"],
                "without_mask": seg[0]["segmented_images_without_mask"],
                "mean": {k: summary([x["per_class"]["all"]["mean"][k] for x in seg]) for k in SEG_KEYS},
                "pooled": {k: summary([x["per_class"]["all"]["pooled"][k] for x in seg]) for k in SEG_KEYS},
                "correct_only_mean": {k: summary([x["correctly_classified"]["all"]["mean"][k] for x in seg])
                                      for k in SEG_KEYS},
                "correct_only_images": [x["correctly_classified"]["all"]["n"] for x in seg],
                "per_class_mean_iou": {c: summary([x["per_class"][c]["mean"]["iou"] for x in seg])
                                       for c in seg[0]["segmented_classes"]},
            }
        d["input_policy"] = policy
        data[ds] = d
        first = d["methods"][SALIENCY_METHODS[0]]
        lines += [f"### {p['name']}", "",
                  f"Scored: the {first['images']} test images whose true class is a defect and that have a mask "
                  f"({first['without_mask']} defect images without a mask are left out), end to end (a defect "
                  "predicted as good gets an empty mask and IoU 0). Mean over images, then mean ± std over seeds.", "",
                  "| saliency | PA % | IoU % | precision % | recall % | F % | pooled IoU % | IoU % (correctly classified) |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in SALIENCY_METHODS:
            r = d["methods"][method]
            lines.append(f"| {method} | " + " | ".join(fmt_ms(r["mean"][k]["values"], 1, n) for k in SEG_KEYS)
                         + f" | {fmt_ms(r['pooled']['iou']['values'], 1, n)} | "
                         f"{fmt_ms(r['correct_only_mean']['iou']['values'], 1, n)} |")
        if len(first["per_class_mean_iou"]) > 1:
            classes = list(first["per_class_mean_iou"])
            lines += ["", "IoU % per defect class (mean over images):", "",
                      "| saliency | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            for method in SALIENCY_METHODS:
                r = d["methods"][method]["per_class_mean_iou"]
                lines.append(f"| {method} | " + " | ".join(fmt_ms(r[c]["values"], 1, n) for c in classes) + " |")
        lines.append("")
        iou = {m: d["methods"][m]["mean"]["iou"]["mean"] for m in SALIENCY_METHODS}
        order = sorted(SALIENCY_METHODS, key=lambda m: -iou[m])
        text = order[0]
        for a, b in zip(order, order[1:], strict=False):
            text += (" = " if math.isclose(iou[a], iou[b], rel_tol=1e-9, abs_tol=1e-12) else " > ") + b
        best = "agrees with" if order[0] == "gradcam++" and not math.isclose(
            iou[order[0]], iou[order[1]], rel_tol=1e-9, abs_tol=1e-12) else "differs from"
        sd = {m: d["methods"][m]["mean"]["iou"]["std"] for m in SALIENCY_METHODS}
        gap = iou[order[0]] - iou[order[-1]]
        spread = max((v for v in sd.values() if v is not None), default=None)
        noise = (f" The whole range ({100 * gap:.1f} points) is within the seeds' spread (std up to "
                 f"{100 * spread:.1f}): these seeds do not separate the methods."
                 if spread is not None and spread >= gap else "")
        lines += [f"Ours by mean IoU: {text}; this {best} the paper's Table 4, where Grad-CAM++ segments best."
                  + noise, ""]
        if p["preset"] == "compact":
            lines += ["CAM and Grad-CAM give the same rows here, and that is expected: the compact preset pools the "
                      "last feature map globally (GAP) before its FC layers, so the gradient of the class score is "
                      "the same at every location of a channel, and CAM's per-location weights and Grad-CAM's "
                      "averaged ones differ only by the positive factor h x w, which the min-max scaling removes "
                      "(Selvaraju et al.: Grad-CAM generalises CAM). They differ on the paper preset's flatten head.",
                      ""]
        if policy == "letterbox":
            lines += ["Pixel accuracy (PA) is inflated: scoring is in the letterboxed model input, whose zero "
                      "padding counts as true negatives (about 60 % of a KolektorSDD input; Magnetic-tile images vary "
                      "from near-square to 1:4); read IoU and F "
                      "(`docs/real-data.md`).", ""]
    lines += ["Published figure for context: Magnetic-tile, fully supervised DEU-Net (Appl. Sci. 2024), mIoU "
              "66.9; trained on pixel masks with another mIoU definition, not like-for-like with these weakly "
              "supervised, image-label-only maps.", ""]
    return lines, data


# ---------------------------------------------------------------------------------------------
# figures


def saliency_cases(run_dir: Path, rep: Path, data_path: Path, test_format: str, n: int = FIGURE_CASES):
    """(correct, wrong, notes): OverlayItems of correctly classified defect images and of
    misclassified images (either direction), recomputed with the run's weights (Grad-CAM++, Otsu)."""
    import numpy as np
    import torch

    from models.checkpoint import load as load_model
    from models.data import load_samples, read_image, read_mask, remap_classes
    from models.evaluate import content_box, pick_overlays, round_robin
    from models.figures import OverlayItem
    from models.ira_cnn import segmented_classes
    from models.saliency import saliency
    from service.segment import masks_for, refined_mask

    with (rep / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    model = load_model(run_dir / "model.safetensors")
    model.eval()
    classes = tuple(model.config.classes)
    size = model.config.input_size
    seg_names = segmented_classes(classes)
    seg_flags = np.array([c in seg_names for c in classes])
    data = remap_classes(load_samples(data_path, test_format), classes)
    by_rel = {data.relpath(x): x for x in data.samples}
    correct_rows: dict[str, list] = {}
    wrong_rows: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["true"] == r["pred"]:
            if r["true"] in seg_names:
                correct_rows.setdefault(r["true"], []).append(r)
        else:
            wrong_rows.setdefault((r["true"], r["pred"]), []).append(r)
    correct_rows = {k: v[:n] for k, v in correct_rows.items()}
    wrong_sel = round_robin([sorted(v, key=lambda r: -float(r["score"])) for v in wrong_rows.values()], n)

    def items(sel: list[dict]) -> list[tuple[int, OverlayItem]]:
        if not sel:
            return []
        samples = [by_rel[r["image"]] for r in sel]
        images = np.stack([read_image(x.path, size) for x in samples])
        logits, maps = saliency(model, torch.from_numpy(images).unsqueeze(1), "gradcam++")
        probs = torch.softmax(logits.float(), dim=1).numpy()
        maps_np = maps.float().numpy()
        pred = probs.argmax(axis=1)
        masks = masks_for(maps_np, pred, seg_flags, slices=images)
        for j, x in enumerate(samples):  # as evaluate does: masks over the image, not the letterbox padding
            if seg_flags[pred[j]] and (box := content_box(x.path, size)) is not None:
                masks[j] = False
                masks[j][box] = refined_mask(images[j][box], maps_np[j][box])
        out = []
        for i, (r, x) in enumerate(zip(sel, samples, strict=True)):
            if classes[pred[i]] != r["pred"]:
                raise ResultsError(f"{x.path}: predicted {classes[pred[i]]} now but {r['pred']} in "
                                   f"{rep / 'predictions.csv'}: the weights changed after the evaluation; "
                                   "run the command again")
            true_mask = read_mask(x.mask, size) if x.mask is not None and r["true"] in seg_names else None
            title = f"{x.path.parent.name}/{x.path.name}\ntrue {r['true']} / pred {r['pred']} p={probs[i, pred[i]]:.2f}"
            if r.get("iou") not in (None, ""):
                title += f"\nIoU {float(r['iou']):.2f}"
            out.append((0 if true_mask is not None else 1,
                        OverlayItem(image=images[i], saliency=maps_np[i], pred_mask=masks[i], true_mask=true_mask,
                                    title=title)))
        return out

    correct = {k: items(v) for k, v in correct_rows.items()}
    wrong = items(wrong_sel)
    chosen_correct = pick_overlays(correct, [], n)
    chosen_wrong = pick_overlays({}, wrong, n)
    counts = {"correct_defects": sum(1 for r in rows if r["true"] == r["pred"] and r["true"] in seg_names),
              "wrong": sum(1 for r in rows if r["true"] != r["pred"]), "images": len(rows)}
    return chosen_correct, chosen_wrong, counts


def figures(s: Settings) -> tuple[list[str], dict]:
    from models.figures import plot_saliency_grid

    lines: list[str] = ["Grad-CAM++ of the predicted class (jet), its Otsu mask (red dashed; empty when the "
                        "prediction is good) and the true mask (green); each tile's title: image, true / predicted "
                        "class, softmax probability of the predicted class, IoU when scored. Correct: up to "
                        f"{FIGURE_CASES} correctly classified defect images, round-robin over the defect classes "
                        "in test-set order, masked ones first. Wrong: up to "
                        f"{FIGURE_CASES} misclassified images, round-robin over the (true, predicted) pairs, most "
                        "confident first.", ""]
    data: dict = {}
    figs = s.doc.parent / "results"
    figs.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(s.proto(ds)["threads"] for ds in s.datasets))
    for ds in s.datasets:
        p = s.proto(ds)
        run = s.run(ds, "iam", s.figure_seed)
        rd = s.run_dir(run)
        correct, wrong, counts = saliency_cases(rd, report_dir(rd, "gradcam++"), s.data_path(ds), p["test_format"])
        plot_saliency_grid(correct, figs / f"{ds}-correct.png",
                           title=f"{p['name']}, IAM seed {s.figure_seed}: correctly classified defects "
                                 "(Grad-CAM++; true mask green, Otsu red dashed)")
        plot_saliency_grid(wrong, figs / f"{ds}-wrong.png",
                           title=f"{p['name']}, IAM seed {s.figure_seed}: misclassified "
                                 "(Grad-CAM++; true mask green, Otsu red dashed)")
        data[ds] = {"run": str(rd), **counts, "correct": [it.title.replace("\n", " | ") for it in correct],
                    "wrong": [it.title.replace("\n", " | ") for it in wrong]}
        lines += [f"### {p['name']} (IAM, seed {s.figure_seed})", "",
                  f"{counts['images']} test images: {counts['correct_defects']} correctly classified defect "
                  f"images, {counts['wrong']} misclassified.", "",
                  f"![{p['name']}: correct](results/{ds}-correct.png)" if correct
                  else "No correctly classified defect images.", "",
                  f"![{p['name']}: wrong](results/{ds}-wrong.png)" if wrong else "No misclassified images.", ""]
    return lines, data


BUILDERS = {"table3": table3, "table6": table6, "table4": table4, "figures": figures}


# ---------------------------------------------------------------------------------------------
# command


def results(s: Settings, out=None) -> int:
    """Run what the table needs, then rewrite its section and RUNS/<table>.json. Returns an exit code."""
    out = out or sys.stdout
    t_start = time.perf_counter()
    info = machine()

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    if s.epochs is not None:
        say("=" * 78)
        say(f"SMOKE RUN: --epochs {s.epochs} overrides the protocol ("
            + ", ".join(f"{ds} {PROTOCOL[ds]['epochs']} epochs" for ds in s.datasets)
            + "). The numbers are NOT results.")
        say("=" * 78)
    chains = needs(s)
    runs = [r for r, _ in chains]
    if s.dry_run:
        for run, methods in chains:
            for step in plan_steps(s, run, methods):
                what = {"done": "cached", "resume": "resume", "new": "run", "conflict": "CONFLICT"}[step.state]
                say(f"{what:8} {step.label}  ({step.detail})")
                if step.state in ("new", "resume"):
                    say(f"         {shlex.join(['valve-model', *step.args])}")
                elif step.state == "conflict":
                    say(f"         remove {s.run_dir(run)} or choose another --runs")
        return 0

    executor = Executor(s.jobs, out)
    planned = [plan_steps(s, run, methods) for run, methods in chains]
    executor.total = sum(1 for steps in planned for x in steps if x.state != "done")
    cached = sum(1 for steps in planned for x in steps if x.state == "done")
    say(f"{s.table}: {len(runs)} runs; {executor.total} steps to run, {cached} cached; {s.jobs} job(s) at once")
    try:
        outcomes = executor.run_all(s, chains)
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted; run the same command again to continue (finished runs are kept, "
            "interrupted trainings resume)")
        return 130
    failed = [o for o in outcomes if not o.ok and not o.blocked]
    if failed:
        for o in failed:
            if o.step.state == "conflict":
                say(f"FAILED: {o.step.label}: {o.step.detail}; remove that run directory or choose another --runs")
            else:
                say(f"FAILED: {o.step.label} (exit {o.code}); log: {o.step.log}\n{tail(o.step.log)}")
        blocked = [o for o in outcomes if o.blocked]
        for o in blocked:
            say(f"not run: {o.step.label} (after {o.blocked})")
        say(f"{PROG}: {len(failed)} step(s) failed, {len(blocked)} not run; the section of {s.doc} is unchanged")
        return 1

    try:
        body, numbers = BUILDERS[s.table](s)
    except (ResultsError, KeyError, OSError) as exc:
        say(f"{PROG}: error: cannot build {s.table}: {exc!r}")
        return 1
    ran = [o for o in outcomes if not o.skipped]
    evals = {(r, m) for r, methods in chains for m in methods}
    timing = {
        "train_seconds": sum(train_seconds(s, r) for r in runs), "train_runs": len(runs),
        "eval_seconds": sum(float(load_metrics(s, r, m).get("seconds") or 0.0) for r, m in evals),
        "eval_reports": len(evals),
        "ran_train": sum(1 for o in ran if o.step.kind == "train"),
        "ran_eval": sum(1 for o in ran if o.step.kind == "evaluate"),
        "ran_seconds": {o.step.label: round(o.seconds, 1) for o in ran},
        "elapsed": time.perf_counter() - t_start,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    text = "\n".join(preamble(s, info, timing, runs) + body)
    write_section(s.doc, s.table, text)
    s.runs.mkdir(parents=True, exist_ok=True)
    json_path = s.runs / (f"{s.table}.json" if s.epochs is None else f"{s.table}-e{s.epochs}.json")
    payload = {"table": s.table, "command": s.command, "smoke": s.epochs is not None, "seeds": s.seeds,
               "split_seed": 0, "protocol": {ds: s.proto(ds) for ds in s.datasets}, "machine": info,
               "timing": timing, "runs": {r.label: str(s.run_dir(r)) for r in runs}, "datasets": numbers}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"wrote the {s.table} section of {s.doc} and {json_path} ({timing['elapsed']:.0f} s)")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, not {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate what one table of docs/results.md needs (cached), then "
                               "rewrite that table's section and RUNS/<table>.json.",
        epilog="Quick smoke run: --datasets kolektorsdd --seeds 0 --epochs 1 --runs /tmp/results-smoke "
               "--doc /tmp/results-smoke/results.md")
    p.add_argument("table", choices=TABLES, help="table3: classification with IAM; table6: attention ablation; "
                   "table4: saliency segmentation (CAM, Grad-CAM, Grad-CAM++); figures: correct/wrong overlays")
    p.add_argument("--runs", default="runs/results", help="where the runs go (default runs/results)")
    p.add_argument("--doc", default="docs/results.md", help="the Markdown file to update (default docs/results.md)")
    p.add_argument("--datasets", help=f"comma-separated, from {', '.join(PROTOCOL)} (default all)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="training seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="trainings/evaluations at once (default 2)")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs (smoke runs; not results)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help=f"default {DEFAULT_DATA_ROOT}")
    p.add_argument("--dry-run", action="store_true", help="print what would run and what is cached, then stop")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    datasets = list(PROTOCOL) if not args.datasets else [x.strip() for x in args.datasets.split(",") if x.strip()]
    unknown = [d for d in datasets if d not in PROTOCOL]
    if unknown or not datasets:
        print(f"{PROG}: error: unknown --datasets {', '.join(unknown) or '(none)'}: choose from "
              f"{', '.join(PROTOCOL)}", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        print(f"{PROG}: error: --jobs and --epochs must be at least 1", file=sys.stderr)
        return 2
    s = Settings(table=args.table, runs=Path(args.runs).resolve(), doc=Path(args.doc).resolve(), datasets=datasets, seeds=args.seeds,
                 jobs=args.jobs, epochs=args.epochs, data_root=Path(args.data_root), dry_run=args.dry_run,
                 argv=argv)
    return results(s)
