"""``valve-model realdata ablation``: the paper's attention ablation (Table 6) under the real-data protocol.

For each dataset and seed, one training per attention variant (no attention, IAM without its spatial branch,
CBAM, IAM) by the realdata protocol (``models.experiments.realdata.PROTOCOL``, with the command line's
overrides), on the same tiles, seed and recipe; only ``--attention`` differs. Layout::

    <runs>/tiles/<dataset>-mask/{train,test}            one tiles folder for every variant
    <runs>/<attention>/<dataset>-mask/seed<N>/          one training (resumable: the command resumes it)
        ablation_metrics.json                           its test images scored (no masks: the ablation is
                                                        about classification)

Each run is scored on the test images as ``valve-model realdata train`` scores them (models.tiles.evaluate_images,
without segmentation): AP (KolektorSDD: defect vs good; Magnetic-tile: mean over the defect classes), accuracy
at the threshold calibrated on the run's validation images, and the balanced accuracy there. The summary (JSON)
and the docs section order the variants on each of them against the paper's Table 6 and say which differences
the seeds' spread does not separate (models.experiments.results.stats.ordering_sentence).

A run trained with another recipe than the other variants of its dataset (apart from the attention and the seed),
or on other tiles than the folder lists now, is refused with the fix in the message; a call whose options would
train a run unlike those on disk is refused before it trains. Figures older than a run's weights (a run resumed
since it was scored) are left out of the summary and listed, and the next training call scores the run again.
The summary covers every run under ``--runs``, whatever ``--datasets`` and ``--seeds`` this call trains.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path

from models.experiments.realdata import (
    ABLATION_SECTION,
    OVERRIDES,
    PROTOCOL,
    PROTOCOL_DEFAULTS,
    REPO,
    best_epoch,
    epochs_run,
    make_tiles,
    mean_std,
    option_args,
    pct,
    protocol_text,
    recipe_differences,
    run_complete,
    tiles_dir,
    train_run,
    trained_on,
)
from models.experiments.results.protocol import ABLATION
from models.experiments.results.stats import ordering_sentence
from models.experiments.results.tables import LABELS, PAPER_ABLATION

LABELS_MODE = "mask"
METRICS = "ablation_metrics.json"
#: what may differ between the runs of one dataset's ablation
IGNORED = ("model.attention", "train.attention", "train.seed")
#: compared besides realdata.SAME_TRAIN_KEYS: "only the attention differs" includes where and in what precision
EXTRA_TRAIN = ("device", "precision")
#: the figures each variant is ordered by: (key in the run's metrics, label in the docs)
ORDERED = (("ap", "AP"), ("accuracy_calibrated", "calibrated accuracy"),
           ("balanced_accuracy_calibrated", "calibrated balanced accuracy"))


class AblationError(SystemExit):
    """A run that does not belong to the ablation as it stands; the message names the fix."""


def run_path(runs: Path, attention: str, dataset: str, seed: int) -> Path:
    return runs / attention / f"{dataset}-{LABELS_MODE}" / f"seed{seed}"


def dataset_runs(runs: Path, dataset: str) -> list[Path]:
    """Every run of the dataset's ablation on disk (any variant, any seed), in a fixed order."""
    return [p.parent for a in ABLATION for p in sorted((runs / a / f"{dataset}-{LABELS_MODE}").glob("seed*/config.json"))]


def check_recipe(runs: list[Path]) -> None:
    """Refuse runs of one dataset whose recipes differ in anything but the attention and the seed."""
    if not runs:
        return
    ref = runs[0]
    differ = {r: recipe_differences(r, ref, ignore=IGNORED, extra_train=EXTRA_TRAIN) for r in runs[1:]}
    odd = {r: d for r, d in differ.items() if d}
    if odd:
        listing = "; ".join(f"{r} ({', '.join(d)})" for r, d in odd.items())
        raise AblationError(f"these runs were trained with other settings than {ref}: {listing}. Give the ablation "
                            "the same overrides as before (--epochs, --width, --head-pool, ...), or remove the runs "
                            "that are the odd ones out to retrain them")


def planned_differences(run: Path, dataset: str) -> list[str]:
    """The command line's recipe options (PROTOCOL, OVERRIDES) that differ from what ``run`` was trained with:
    checked before a training starts, so a mismatch costs no training."""
    from models.run_dir import LEGACY_OPTIONS

    t = {**LEGACY_OPTIONS, **json.loads((run / "config.json").read_text())["train"]}  # older runs: the defaults

    def norm(v):
        return ",".join(map(str, v)) if isinstance(v, list | tuple) else v

    from models.recipe import TrainConfig

    plain = TrainConfig(data="", out="")
    # the augmentation options have a value whether given or not: a call without --rot90 plans rot90 off
    planned = {**{k: getattr(plain, k) for k in ("rot90", "brightness", "contrast", "ema")},
               **PROTOCOL[dataset]["train"]}

    def option(k, v):
        return shlex.join(option_args(k, v))

    return [f"{option(k, planned[k])} (the run: {option(k, t.get(k)) if t.get(k) is not None else 'none'})"
            for k in OVERRIDES if planned.get(k) is not None and norm(planned[k]) != norm(t.get(k))]


def check_run(out: Path, attention: str, train_tiles: Path) -> None:
    """Refuse a run of another attention, or one trained on other tiles than ``train_tiles`` lists now."""
    cfg = json.loads((out / "config.json").read_text())
    if cfg["model"].get("attention") != attention:
        raise AblationError(f"{out} holds a run with attention {cfg['model'].get('attention')!r}, not {attention!r}: "
                            f"remove {out} to retrain it")
    if not trained_on(out, train_tiles):
        raise AblationError(f"{out} was trained on other tiles than {train_tiles} lists: remove {out} to retrain it")


def train_score(runs: Path, attention: str, dataset: str, seed: int, threads: int, device: str) -> dict:
    """Train (or resume) one variant's run, then score its test images (cached in ablation_metrics.json)."""
    from models.tiles import evaluate_images

    out = run_path(runs, attention, dataset, seed)
    train_tiles, test_tiles = tiles_dir(runs, dataset, LABELS_MODE, "train"), tiles_dir(runs, dataset, LABELS_MODE,
                                                                                         "test")
    if (out / "config.json").is_file():
        check_run(out, attention, train_tiles)
    metrics_path = out / METRICS
    if metrics_path.is_file() and run_complete(out, dataset):
        m = json.loads(metrics_path.read_text())
        if m.get("epochs_run") == epochs_run(out):
            return m
    for other in dataset_runs(runs, dataset):
        differ = planned_differences(other, dataset)
        if differ:
            raise AblationError(f"this call would train {out} with other settings than {other}: "
                                f"{'; '.join(differ)}. Give the same overrides as that run's, or remove the runs")
    metrics_path.unlink(missing_ok=True)  # a resumed run's old figures must not outlive its new weights
    wall = train_run(train_tiles, out, seed, dataset, threads, device, changes={"attention": attention})
    check_run(out, attention, train_tiles)
    t0 = time.time()
    m = evaluate_images(out, test_tiles, None, segmentation=False, calibrate_on=train_tiles, device=device)
    keep = {k: m[k] for k in ("images", "accuracy", "balanced_accuracy", "ap", "defect_vs_good_accuracy", "recall")}
    keep["class_ap"] = m.get("class_ap")
    keep["accuracy_calibrated"] = m["calibrated"]["accuracy"]
    keep["balanced_accuracy_calibrated"] = m["calibrated"]["balanced_accuracy"]
    keep["threshold_logodds"] = m["calibrated"]["calibration"]["threshold_logodds"]
    keep["epochs_run"] = epochs_run(out)
    keep["train_wall_s"] = round(wall, 1)
    keep["eval_wall_s"] = round(time.time() - t0, 1)
    metrics_path.write_text(json.dumps(keep, indent=1) + "\n")
    return keep


def seconds_per_epoch(out: Path) -> float | None:
    """Median of the run's logged epoch times (the training loop's own clock)."""
    from models.run_dir import LOG_NAME, read_log

    secs = [r["seconds"] for r in read_log(out / LOG_NAME) if "seconds" in r]
    return statistics.median(secs) if secs else None


def fresh_metrics(out: Path) -> dict | None:
    """The run's scored figures, or None when it has none or they are older than its weights (a run resumed or
    extended since)."""
    path = out / METRICS
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return m if m.get("epochs_run") == epochs_run(out) else None


def recorded_overrides(run: Path, dataset: str) -> str:
    """The command-line overrides that reproduce ``run``'s recipe: its train options that differ from
    PROTOCOL_DEFAULTS (read from the run, not from this call's arguments)."""
    t = json.loads((run / "config.json").read_text())["train"]
    from models.recipe import TrainConfig

    plain = TrainConfig(data="", out="")  # what an option the protocol leaves out defaults to
    default = PROTOCOL_DEFAULTS[dataset]["train"]
    out = ""
    for k in OVERRIDES:
        v, d = t.get(k), default.get(k, getattr(plain, k, None))
        if v is None or v == d or (k == "head_pool" and v == "gap" and d is None):
            continue  # "gap" is the compact preset's own head: no option needed
        out += " " + shlex.join(option_args(k, v))
    return out


def summarise(runs: Path) -> dict:
    """Per dataset with runs on disk: each variant's figures over its seeds, and the ordering sentences."""
    out: dict = {}
    for dataset in PROTOCOL:
        on_disk = dataset_runs(runs, dataset)
        if not on_disk:
            continue
        check_recipe(on_disk)
        seeds = sorted({int(p.name.removeprefix("seed")) for p in on_disk})
        variants, stale, scored = {}, [], []
        for a in ABLATION:
            found = []
            for s in seeds:
                p = run_path(runs, a, dataset, s)
                if (p / "config.json").is_file():
                    m = fresh_metrics(p)
                    if m is None:
                        stale.append(str(p))
                    else:
                        found.append((s, p, m))
            variants[a] = {
                "seeds": [s for s, _, _ in found],
                **{k: mean_std([m[k] for _, _, m in found]) for k in ("ap", "accuracy", "balanced_accuracy",
                                                                     "accuracy_calibrated",
                                                                     "balanced_accuracy_calibrated")},
                "best_epochs": [best_epoch(p) for _, p, _ in found],
                "epochs_run": [epochs_run(p) for _, p, _ in found],
                "seconds_per_epoch": [seconds_per_epoch(p) for _, p, _ in found],
                "threads": sorted({json.loads((p / "config.json").read_text())["train"].get("threads")
                                   for _, p, _ in found} - {None}),
                "parameters": (json.loads((found[0][1] / "config.json").read_text())["train"].get("parameters")
                               if found else None),
            }
            scored += [(p, m) for _, p, m in found]
        first = scored[0][0] if scored else on_disk[0]
        cfg = json.loads((first / "config.json").read_text())
        entry = {"protocol": protocol_text(dataset, LABELS_MODE, cfg).replace(f"({cfg['model']['attention']}, ",
                                                                              "(the variant's attention, "),
                 "overrides": recorded_overrides(first, dataset), "seeds": seeds,
                 "test_images": scored[0][1]["images"] if scored else None,
                 "variants": variants, "not_scored": stale, "ordering": {}}
        for key, label in ORDERED:
            stats = {a: (v[key]["mean"], v[key]["std"]) for a, v in variants.items() if v["seeds"]}
            entry["ordering"][key] = ordering_sentence(stats, PAPER_ABLATION, LABELS, label)
        out[dataset] = entry
    return out


def doc_section(summary: dict, runs: str, summary_path: str, doc_option: str) -> str:
    from models.experiments.results.doc import machine

    info = machine()
    lines = [f"## Attention ablation by the real-data protocol (`valve-model realdata ablation`, `{runs}`)", "",
             f"Written on {time.strftime('%Y-%m-%d')} ({info['cpus']} CPUs, {info['cpu']}, torch {info['torch']}); "
             f"numbers in `{summary_path}`. One training per variant and seed on the same tiles, seed and recipe; only "
             "the attention differs (checked from each run's config.json). Test images scored as in the real-data "
             "sections, without masks. The paper's column is its Table 6 (accuracy on its private valve data).", ""]
    for dataset, e in summary.items():
        seeds = ",".join(map(str, e["seeds"]))
        lines += [f"### {dataset}", "",
                  f"Command: `valve-model realdata ablation --datasets {dataset} --seeds {seeds}{e['overrides']} "
                  f"--runs {runs} --summary {summary_path}{doc_option}`", "",
                  "| attention | paper accuracy % | AP % | calibrated accuracy % | calibrated balanced % | accuracy at 0.5 % "
                  "| s / epoch | best epochs |", "|---|---|---|---|---|---|---|---|"]
        for a in ABLATION:
            v = e["variants"][a]
            if not v["seeds"]:
                lines.append(f"| {LABELS[a]} (`{a}`) | {PAPER_ABLATION[a]:.1f} | - | - | - | - | - | - |")
                continue
            spe = [x for x in v["seconds_per_epoch"] if x is not None]
            lines.append(f"| {LABELS[a]} (`{a}`, {v['parameters']:,} parameters) | {PAPER_ABLATION[a]:.1f} | "
                         f"{pct(v['ap'])} | {pct(v['accuracy_calibrated'])} | {pct(v['balanced_accuracy_calibrated'])} "
                         f"| {pct(v['accuracy'])} | {f'{statistics.median(spe):.0f}' if spe else '-'} | "
                         f"{', '.join('-' if b is None else str(b) for b in v['best_epochs'])} |")
        lines += ["", "AP % per seed:", "", "| attention | " + " | ".join(f"s{s}" for s in e["seeds"]) + " |",
                  "|---|" + "---|" * len(e["seeds"])]
        for a in ABLATION:
            v = e["variants"][a]
            per = dict(zip(v["seeds"], v["ap"]["values"], strict=True))
            lines.append(f"| {LABELS[a]} | " + " | ".join("-" if s not in per else f"{100 * per[s]:.1f}"
                                                          for s in e["seeds"]) + " |")
        threads = sorted({t for v in e["variants"].values() for t in v["threads"]})
        for k, _ in ORDERED:
            lines += ["", e["ordering"][k]]
        lines += [
            "", f"Protocol: {e['protocol']}; {e['test_images']} test images. s / epoch is the median of the runs' "
            f"logged epoch times ({', '.join(map(str, threads)) or '?'} torch thread(s) per training; other jobs may "
            "have shared the machine)."]
        if e["not_scored"]:
            lines.append("")
            lines.append(f"Not in the figures (still training, or not scored since their last epoch): "
                         f"{', '.join(e['not_scored'])}.")
        lines.append("")
    return "\n".join(lines).rstrip()


def run(runs: Path, data_root: Path, datasets: list[str], seeds: list[int], threads: int, device: str,
        summary_path: Path, doc: Path | None, section: str, attentions: list[str] | None = None,
        train: bool = True, default_doc: Path | None = None) -> dict:
    """Train and score what is missing (``train``; ``attentions`` limits it to some variants, e.g. to split the
    work between processes: :func:`make_tiles` locks the tiles folder, so the first process cuts them and the
    others wait for them), then write the summary JSON of every run under ``runs`` and, with ``doc``, its
    section."""
    import os

    for a in attentions or ():
        if a not in ABLATION:
            raise AblationError(f"unknown attention {a!r}: choose from {', '.join(ABLATION)}")
    if train:
        for dataset in datasets:
            make_tiles(runs, data_root, dataset, LABELS_MODE)
            for seed in seeds:
                for a in attentions or ABLATION:
                    m = train_score(runs, a, dataset, seed, threads, device)
                    print(f"{dataset}/{a}/seed{seed}: AP {m['ap']:.4f}, calibrated accuracy "
                          f"{m['accuracy_calibrated']:.4f}", flush=True)
    summary = summarise(runs)
    if not summary:
        raise AblationError(f"no ablation runs under {runs}: train them first (without --no-train), or give the "
                            "--runs folder they are in")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    if doc is not None:
        from models.experiments.results.doc import write_section

        def rel(p: Path) -> str:
            return os.path.relpath(Path(p).resolve(), REPO)

        doc_option = "" if default_doc is not None and Path(doc).resolve() == Path(default_doc).resolve() \
            else f" --doc {rel(doc)}"
        if section != ABLATION_SECTION:
            doc_option += f" --section {section}"
        write_section(doc, section, doc_section(summary, rel(runs), rel(summary_path), doc_option))
    return summary
