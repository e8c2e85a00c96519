"""The Markdown file the tables go to (docs/results.md): its header, the sections between
``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers (each command rewrites only its own, under a
file lock), and the preamble every section starts with (command, protocol, machine, timing, date).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
from importlib import metadata
from pathlib import Path

from models.experiments.results.protocol import TABLES, ResultsError, ResultsOptions, Run
from models.experiments.results.runs import read_json
from models.experiments.results.stats import plural

DOC_HEADER = """\
# Results: IRA-CNN on KolektorSDD and Magnetic-tile

Every section below is written by one command, `valve-model results <table>` (code:
`models/experiments/results/`, tests: `tests/unit/models/test_results.py`). Each command rewrites only
its own section, between the `<!-- BEGIN name -->` and `<!-- END name -->` markers; text outside
the markers is kept. Each section records the exact command, the protocol, the machine, the wall-clock time
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

**Protocol** (`models.experiments.results.protocol.PROTOCOL`, as when this header was written; each
section records the values it used): compact preset; KolektorSDD at input 160, 25 epochs; Magnetic-tile at input 96,
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


def preamble(s: ResultsOptions, info: dict, timing: dict, runs: list[Run]) -> list[str]:
    lines = [f"## {SECTION_TITLES[s.table]}", ""]
    if s.epochs is not None:
        given = ", ".join(f"{ds} {s.proto(ds)['protocol_epochs']}" for ds in s.datasets)
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
