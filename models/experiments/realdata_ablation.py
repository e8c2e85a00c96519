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

A run trained with another recipe than the other variants of its dataset (apart from the attention), or on
other tiles than the folder lists now, is refused with the fix in the message.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from models.experiments.realdata import (
    PROTOCOL,
    REPO,
    best_epoch,
    epochs_run,
    make_tiles,
    mean_std,
    protocol_text,
    run_complete,
    tiles_dir,
    train_run,
)
from models.experiments.results.protocol import ABLATION
from models.experiments.results.stats import ordering_sentence
from models.experiments.results.tables import LABELS, PAPER_ABLATION

LABELS_MODE = "mask"
METRICS = "ablation_metrics.json"
#: the figures each variant is ordered by: (key in the run's metrics, label in the docs)
ORDERED = (("ap", "AP"), ("accuracy_calibrated", "calibrated accuracy"),
           ("balanced_accuracy_calibrated", "calibrated balanced accuracy"))


class AblationError(SystemExit):
    """A run that does not belong to the ablation as it stands; the message names the fix."""


def run_path(runs: Path, attention: str, dataset: str, seed: int) -> Path:
    return runs / attention / f"{dataset}-{LABELS_MODE}" / f"seed{seed}"


def check_recipe(runs: list[Path]) -> None:
    """Refuse runs of one dataset whose recipes differ in anything but the attention (and the seed)."""
    configs = {r: json.loads((r / "config.json").read_text()) for r in runs}
    first, ref = runs[0], configs[runs[0]]
    for r in runs[1:]:
        c = configs[r]
        differ = [f"model.{k}" for k in sorted(set(c["model"]) | set(ref["model"]))
                  if k != "attention" and c["model"].get(k) != ref["model"].get(k)]
        differ += [f"train.{k}" for k in ("epochs", "batch_size", "epoch_size", "lr", "schedule", "balance", "augment",
                                          "bn_recal", "stem_init", "val_fraction", "precision_option")
                   if c["train"].get(k) != ref["train"].get(k)]
        if differ:
            raise AblationError(f"{r} and {first} were trained with other settings ({', '.join(differ)}): give the "
                                "ablation the same overrides as before (--epochs, --width, --head-pool, ...), or remove "
                                f"{r} to retrain it")


def check_run(out: Path, attention: str, train_tiles: Path) -> None:
    """Refuse a run of another attention, or one trained on other tiles than ``train_tiles`` lists now."""
    from models.tiles import read_tiles_manifest

    cfg = json.loads((out / "config.json").read_text())
    if cfg["model"].get("attention") != attention:
        raise AblationError(f"{out} holds a run with attention {cfg['model'].get('attention')!r}, not {attention!r}: "
                            f"remove {out} to retrain it")
    split = out / "split.json"
    if split.is_file():
        listed = {t["file"] for im in read_tiles_manifest(train_tiles)["images"] for t in im["tiles"]}
        s = json.loads(split.read_text())
        if set(s["train"]) | set(s["val"]) != listed:
            raise AblationError(f"{out} was trained on other tiles than {train_tiles} lists: remove {out} to "
                                "retrain it")


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
        return json.loads(metrics_path.read_text())
    saved = PROTOCOL[dataset]["train"]["attention"]
    PROTOCOL[dataset]["train"]["attention"] = attention
    try:
        wall = train_run(train_tiles, out, seed, dataset, threads, device)
    finally:
        PROTOCOL[dataset]["train"]["attention"] = saved
    check_run(out, attention, train_tiles)
    t0 = time.time()
    m = evaluate_images(out, test_tiles, None, segmentation=False, calibrate_on=train_tiles, device=device)
    keep = {k: m[k] for k in ("images", "accuracy", "balanced_accuracy", "ap", "defect_vs_good_accuracy", "recall")}
    keep["class_ap"] = m.get("class_ap")
    keep["accuracy_calibrated"] = m["calibrated"]["accuracy"]
    keep["balanced_accuracy_calibrated"] = m["calibrated"]["balanced_accuracy"]
    keep["threshold_logodds"] = m["calibrated"]["calibration"]["threshold_logodds"]
    keep["train_wall_s"] = round(wall, 1)
    keep["eval_wall_s"] = round(time.time() - t0, 1)
    metrics_path.write_text(json.dumps(keep, indent=1) + "\n")
    return keep


def seconds_per_epoch(out: Path) -> float | None:
    """Median of the run's logged epoch times (the training loop's own clock)."""
    from models.run_dir import LOG_NAME, read_log

    secs = [r["seconds"] for r in read_log(out / LOG_NAME) if "seconds" in r]
    return statistics.median(secs) if secs else None


def parameters(out: Path) -> int:
    """The trained model's parameter count."""
    from models.checkpoint import load

    return sum(p.numel() for p in load(out / "model.safetensors", map_location="cpu").parameters())


def summarise(runs: Path, datasets: list[str], seeds: list[int]) -> dict:
    """Per dataset: each variant's figures over the seeds, and the ordering sentences."""
    out: dict = {}
    for dataset in datasets:
        found = {a: [(s, run_path(runs, a, dataset, s)) for s in seeds] for a in ABLATION}
        found = {a: [(s, p) for s, p in v if (p / METRICS).is_file()] for a, v in found.items()}
        all_runs = [p for v in found.values() for _, p in v]
        if not all_runs:
            continue
        check_recipe(all_runs)
        variants = {}
        for a, v in found.items():
            ms = [json.loads((p / METRICS).read_text()) for _, p in v]
            variants[a] = {
                "seeds": [s for s, _ in v],
                **{k: mean_std([m[k] for m in ms]) for k in ("ap", "accuracy", "balanced_accuracy",
                                                             "accuracy_calibrated", "balanced_accuracy_calibrated")},
                "best_epochs": [best_epoch(p) for _, p in v],
                "epochs_run": [epochs_run(p) for _, p in v],
                "seconds_per_epoch": [seconds_per_epoch(p) for _, p in v],
                "parameters": parameters(v[0][1]) if v else None,
            }
        cfg = json.loads((all_runs[0] / "config.json").read_text())
        entry = {"protocol": protocol_text(dataset, LABELS_MODE, cfg).replace(f"({cfg['model']['attention']}, ",
                                                                              "(the variant's attention, "),
                 "seeds": seeds, "test_images": json.loads((all_runs[0] / METRICS).read_text())["images"],
                 "variants": variants, "ordering": {}}
        for key, label in ORDERED:
            stats = {a: (v[key]["mean"], v[key]["std"]) for a, v in variants.items() if v["seeds"]}
            entry["ordering"][key] = ordering_sentence(stats, PAPER_ABLATION, LABELS, label)
        out[dataset] = entry
    return out


def pct(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    s = f"{scale * stat['mean']:.{digits}f}"
    return s + (f" ± {scale * stat['std']:.{digits}f}" if stat["std"] is not None else "") + f" (n={stat['n']})"


def doc_section(summary: dict, command: str, summary_path: str, runs: str) -> str:
    from models.experiments.results.doc import machine

    info = machine()
    lines = [f"## Attention ablation by the real-data protocol (`valve-model realdata ablation`, `{runs}`)", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d')} ({info['cpus']} CPUs, {info['cpu']}, torch "
             f"{info['torch']}); numbers in `{summary_path}`. One training per variant and seed on the same tiles, "
             "seed and recipe; only the attention differs. Test images scored as in the real-data sections (no masks). "
             "The paper's column is its Table 6 (accuracy on its private valve data).", ""]
    for dataset, e in summary.items():
        lines += [f"### {dataset}", "",
                  "| attention | paper accuracy % | AP % | calibrated accuracy % | calibrated balanced % | accuracy at 0.5 % "
                  "| s / epoch | best epochs |", "|---|---|---|---|---|---|---|---|"]
        for a in ABLATION:
            v = e["variants"][a]
            spe = [s for s in v["seconds_per_epoch"] if s is not None]
            lines.append(f"| {LABELS[a]} (`{a}`, {v['parameters']:,} parameters) | {PAPER_ABLATION[a]:.1f} | "
                         f"{pct(v['ap'])} | "
                         f"{pct(v['accuracy_calibrated'])} | {pct(v['balanced_accuracy_calibrated'])} | "
                         f"{pct(v['accuracy'])} | {statistics.median(spe):.0f} | "
                         f"{', '.join(map(str, v['best_epochs'])) or '-'} |" if spe else
                         f"| {LABELS[a]} (`{a}`) | {PAPER_ABLATION[a]:.1f} | - | - | - | - | - | - |")
        lines += ["", "AP % per seed:", "", "| attention | " + " | ".join(f"s{s}" for s in e["seeds"]) + " |",
                  "|---|" + "---|" * len(e["seeds"])]
        for a in ABLATION:
            v = e["variants"][a]
            per = dict(zip(v["seeds"], v["ap"]["values"], strict=True))
            lines.append(f"| {LABELS[a]} | " + " | ".join("-" if s not in per else f"{100 * per[s]:.1f}"
                                                          for s in e["seeds"]) + " |")
        lines += [""] + [e["ordering"][k] for k, _ in ORDERED] + [
            "", f"Protocol: {e['protocol']}; {e['test_images']} test images. s / epoch is the median of the runs' "
            "logged epoch times (one thread per training; other jobs may have shared the machine).", ""]
    return "\n".join(lines).rstrip()


def run(runs: Path, data_root: Path, datasets: list[str], seeds: list[int], threads: int, device: str,
        summary_path: Path, doc: Path | None, section: str, attentions: list[str] | None = None,
        train: bool = True, overrides: str = "") -> dict:
    """Train and score what is missing (``train``; ``attentions`` limits it to some variants, e.g. to split the
    work between processes), then write the summary JSON and, with ``doc``, its section."""
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
    summary = summarise(runs, datasets, seeds)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    if doc is not None and summary:
        from models.experiments.results.doc import write_section

        def rel(p: Path) -> str:
            return os.path.relpath(Path(p).resolve(), REPO)

        command = (f"valve-model realdata ablation --datasets {','.join(datasets)} --seeds "
                   f"{','.join(map(str, seeds))}{overrides} --runs {rel(runs)} --summary {rel(summary_path)} "
                   f"--section {section}")
        write_section(doc, section, doc_section(summary, command, rel(summary_path), rel(runs)))
    return summary
