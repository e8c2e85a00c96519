"""``valve-model realdata``: the paper's slicing protocol on KolektorSDD and Magnetic-tile, end to end.

One command per step, each cached and resumable (a re-run skips what is done, resumes a training that
was interrupted, and retrains nothing whose configuration is unchanged):

    valve-model realdata tiles   [--datasets ...]                # cut the split's parts into tiles
    valve-model realdata train   [--datasets ...] [--seeds 0,1,2] [--jobs 2]   # train + image verdicts
    valve-model realdata calibrate                               # add the calibrated image rule to older runs
    valve-model realdata summary                                 # docs/results/summary.json + docs/results.md
    valve-model realdata pack    --out DIR                       # a copy to carry to a GPU machine (below)
    valve-model realdata ceiling                                 # refined masks from the true masks as maps

Protocol (:data:`PROTOCOL`, per dataset and label mode; recorded in every run's config.json and in the
summary): the seeded grouped train/test split of models.real_data (train:test 2:3, seed 0); each image
cut into 192 x 192 tiles (models.tiles) at ``scale`` (KolektorSDD 0.5, half the native pixel density;
Magnetic-tile 1.0, native); ``valve-model train`` with its default recipe (class-balanced draws, cosine
schedule, BN recalibration, weights chosen on balanced validation accuracy over a grouped 20 %
validation share of the training parts); image verdicts by the daemon's rule (any tile defective),
scored on the test parts (models.tiles.evaluate_images). Two label modes side by side:

    mask    slice labels derived from the masks (the paper labels its slices)
    image   image labels only: every tile of a defect image carries its label (no mask is read)
    mil     image labels only, multiple-instance training (``valve-model train --mil K``, models.mil): the image
            tiles, each epoch trained on the tiles of each defective image the model scores highest (MIL_TOP) and every
            tile of the good images, validated on image verdicts (not in the default ``--labels``)

Recipe overrides (``--epochs``, ``--epoch-size``, ``--batch-size``, ``--width``, ``--channels``, ``--head-pool``,
``--rot90``, ``--brightness``, ``--contrast``, ``--ema``) change the
training, not the tiles; each run's config.json records what it used, and the summary's protocol text is
read from there. ``pack`` writes a lossless copy of the datasets for another machine: KolektorSDD resized
once to the protocol's scale 0.5 (PNG, 36 MB instead of 101 MB of JPEG), Magnetic-tile as it is, each
with ``packed.json``; ``tiles`` on such a copy resizes by scale / packed scale, so it cuts the same tiles
as from the originals (tests/unit/models/test_realdata_pack.py checks that, byte for byte).

Nothing trained here ships (the datasets' licences); runs live under ``runs/realdata`` (not committed);
the summary and the doc section are committed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROG = "valve-model realdata"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "datasets"
DEFAULT_RUNS = REPO / "runs" / "realdata"
DEFAULT_DOC = REPO / "docs" / "results.md"
DEFAULT_SUMMARY = REPO / "docs" / "results" / "summary.json"
DATASETS = ("kolektorsdd", "magnetic-tile")
LABEL_MODES = ("mask", "image", "mil")
#: what ``--labels`` trains when it is not given (``mil`` is run on request: docs/results.md)
DEFAULT_LABELS = ("mask", "image")
#: the tiles a label mode trains on: ``mil`` reads the image-labelled tiles
TILE_LABELS = {"mask": "mask", "image": "image", "mil": "image"}
#: ``mil``: the tiles of each defective image an epoch trains on (``valve-model train --mil``). At stride 96 a
#: 192-px tile overlaps its neighbours by half: every defective KolektorSDD training image has 4 or more of its 12
#: tiles on defect pixels, so 2 are kept; 28 of Magnetic-tile's 155 have a single one, so 1 is kept there
MIL_TOP = {"kolektorsdd": 2, "magnetic-tile": 1}
#: ``mil``: epochs on every tile with its image's label before the selection starts (models.mil.MIL_WARMUP)
MIL_WARMUP = 2
SECTION = "realdata"
ABLATION_SECTION = "realdata-ablation"
DEFAULT_ABLATION_SUMMARY = REPO / "docs" / "results" / "ablation-realdata.json"

#: tiles and training per dataset (the train recipe's defaults do the rest)
PROTOCOL: dict[str, dict] = {
    "kolektorsdd": {"tiles": {"size": 192, "stride": 96, "scale": 0.5},
                    "train": {"preset": "compact", "attention": "iam", "epochs": 20, "batch_size": 16,
                              "epoch_size": 512}},
    "magnetic-tile": {"tiles": {"size": 192, "stride": 96, "scale": 1.0},
                      "train": {"preset": "compact", "attention": "iam", "epochs": 20, "batch_size": 16,
                                "epoch_size": 768}},
}
#: PROTOCOL as written, before a command line's overrides (what a recorded command must repeat is what differs)
PROTOCOL_DEFAULTS = json.loads(json.dumps(PROTOCOL))


def tiles_dir(runs: Path, dataset: str, labels: str, part: str) -> Path:
    return runs / "tiles" / f"{dataset}-{TILE_LABELS[labels]}" / part


def run_dir(runs: Path, dataset: str, labels: str, seed: int) -> Path:
    return runs / f"{dataset}-{labels}" / f"seed{seed}"


def run_tiles(run: Path, part: str) -> Path:
    """The tiles a run folder ``<runs>/<dataset>-<labels>/seed<N>`` was trained (``train``) or is tested (``test``) on,
    for the diagnostic tools: ``mil`` runs read the image-labelled tiles."""
    run = Path(run)
    dataset, _, labels = run.parent.name.rpartition("-")
    return run.parent.parent / "tiles" / f"{dataset}-{TILE_LABELS.get(labels, labels)}" / part


PACKED_NAME = "packed.json"


def packed_scale(root: Path) -> float:
    """The scale of a copy written by :func:`pack` (1.0 for the original dataset)."""
    path = Path(root) / PACKED_NAME
    return float(json.loads(path.read_text())["scale"]) if path.is_file() else 1.0


def pack(data_root: Path, out: Path, datasets: list[str]) -> None:
    """A copy of ``datasets`` small enough to carry: resized once to the protocol's scale where it is < 1."""
    import shutil

    from models.data import load_samples
    from models.tiles import prescale_copy

    for dataset in datasets:
        scale = PROTOCOL[dataset]["tiles"]["scale"]
        dst = Path(out) / dataset
        if dst.exists():
            raise SystemExit(f"{dst} exists: pack writes a new folder (remove it first)")
        if scale < 1.0:
            n = prescale_copy(load_samples(data_root / dataset, dataset), dst, scale)
        else:
            shutil.copytree(data_root / dataset, dst)
            n = len(load_samples(dst, dataset).samples)
        (dst / PACKED_NAME).write_text(json.dumps({"dataset": dataset, "scale": scale,
                                                   "source": str(data_root / dataset)}) + "\n")
        print(f"{dataset}: {n} images at scale {scale} in {dst}", file=sys.stderr)


TILES_LOCK = ".lock"


def make_tiles(runs: Path, data_root: Path, dataset: str, labels: str) -> None:
    """Write the train and test tiles of one dataset and label mode (skipped when present).

    Holds an exclusive lock on ``<runs>/tiles/.lock`` while it checks and writes, so processes started together on
    one ``--runs`` (the ablation split with ``--attentions``) cut the tiles once: the second waits, then finds them.
    """
    import fcntl

    lock_path = runs / "tiles" / TILES_LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _make_tiles_locked(runs, data_root, dataset, labels)


def _make_tiles_locked(runs: Path, data_root: Path, dataset: str, labels: str) -> None:
    from models.data import load_samples
    from models.tiles import MANIFEST_NAME, TileSpec, write_tiles

    spec = TileSpec(labels=TILE_LABELS[labels], **PROTOCOL[dataset]["tiles"])
    source_scale = packed_scale(data_root / dataset)
    for part in ("train", "test"):
        out = tiles_dir(runs, dataset, labels, part)
        if (out / MANIFEST_NAME).is_file():
            m = json.loads((out / MANIFEST_NAME).read_text())
            if m["spec"] == spec.__dict__:
                continue
            raise SystemExit(f"{out} was written with another tile spec ({m['spec']}); remove it to rewrite")
        data = load_samples(data_root / dataset, f"{dataset}-{part}")
        m = write_tiles(data, out, spec, source=f"{dataset}-{part}:{data_root / dataset}", source_scale=source_scale)
        print(f"{dataset}/{labels}/{part}: {len(m['images'])} images -> {m['tile_counts']}", file=sys.stderr)


def run_complete(out: Path, dataset: str) -> bool:
    """Whether the run in ``out`` finished the protocol's epochs and wrote its final BN check."""
    if not (out / "train_state.pt").is_file():
        return False
    return epochs_run(out) >= PROTOCOL[dataset]["train"]["epochs"] and "bn_check" in json.loads(
        (out / "config.json").read_text())


#: what two runs compared in one table must share besides the model's architecture (the train section's preset,
#: width, head_pool ... are None where defaulted; the model's keys are the architecture as built)
SAME_TRAIN_KEYS = ("epochs", "batch_size", "epoch_size", "lr", "betas", "schedule", "balance", "augment", "rot90",
                   "brightness", "contrast", "bn_recal", "bn_draws", "stem_init", "seed", "val_fraction", "precision_option",
                   "ema", "mil", "mil_warmup")


def recipe_differences(run: Path, reference: Path, ignore: tuple[str, ...] = (),
                       extra_train: tuple[str, ...] = ()) -> list[str]:
    """The recipe keys (``model.<k>``, ``train.<k>``) in which two runs' config.json differ: every model key but
    the classes (the data decide them) and SAME_TRAIN_KEYS plus ``extra_train``, leaving out ``ignore``."""
    from models.run_dir import LEGACY_OPTIONS

    a, b = (json.loads((r / "config.json").read_text()) for r in (run, reference))
    for cfg in (a, b):  # a run older than an option trained with its default
        cfg["train"] = {**LEGACY_OPTIONS, **cfg.get("train", {})}
    keys = [f"train.{k}" for k in SAME_TRAIN_KEYS + extra_train]
    keys += [f"model.{k}" for k in sorted(set(a["model"]) | set(b["model"])) if k not in ("classes", "num_classes")]
    return [k for k in keys if k not in ignore
            and a[k.split(".")[0]].get(k.split(".", 1)[1]) != b[k.split(".")[0]].get(k.split(".", 1)[1])]


def trained_on(run: Path, folder: Path) -> bool:
    """Whether ``run`` was trained on exactly the tiles ``folder`` lists now (its split.json's files); True while
    it has no split (nothing trained yet)."""
    from models.tiles import read_tiles_manifest

    split = run / "split.json"
    if not split.is_file():
        return True
    listed = {t["file"] for im in read_tiles_manifest(folder)["images"] for t in im["tiles"]}
    s = json.loads(split.read_text())
    return set(s["train"]) | set(s["val"]) == listed


def train_run(data: Path, out: Path, seed: int, dataset: str, threads: int, device: str,
              changes: dict | None = None) -> float:
    """Train ``data`` (a tiles folder) into ``out`` by the protocol's recipe for ``dataset`` with ``changes`` (training
    options over PROTOCOL's, e.g. another attention), or resume it; the log goes to ``out``'s parent as
    seed<seed>.log. Returns the wall seconds (0 when it was complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"seed{seed}.log"
    epochs = PROTOCOL[dataset]["train"]["epochs"]
    if run_complete(out, dataset):
        return 0.0
    if (out / "train_state.pt").is_file():
        cmd = [sys.executable, "-m", "models.cli", "train", "--out", str(out), "--resume",
               "--epochs", str(epochs), "--threads", str(threads), "--device", device]
    else:
        cmd = [sys.executable, "-m", "models.cli", "train", "--data", str(data), "--format", "folders",
               "--out", str(out), "--seed", str(seed), "--threads", str(threads), "--device", device]
        for key, value in {**PROTOCOL[dataset]["train"], **(changes or {})}.items():
            cmd += option_args(key, value)
    t0 = time.time()
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if rc != 0:
        raise SystemExit(f"training {out} failed (exit {rc}); see {log}")
    return time.time() - t0


def train_one(dataset: str, labels: str, seed: int, runs: Path, threads: int, device: str) -> dict:
    """Train (or resume) one run, then score its image verdicts on the test tiles; returns the metrics."""
    from models.tiles import evaluate_images

    out = run_dir(runs, dataset, labels, seed)
    metrics_path = out / "image_metrics.json"
    if metrics_path.is_file() and run_complete(out, dataset):
        return json.loads(metrics_path.read_text())
    wall = train_run(tiles_dir(runs, dataset, labels, "train"), out, seed, dataset, threads, device,
                     {"mil": MIL_TOP[dataset], "mil_warmup": MIL_WARMUP} if labels == "mil" else None)
    t_eval = time.time()
    m = evaluate_images(out, tiles_dir(runs, dataset, labels, "test"), metrics_path, device=device,
                        calibrate_on=tiles_dir(runs, dataset, labels, "train"))
    m["eval_wall_s"] = round(time.time() - t_eval, 1)
    m["train_wall_s"] = round(wall, 1)
    metrics_path.write_text(json.dumps(m, indent=1))
    return m


LABEL_TEXT = {"mask": "slice labels from the masks", "image": "image labels only",
              "mil": "image labels only, multiple-instance training on each defective image's top-scoring tiles"}


def protocol_text(dataset: str, labels: str, cfg: dict) -> str:
    """What a run did, read from its config.json (the tiles from PROTOCOL, the training as recorded)."""
    tiles = PROTOCOL[dataset]["tiles"]
    t, m = cfg.get("train", {}), cfg.get("model", {})
    where = t.get("device", "cpu") + (f" ({t['device_name']})" if t.get("device_name") else "")
    size = (f"channels {','.join(map(str, m['channels']))} (stem, blocks)" if m.get("channels")
            else f"width {m.get('width', '?')}")
    return (f"{tiles['size']}x{tiles['size']} tiles, stride {tiles['stride']}, scale {tiles['scale']} "
            f"({LABEL_TEXT[labels]}" + (f" ({t['mil']} a defective image)" if labels == "mil" and t.get("mil") else "")
            + "); image verdict = any "
            f"tile defective; IRA-CNN {m.get('preset', '?')} {size} ({m.get('attention', '?')}, "
            f"{m.get('head_pool', '?')} head), {t.get('epochs', '?')} epochs of {t.get('epoch_size', '?')} "
            f"class-balanced draws, batch {t.get('batch_size', '?')}, {t.get('schedule', '?')} lr, "
            + (f"stem init {t['stem_init']}, " if "stem_init" in t else "") + augmentation_text(t)
            + ("BN recalibration over class-balanced draws, " if t.get("bn_draws") == "balanced" else "BN recalibration, ")
            + (f"an exponential weight average (decay {t['ema']:g}), " if t.get("ema") else "")
            + f"weights on balanced validation accuracy; trained on {where}; seeded grouped split train:test 2:3 "
            "(seed 0)")


def augmentation_text(train: dict) -> str:
    """The recorded augmentation in words ("" for a run that recorded none)."""
    a = train.get("augmentation")
    if not a:
        return "no augmentation, " if train.get("augment") is False else ""
    flips = "flips and transposes (8 symmetries)" if a.get("rot90") else "flips"
    return f"augmentation {flips}, brightness +-{a['brightness']:g}, contrast +-{a['contrast']:g}, "


def epochs_run(out: Path) -> int:
    """Epochs a run finished (its log.jsonl lines): fewer than its config's when it was stopped."""
    from models.run_dir import LOG_NAME, read_log

    return len(read_log(out / LOG_NAME))


def best_epoch(out: Path) -> int | None:
    """The epoch whose weights a run kept, replayed from its log by train's own rule; for runs stopped
    before they wrote their final bn_check."""
    from models.run_dir import LOG_NAME, read_log
    from models.train import best_logged_epoch

    return best_logged_epoch(read_log(out / LOG_NAME))


def calibrate(runs: Path, datasets: list[str], labels: list[str], seeds: list[int], device: str) -> None:
    """Add the calibrated image rule (models.tiles.calibrated_metrics) to runs evaluated without it."""
    from models.tiles import (
        calibrated_metrics,
        image_metrics,
        image_scores,
        read_tiles_manifest,
        tile_probabilities,
    )

    for dataset in datasets:
        for lab in labels:
            for seed in seeds:
                out = run_dir(runs, dataset, lab, seed)
                path = out / "image_metrics.json"
                if not path.is_file():
                    continue
                m = json.loads(path.read_text())
                # calibrated on the log-odds, with the validation scores' extremes recorded
                calibrated = {"score", "good_max"} <= set(m.get("calibrated", {}).get("calibration", {}))
                if calibrated and all("defect_logodds" in r for r in m["per_image"]):
                    continue  # calibrated on the log-odds already, and every image carries its log-odds
                test = tiles_dir(runs, dataset, lab, "test")
                manifest = read_tiles_manifest(test)
                probs = tile_probabilities(out, test, manifest, device=device)
                scored = image_scores(manifest, probs)
                again = scored["images"]
                if [a["source"] for a in again] != [b["source"] for b in m["per_image"]]:
                    raise SystemExit(f"{path} lists other test images than {test}: re-evaluate the run")
                for a, b in zip(again, m["per_image"], strict=True):
                    b["defect_logodds"] = a["defect_logodds"]  # runs scored before the log-odds existed
                if calibrated:
                    path.write_text(json.dumps(m, indent=1))
                    print(f"{dataset}/{lab}/seed{seed}: per-image log-odds added", flush=True)
                    continue
                fresh = image_metrics(scored)
                # AP ranked by the log-odds (1 - p(good) ties at 1.0 for confident images; see models.tiles)
                m.update({k: fresh[k] for k in ("ap", "defect_ap", "class_ap")}, ap_score="defect log-odds")
                # the run may have been evaluated on another device (a GPU): its fp32 probabilities can differ
                # in the last bits, so a verdict on the 0.5 edge may flip; count those rather than hide them
                flips = sum(a["pred"] != b["pred"] for a, b in zip(again, m["per_image"], strict=True))
                m["calibrated"] = calibrated_metrics(out, tiles_dir(runs, dataset, lab, "train"), manifest, probs,
                                                     device=device)
                m["calibrated"]["recomputed_on"] = device
                m["calibrated"]["verdicts_differing_from_the_evaluation"] = flips
                path.write_text(json.dumps(m, indent=1))
                c = m["calibrated"]
                print(f"{dataset}/{lab}/seed{seed}: log-odds bound {c['calibration']['threshold_logodds']:.3f}, "
                      f"accuracy {m['accuracy']:.4f} -> {c['accuracy']:.4f}, AP {m['ap']:.4f}, flips {flips}", flush=True)


def ap_limits(per_seed: list[list[dict]], good: int, top: int = 3) -> list[dict]:
    """The test images that limit the image-level defect AP, the same way for every seed.

    For each seed's per-image records (``source``, ``true`` class index, ``defect_logodds`` or, in runs
    scored before the log-odds existed, ``defect_score``), the AP of the defect-vs-good ranking is recomputed
    without each image in turn (leave-one-out). The images are ordered by the mean AP gain over the seeds;
    the first ``top`` come back with, per seed, the AP without the image and the image's rank on the
    other class's side: for a defective image, how many good images score above it; for a good image, how
    many defective images score below it. Images missing from a seed are skipped (the seeds share one
    test split, so that does not happen in a protocol run). Leaving out a seed's only defective (or only
    good) image leaves nothing to rank: that seed's AP without it is None and the image's gain is the mean
    over the other seeds (an image with no such seed is not listed). ``ties``: how many other images have
    the same gain (the order among them is by name).
    """
    from models.metrics import average_precision

    seeds = []
    for rows in per_seed:
        src = [r["source"] for r in rows]
        y = np.array([r["true"] != good for r in rows])
        s = np.array([r["defect_logodds"] if "defect_logodds" in r else r["defect_score"] for r in rows], dtype=np.float64)
        seeds.append((dict(zip(src, range(len(src)), strict=True)), y, s))
    if not seeds or not all(y.any() and (~y).any() for _, y, _ in seeds):
        return []
    common = [r["source"] for r in per_seed[0] if all(r["source"] in ix for ix, _, _ in seeds)]
    full = [average_precision(y, s) for _, y, s in seeds]
    found = []
    for name in common:
        without: list[float | None] = []
        beyond = []
        for ix, y, s in seeds:
            i = ix[name]
            keep = np.ones(len(y), dtype=bool)
            keep[i] = False
            both = y[keep].any() and (~y[keep]).any()
            without.append(average_precision(y[keep], s[keep]) if both else None)
            other = s[~y] if y[i] else s[y]
            beyond.append(int((other > s[i]).sum() if y[i] else (other < s[i]).sum()))
        gains = [w - f for w, f in zip(without, full, strict=True) if w is not None]
        if not gains:
            continue
        found.append({"image": name, "defective": bool(seeds[0][1][seeds[0][0][name]]),
                      "ap_gain": float(np.mean(gains)), "ap_without": without, "beyond": beyond})
    found.sort(key=lambda r: (-r["ap_gain"], r["image"]))
    gains = np.array([r["ap_gain"] for r in found])
    return [{**r, "ap": full, "ties": int(np.isclose(gains, r["ap_gain"], rtol=0, atol=1e-12).sum()) - 1}
            for r in found[:top]]


def mean_std(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v),
            "values": values}


def summarise(runs: Path, seeds: list[int], datasets: list[str] | None = None,
              label_modes: list[str] | None = None) -> dict:
    """summary.json: per dataset, the primary protocol (mask labels) and, beside it, image labels only; only the
    ``datasets`` and ``label_modes`` given (default: all), so a summary says no more than its command names."""
    from models.tiles import good_index

    out: dict = {}
    for dataset in DATASETS:
        if datasets is not None and dataset not in datasets:
            continue
        entry: dict = {}
        for labels in LABEL_MODES:
            if label_modes is not None and labels not in label_modes:
                continue
            found = [(s, run_dir(runs, dataset, labels, s) / "image_metrics.json") for s in seeds]
            found = [(s, json.loads(p.read_text())) for s, p in found if p.is_file()]
            if not found:
                continue
            cfgs = [json.loads((run_dir(runs, dataset, labels, s) / "config.json").read_text()) for s, _ in found]
            entry[labels] = {
                "protocol": protocol_text(dataset, labels, cfgs[0]),
                "seeds": [s for s, _ in found],
                "accuracy": mean_std([m["accuracy"] for _, m in found]),
                "balanced_accuracy": mean_std([m["balanced_accuracy"] for _, m in found]),
                "accuracy_calibrated": mean_std([m.get("calibrated", {}).get("accuracy") for _, m in found]),
                "balanced_accuracy_calibrated": mean_std([m.get("calibrated", {}).get("balanced_accuracy")
                                                          for _, m in found]),
                "thresholds_logodds": [m.get("calibrated", {}).get("calibration", {}).get("threshold_logodds")
                                       for _, m in found],
                "ap": mean_std([m["ap"] for _, m in found]),
                "defect_vs_good_accuracy": mean_std([m["defect_vs_good_accuracy"] for _, m in found]),
                "defect_iou": mean_std([m.get("defect_iou") for _, m in found]),
                "miou_paper": mean_std([m.get("miou_paper") for _, m in found]),
                "segmentation_rows": {
                    row: {k: mean_std([m.get("segmentation", {}).get("rows", {}).get(row, {}).get(k) for _, m in found])
                          for k in ("defect_iou", "miou_paper")}
                    for row in sorted({r for _, m in found for r in m.get("segmentation", {}).get("rows", {})})},
                "bn_check_gap_points": [c.get("bn_check", {}).get("gap_points") for c in cfgs],
                "best_epochs": [c.get("bn_check", {}).get("epoch") or best_epoch(run_dir(runs, dataset, labels, s))
                                for c, (s, _) in zip(cfgs, found, strict=True)],
                "epochs_run": [epochs_run(run_dir(runs, dataset, labels, s)) for s, _ in found],
                "test_images": found[0][1]["images"],
                "ap_limits": ap_limits([m["per_image"] for _, m in found],
                                       good_index(cfgs[0]["model"]["classes"])),
                "train_wall_s": [m.get("train_wall_s") for _, m in found],
            }
        if entry:
            primary = next(entry[k] for k in LABEL_MODES if k in entry)  # mask labels where run, else image, mil
            out[dataset] = {**{k: primary[k] for k in ("protocol", "seeds", "accuracy", "accuracy_calibrated", "ap",
                                                        "defect_iou", "miou_paper")},
                            "label_modes": entry}
    return out


NONE = {"mean": None}


def write_limits(summary: dict, data_root: Path, path: Path) -> None:
    """One figure of the images that limit the AP (``ap_limits``): each shown whole with its ground-truth
    mask outlined, titled with the AP its absence gives each seed. Images not found under ``data_root``
    are left out of the figure."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.data import load_samples
    from models.errors import DataError

    rows = [(d, lab, e["ap_limits"]) for d, de in summary.items() for lab, e in de["label_modes"].items()
            if e.get("ap_limits")]
    if not rows:
        return
    cols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.4 * cols, 4.4 * len(rows)), squeeze=False)
    for ax_row, (dataset, lab, limits) in zip(axes, rows, strict=True):
        samples = {}
        for part in ("train", "test"):
            try:
                for smp in load_samples(data_root / dataset, f"{dataset}-{part}").samples:
                    samples[str(Path(smp.path).relative_to(data_root / dataset))] = smp
            except DataError as e:  # the figure is optional; the table carries the numbers
                print(f"limits figure: {dataset} not shown ({e})", file=sys.stderr)
        for ax, r in zip(ax_row, limits + [None] * (cols - len(limits)), strict=True):
            ax.axis("off")
            smp = samples.get(r["image"]) if r else None
            if smp is None:
                continue
            img = cv2.imread(str(smp.path), cv2.IMREAD_GRAYSCALE)
            rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
            if smp.mask is not None and Path(smp.mask).is_file():
                mask = cv2.imread(str(smp.mask), cv2.IMREAD_GRAYSCALE)
                mask = cv2.resize(mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
                contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(rgb, contours, -1, (255, 0, 0), max(2, img.shape[1] // 150))
            ax.imshow(rgb)
            side = "good images above it" if r["defective"] else "defective images below it"
            ax.set_title(f"{r['image']} ({'defective' if r['defective'] else 'good'})\n"
                         f"AP without it: {' / '.join('-' if a is None else f'{a:.3f}' for a in r['ap_without'])}\n"
                         f"{side}: {' / '.join(map(str, r['beyond']))}", fontsize=7)
        ax_row[0].text(-0.08, 0.5, f"{dataset}, {lab} labels", rotation=90, transform=ax_row[0].transAxes,
                       ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_curves(runs: Path, summary: dict, path: Path) -> None:
    """One figure of the runs' learning curves: per dataset and label mode, validation balanced accuracy
    (solid) and training / validation loss (dashed / dotted) per epoch, one colour per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.run_dir import LOG_NAME, read_log

    panels = [(d, lab) for d, e in summary.items() for lab in e["label_modes"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (dataset, lab) in zip(axes[0], panels, strict=True):
        loss_ax = ax.twinx()
        for i, seed in enumerate(summary[dataset]["label_modes"][lab]["seeds"]):
            rows = read_log(run_dir(runs, dataset, lab, seed) / LOG_NAME)
            ep = [r["epoch"] for r in rows]
            colour = f"C{i}"
            ax.plot(ep, [r["val_bal_acc"] for r in rows], color=colour, label=f"seed {seed}")
            loss_ax.plot(ep, [r["train_loss"] for r in rows], color=colour, ls="--", lw=0.8)
            loss_ax.plot(ep, [r["val_loss"] for r in rows], color=colour, ls=":", lw=0.8)
        ax.set_title(f"{dataset}, {lab} labels", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation balanced accuracy (solid)")
        ax.set_ylim(0, 1)
        loss_ax.set_ylabel("train loss -- / val loss ..")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    s = f"{100 * stat['mean']:.1f}"
    return s + (f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else "") + f" (n={stat['n']})"


def doc_section(summary: dict, runs: str = "runs/realdata", summary_path: str = "docs/results/summary.json",
                command: str = "valve-model realdata summary") -> str:
    from models.experiments.results.doc import machine

    info = machine()
    lines = [
        f"## Real data by the paper's slicing (`valve-model realdata`, `{runs}`)", "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')} ({info['cpus']} CPUs, "
        f"{info['cpu']}, torch {info['torch']}); numbers in `{summary_path}`. Tiles: "
        "`models/experiments/realdata.py` (PROTOCOL); the training each run recorded is in the protocol lines "
        "at the end (where it trained, and on what).", "",
        "Accuracy is the daemon's rule (an image is defective when a tile's defect probability reaches 0.5); "
        "*calibrated* moves that threshold to the value that maximises the balanced good-vs-defective accuracy "
        "on the run's own validation images (the training side), as a commissioning engineer would set it. AP "
        "does not depend on the threshold.", "",
        "| dataset | labels | seeds | accuracy % | calibrated acc % | balanced acc % | calibrated bal. % | AP % "
        "| defect vs good % | BN gap (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, d in summary.items():
        for labels, e in d["label_modes"].items():
            lines.append(f"| {dataset} | {labels} | {', '.join(map(str, e['seeds']))} | {pct(e['accuracy'])} | "
                         f"{pct(e.get('accuracy_calibrated', NONE))} | {pct(e['balanced_accuracy'])} | "
                         f"{pct(e.get('balanced_accuracy_calibrated', NONE))} | {pct(e['ap'])} | "
                         f"{pct(e['defect_vs_good_accuracy'])} | "
                         f"{', '.join('-' if g is None else str(g) for g in e['bn_check_gap_points'])} |")
    lines += ["", "Weakly supervised segmentation (the Table 4 analogue): stitched tile masks on the defective test "
              "images, mean over images; `gradcam++/refined` is the runtime's method (service/segment.py).", "",
              "| dataset | labels | saliency / mask | defect IoU % | mIoU eq. 18 % |", "|---|---|---|---|---|"]
    for dataset, d in summary.items():
        for labels, e in d["label_modes"].items():
            for row, v in e.get("segmentation_rows", {}).items():
                lines.append(f"| {dataset} | {labels} | {row} | {pct(v['defect_iou'])} | {pct(v['miou_paper'])} |")
    lines += ["", "What limits the AP: each test image left out in turn, the seeds' image-level defect-vs-good AP (for a binary set the AP above) recomputed without it; the "
              "images whose absence raises it most (mean over the seeds). *Beyond it*: for a defective image, the "
              "good images that score above it; for a good image, the defective images that score below it.", "",
              "| dataset | labels | image | class | defect-vs-good AP per seed | without the image | beyond it |", "|---|---|---|---|---|---|---|"]
    for dataset, d in summary.items():
        for labels, e in d["label_modes"].items():
            for r in e.get("ap_limits", []):
                tie = f" (tied with {r['ties']} more)" if r.get("ties") else ""
                lines.append(f"| {dataset} | {labels} | {r['image']}{tie} | "
                             f"{'defective' if r['defective'] else 'good'} | "
                             f"{' / '.join(f'{a:.3f}' for a in r['ap'])} | "
                             f"{' / '.join('-' if a is None else f'{a:.3f}' for a in r['ap_without'])} | "
                             f"{' / '.join(map(str, r['beyond']))} |")
    lines += ["", "Protocols:", ""]
    for dataset, d in summary.items():
        for labels, e in d["label_modes"].items():
            runs_ = e.get("epochs_run")
            lines.append(f"- {dataset}, {labels}: {e['protocol']}; {e['test_images']} test images"
                         + (f"; epochs finished per seed {', '.join(map(str, runs_))}, best (validation) epochs "
                            f"{', '.join(map(str, e['best_epochs']))}" if runs_ else "") + ".")
    return "\n".join(lines)


#: the recipe options a command line may override in PROTOCOL (its attribute names; absent or None = keep)
OVERRIDES = ("epochs", "epoch_size", "batch_size", "width", "channels", "head_pool", "rot90", "brightness", "contrast",
             "ema", "bn_draws")


def override_protocol(args: argparse.Namespace, datasets: list[str]) -> None:
    """Set the training options ``args`` gives (OVERRIDES) in the PROTOCOL of each of ``datasets``."""
    for d in datasets:
        for key in OVERRIDES:
            if getattr(args, key, None) is not None:
                PROTOCOL[d]["train"][key] = getattr(args, key)


def option_args(key: str, value) -> list[str]:
    """One option as command-line arguments: a boolean as ``--key``/``--no-key``, a list as comma-joined values."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    return [f"--{flag}", ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]


def given_options(args: argparse.Namespace) -> str:
    """The selection and recipe options of a call that differ from the parser's defaults, as command-line text
    (so a recorded command repeats them: ``--datasets``, ``--labels``, ``--seeds`` and OVERRIDES)."""
    defaults = build_parser().parse_args([args.step])
    out = ""
    for key in ("datasets", "labels", "seeds", *OVERRIDES):
        value = getattr(args, key, None)
        if value is None or value == getattr(defaults, key):
            continue
        out += " " + shlex.join(option_args(key, value))
    return out


def add_override_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe overrides (OVERRIDES) as options; shared with ``valve-model unknown loco``, whose held-out runs
    must be trained as their reference. :func:`check_overrides` validates them before anything is cut."""
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (smoke runs)")
    p.add_argument("--epoch-size", type=int, default=None, help="override the protocol's draws per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override the protocol's batch size")
    p.add_argument("--width", type=float, default=None, help="override the compact preset's width (0.125)")
    p.add_argument("--channels", default=None, metavar="STEM,B1,B2,B3",
                   help="explicit channels of the stem and the three blocks instead of the width's (e.g. 4,16,16,32)")
    p.add_argument("--head-pool", default=None, help="override the head's pooling (gap, gmp, mix, flatten)")
    p.add_argument("--rot90", action=argparse.BooleanOptionalAction, default=None,
                   help="augment with every 90-degree rotation too (valve-model train --rot90)")
    p.add_argument("--brightness", type=float, default=None, help="override the brightness jitter (gray levels)")
    p.add_argument("--contrast", type=float, default=None, help="override the contrast jitter (relative)")
    p.add_argument("--ema", type=float, default=None,
                   help="validate and keep an exponential average of the weights (valve-model train --ema)")
    p.add_argument("--bn-draws", choices=("natural", "balanced"), default=None,
                   help="which training tiles the BN recalibration reads (valve-model train --bn-draws)")


def check_overrides(args: argparse.Namespace, prog: str = PROG) -> None:
    """Refuse --width with --channels, normalise --channels (refused here, before any tiles are cut, not in each
    training's log)."""
    if getattr(args, "channels", None) is None:
        return
    if args.width is not None:
        raise SystemExit(f"{prog}: --width and --channels both set the model's channels: give one")
    from models.train import parse_channels

    try:
        args.channels = ",".join(map(str, parse_channels(args.channels)))
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"{prog}: --channels {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("tiles", "train", "calibrate", "summary", "pack", "ceiling", "ablation"))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--labels", default=",".join(DEFAULT_LABELS),
                   help=f"label modes, a comma list of {', '.join(LABEL_MODES)} (default {','.join(DEFAULT_LABELS)})")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1: at 192 px one job with 2 "
                                                        "threads beats two 1-thread jobs, docs/trainability.md)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training (default 2)")
    p.add_argument("--device", default="cpu")
    add_override_arguments(p)
    p.add_argument("--out", default=None, help="pack: the folder for the copy; ceiling: the JSON to write "
                                               "(default docs/results/segmentation-ceiling.json)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    p.add_argument("--runs", default=str(DEFAULT_RUNS))
    p.add_argument("--doc", default=str(DEFAULT_DOC))
    p.add_argument("--summary", default=None, help=f"default {os.path.relpath(DEFAULT_SUMMARY, REPO)} (ablation: "
                                                   f"{os.path.relpath(DEFAULT_ABLATION_SUMMARY, REPO)})")
    p.add_argument("--section", default=None, help=f"summary: the docs section to write (default {SECTION}; "
                                                   f"ablation: {ABLATION_SECTION})")
    p.add_argument("--attentions", default=None,
                   help="ablation: train only these variants (comma list of none, iam-no-spatial, cbam, iam), e.g. to "
                        "split the trainings between two processes (the first cuts the tiles, the other waits for them); the "
                        "summary reads every run under --runs. The ablation uses mask labels; --labels and --jobs "
                        "do not apply to it")
    p.add_argument("--no-train", action="store_true",
                   help="ablation: train nothing, write the summary and the section from the runs there are")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs, data_root = Path(args.runs), Path(args.data_root)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    for option, names, known in (("--datasets", datasets, DATASETS), ("--labels", labels, LABEL_MODES)):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SystemExit(f"{PROG}: {option} {','.join(unknown) or '(empty)'}: give one or more of "
                             f"{','.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    check_overrides(args)
    override_protocol(args, list(PROTOCOL))
    if args.step == "ablation":
        from models.experiments.realdata_ablation import run as ablation

        ablation(runs, data_root, datasets, seeds, args.threads, args.device,
                 Path(args.summary or DEFAULT_ABLATION_SUMMARY), Path(args.doc) if args.doc else None,
                 args.section or ABLATION_SECTION,
                 attentions=[a for a in (args.attentions or "").split(",") if a] or None,
                 train=not args.no_train, default_doc=DEFAULT_DOC)
        return 0
    args.summary = args.summary or str(DEFAULT_SUMMARY)
    args.section = args.section or SECTION
    if args.step == "pack":
        if not args.out:
            raise SystemExit(f"{PROG} pack: --out is required (a new folder for the copy)")
        pack(data_root, Path(args.out), datasets)
        return 0
    if args.step == "tiles":
        for d in datasets:
            for lab in labels:
                make_tiles(runs, data_root, d, lab)
        return 0
    if args.step == "calibrate":
        calibrate(runs, datasets, labels, seeds, args.device)
        return 0
    if args.step == "ceiling":
        from models.tiles import read_tiles_manifest, refine_ceiling

        out = {}
        for d in datasets:
            make_tiles(runs, data_root, d, "mask")
            test = tiles_dir(runs, d, "mask", "test")
            out[d] = refine_ceiling(test, read_tiles_manifest(test))
            print(f"{d}: {json.dumps(out[d]['rows'])}", flush=True)
        path = Path(args.out or DEFAULT_SUMMARY.with_name("segmentation-ceiling.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        runs_arg = os.path.relpath(runs.resolve(), REPO)
        path.write_text(json.dumps({"command": f"valve-model realdata ceiling --datasets {','.join(datasets)} "
                                               f"--runs {runs_arg}", "date": time.strftime("%Y-%m-%d"),
                                    **out}, indent=1) + "\n")
        return 0
    if args.step == "train":
        for d in datasets:
            for lab in labels:
                make_tiles(runs, data_root, d, lab)
        jobs = [(d, lab, s) for d in datasets for lab in labels for s in seeds]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(train_one, d, lab, s, runs, args.threads, args.device): (d, lab, s)
                       for d, lab, s in jobs}
            for f, (d, lab, s) in futures.items():
                m = f.result()
                print(f"{d}/{lab}/seed{s}: accuracy {m['accuracy']:.4f}, AP {m['ap']}, "
                      f"balanced {m['balanced_accuracy']:.4f}", flush=True)
        return 0
    from models.experiments.results.doc import write_section

    summary = summarise(runs, seeds, datasets, labels)
    if not summary:
        raise SystemExit(f"{PROG} summary: no scored runs under {runs} for --datasets {','.join(datasets)} --labels "
                         f"{','.join(labels)} --seeds {','.join(map(str, seeds))}: nothing written (train them first: "
                         f"valve-model realdata train with the same options)")
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    def rel(path: str | Path) -> str:
        return os.path.relpath(Path(path).resolve(), REPO)

    command = (f"valve-model realdata summary{given_options(args)} --runs {rel(runs)} --summary {rel(args.summary)} "
               f"--section {args.section}")
    curves = Path(args.summary).with_name(f"{args.section}-curves.png")
    write_curves(runs, summary, curves)
    limits = Path(args.summary).with_name(f"{args.section}-limits.png")
    write_limits(summary, data_root, limits)
    body = doc_section(summary, rel(runs), rel(args.summary), command)
    body += f"\n\nLearning curves of these runs: `{rel(curves)}`." if curves.is_file() else ""
    body += f"\n\nThe images that limit the AP, with their masks: `{rel(limits)}`." if limits.is_file() else ""
    write_section(Path(args.doc), args.section, body)
    print(json.dumps({k: {"accuracy": v["accuracy"]["mean"], "ap": v["ap"]["mean"]} for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
