"""``valve-model unknown loco``: leave one class out of a public dataset's training, then ask how well the
unknown score finds that class on the test images, and what leaving it out costs the known classes.

For each held-out defect class c of the dataset (Magnetic-tile by default: blowhole, break, crack, fray,
uneven) and each seed:

1. the training tiles of ``valve-model realdata`` (the paper's slicing, mask labels) without every tile of
   the images of class c: a folder of links, ``<runs>/tiles/<dataset>-<labels>-without-<c>/train``;
2. one training by the realdata protocol (the same recipe, seed and overrides as the reference run),
   ``<runs>/<dataset>-<labels>-without-<c>/seed<s>``; the reference run, trained on every class, is
   realdata's own ``<runs>/<dataset>-<labels>/seed<s>`` (trained here when missing);
3. the scores, per tile, max over an image's tiles:
   - ``mahalanobis``: the graph's feature score (``valve-model unknown attach --method mahalanobis``):
     [GAP, GMP] of each IRA-Block's output, class-conditional Gaussians with a tied covariance fitted
     on the run's training tiles (its split's train side, every class it knows), the mean over the
     blocks of the squared whitened distance to the nearest class mean, per feature;
   - ``energy``: -logsumexp(logits); ``max_softmax``: 1 - max p (the classifier's own uncertainty);
   - ``defect_logodds``: the classifier's defect score (log p(defective) / p(good)): a defect it never
     saw is still rejected when the model calls it *some* defect;
4. AUROC of the held-out class's test images against the good test images, per score; the Mahalanobis
   threshold calibrated on the run's validation images (its good ones, at ``--false-flag-rate``); the
   held-out images *not accepted* by the part rule a plant would run (unknown flagged, or a known defect
   at the run's calibrated image threshold);
5. the known classes' accuracy: the held-out run and the reference run on the same test images (every
   class but c), each at its own calibrated image threshold.

The variation score the demo model ships is not measured here: it is a model of each slice *position*
of a fixed part, and a tile of Magnetic-tile has no fixed position (docs/model.md: a position-free
pixel score was at chance on Magnetic-tile).

Writes a JSON (``--json``, default docs/results/unknown-loco.json) and, with ``--doc``, the section
``unknown-loco`` of docs/results.md. Nothing trained here ships (the datasets' licences).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from models.unknown.command import _logsumexp
from models.unknown.frames import UnknownError
from models.unknown.scores import SHRINKAGE, auroc, calibrate, fit_gaussians

SCORES = ("mahalanobis", "energy", "max_softmax", "defect_logodds")
BLOCKS = (1, 2, 3)
DEFAULT_RATE = 0.01
SECTION = "unknown-loco"


def without_class(src: Path, dst: Path, held_out: str) -> dict:
    """A tiles folder like ``src`` (a realdata training tiles folder) without the images of class ``held_out``:
    every tile of theirs is left out, whatever the tile's own label, and so is the class. Links, not copies;
    its tiles.json is ``src``'s with those images and the class removed. Rewritten when it differs."""
    from models.tiles import MANIFEST_NAME, good_index, read_tiles_manifest

    m = read_tiles_manifest(src)
    if held_out not in m["classes"]:
        raise UnknownError(f"class {held_out!r} is not in {src} (classes {', '.join(m['classes'])})")
    if m["classes"].index(held_out) == good_index(m["classes"]):
        raise UnknownError(f"{held_out!r} is the good class: leave out a defect class")
    images = [im for im in m["images"] if im["label"] != held_out]
    classes = [c for c in m["classes"] if c != held_out]
    files = [t["file"] for im in images for t in im["tiles"]]
    out = {**m, "classes": classes, "images": images, "left_out": held_out, "left_out_of": str(Path(src).resolve()),
           "tile_counts": {c: sum(t["label"] == c for im in images for t in im["tiles"]) for c in classes},
           "image_counts": {c: sum(im["label"] == c for im in images) for c in classes}}
    man = dst / MANIFEST_NAME
    if man.is_file() and json.loads(man.read_text()) == out:
        return out
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    for f in files:
        target = (Path(src) / f).resolve()
        link = dst / f
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    man.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def tile_outputs(run: Path, tiles: Path, files: list[str], part: str, device: str = "cpu", batch: int = 64) -> dict:
    """Per tile (in ``files`` order): the logits (N, K) and [GAP, GMP] of each IRA-Block's output (N, 2 C_b),
    float64; cached in the run folder (``loco-<part>.npz``: "fit", "val", "test") while the weights, the tiles
    folder and the file list are unchanged."""
    import torch

    from models.checkpoint import load
    from models.images import read_image

    weights = run / "model.safetensors"
    stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}:{Path(tiles).resolve()}"
    cache = run / f"loco-{part}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["stamp"]) == stamp and z["files"].tolist() == files:
                return {"logits": z["logits"], "features": [z[f"f{b}"] for b in BLOCKS]}
    model = load(weights, map_location=device).eval()
    grabbed: dict[int, torch.Tensor] = {}
    hooks = [getattr(model, f"block{b}").register_forward_hook(
        lambda _m, _i, o, b=b: grabbed.__setitem__(b, o)) for b in BLOCKS]
    logits, feats = [], {b: [] for b in BLOCKS}
    try:
        with torch.inference_mode():
            for i in range(0, len(files), batch):
                x = torch.from_numpy(np.stack([read_image(Path(tiles) / f) for f in files[i:i + batch]])).unsqueeze(1)
                logits.append(model(x.to(device)).double().cpu().numpy())
                for b in BLOCKS:
                    o = grabbed[b].double()
                    feats[b].append(torch.cat([o.mean(dim=(2, 3)), o.amax(dim=(2, 3))], dim=1).cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    out = {"logits": np.concatenate(logits), "features": [np.concatenate(feats[b]) for b in BLOCKS]}
    np.savez(cache, stamp=stamp, files=np.array(files), logits=out["logits"],
             **{f"f{b}": f for b, f in zip(BLOCKS, out["features"], strict=True)})
    return out


def check_same_recipe(run: Path, reference: Path) -> None:
    """Refuse a held-out run whose recipe differs from its reference's (classes and data aside): the known
    classes' accuracy is compared between the two."""
    from models.experiments import realdata as R

    differ = R.recipe_differences(run, reference)
    if differ:
        raise UnknownError(f"{run} and its reference {reference} were trained with other settings "
                           f"({', '.join(differ)}): give loco the reference's overrides (--epochs, --width, ...), or "
                           f"remove {run} to retrain it")


def check_trained_on(run: Path, folder: Path) -> None:
    """Refuse a held-out run trained on other tiles than ``folder`` lists now (its split.json's files)."""
    from models.experiments import realdata as R

    if not R.trained_on(run, folder):
        raise UnknownError(f"{run} was trained on other tiles than {folder} lists: remove {run} to retrain it")


def _softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(logits - _logsumexp(logits)[:, None])


def tile_scores(outs: dict, gaussians, good: int) -> dict[str, np.ndarray]:
    """The four scores per tile (higher = less like the known classes, or more defective)."""
    from models.tiles import tile_logodds

    lg = outs["logits"]
    p = _softmax(lg)
    return {"mahalanobis": gaussians.score(outs["features"]),
            "energy": -_logsumexp(lg),
            "max_softmax": 1.0 - p.max(axis=1),
            "defect_logodds": tile_logodds(p, good)}


def image_max(manifest: dict, files: list[str], values: np.ndarray) -> np.ndarray:
    """Per image of the manifest, the max of ``values`` (aligned with ``files``) over its tiles."""
    at = {f: i for i, f in enumerate(files)}
    return np.array([max(values[at[t["file"]]] for t in im["tiles"]) for im in manifest["images"]])


def evaluate_held_out(run: Path, reference: Path, train_tiles: Path, test_tiles: Path, held_out: str,
                      rate: float = DEFAULT_RATE, device: str = "cpu") -> dict:
    """Step 3-5 of the module's docstring for one held-out run; returns its JSON record."""
    from models.tiles import (
        calibrated_metrics,
        good_index,
        read_tiles_manifest,
        tile_probabilities,
        validation_manifest,
    )

    train_m = read_tiles_manifest(train_tiles)
    classes = train_m["classes"]
    good = good_index(classes)
    split = json.loads((run / "split.json").read_text())
    fit_files = sorted(split["train"])
    val = validation_manifest(run, train_tiles)
    val_files = [t["file"] for im in val["images"] for t in im["tiles"]]
    test_full = read_tiles_manifest(test_tiles)
    test_files = [t["file"] for im in test_full["images"] for t in im["tiles"]]

    fit = tile_outputs(run, train_tiles, fit_files, "fit", device)
    labels = np.array([classes.index(f.split("/", 1)[0]) for f in fit_files])
    g = fit_gaussians(fit["features"], labels, classes, BLOCKS, shrinkage=SHRINKAGE)
    val_s = tile_scores(tile_outputs(run, train_tiles, val_files, "val", device), g, good)
    test_out = tile_outputs(run, test_tiles, test_files, "test", device)
    test_s = tile_scores(test_out, g, good)

    truth = np.array([im["label"] for im in test_full["images"]])
    gclass = test_full["classes"][good_index(test_full["classes"])]
    is_good, is_out = truth == gclass, truth == held_out
    known_defect = ~is_good & ~is_out
    if not is_out.any() or not is_good.any():
        raise UnknownError(f"{test_tiles} holds {int(is_out.sum())} {held_out} and {int(is_good.sum())} good test images: "
                           f"the AUROC needs both")
    per_image = {k: image_max(test_full, test_files, v) for k, v in test_s.items()}
    n_tiles = np.array([len(im["tiles"]) for im in test_full["images"]], dtype=float)
    val_good = np.array([im["label"] == classes[good] for im in val["images"]])
    val_img = image_max(val, val_files, val_s["mahalanobis"])
    if not val_good.any():
        raise UnknownError(f"{run}'s validation split holds no good image: the threshold cannot be calibrated "
                           f"(give the training more good images)")
    threshold = calibrate(val_img[val_good], rate)
    flagged = per_image["mahalanobis"] >= threshold

    # the known classes: the held-out run and the reference on the same test images, each at its own threshold
    known_m = {**test_full, "classes": classes, "images": [im for im in test_full["images"] if im["label"] != held_out]}
    # the same float64 softmax of the fp32 logits as models.tiles.tile_probabilities, from the pass above
    probs = dict(zip(test_files, _softmax(test_out["logits"]), strict=True))
    held = calibrated_metrics(run, train_tiles, known_m, probs, device=device)
    ref_train = Path(json.loads((reference / "config.json").read_text())["data"]["path"])
    ref_known = {**known_m, "classes": test_full["classes"]}
    ref = calibrated_metrics(reference, ref_train, ref_known,
                             tile_probabilities(reference, test_tiles, ref_known, device=device), device=device)
    bound = held["calibration"]["threshold_logodds"]
    rejected = per_image["defect_logodds"] >= bound
    cfg = json.loads((run / "config.json").read_text())
    return {
        "held_out": held_out, "run": str(run), "reference": str(reference),
        "test_images": {"good": int(is_good.sum()), "held_out": int(is_out.sum()), "known_defect": int(known_defect.sum())},
        "tiles_per_image": {"good": float(n_tiles[is_good].mean()), "held_out": float(n_tiles[is_out].mean())},
        "auroc_vs_good": {k: auroc(v[is_good], v[is_out]) for k, v in per_image.items()},
        "auroc_vs_known_defects": {k: auroc(v[known_defect], v[is_out]) for k, v in per_image.items()},
        "mahalanobis_threshold": {"value": threshold, "rate": rate, "validation_good_images": int(val_good.sum()),
                                  "validation_good_flagged": float((val_img[val_good] >= threshold).mean())},
        "flagged": {"good": float(flagged[is_good].mean()), "held_out": float(flagged[is_out].mean()),
                    "known_defect": float(flagged[known_defect].mean())},
        "held_out_not_accepted": {"as_a_known_defect": float(rejected[is_out].mean()),
                                  "flagged_unknown": float(flagged[is_out].mean()),
                                  "either": float((rejected | flagged)[is_out].mean())},
        "good_not_accepted": float((rejected | flagged)[is_good].mean()),
        "known_accuracy": {"held_out_run": held["accuracy"], "reference": ref["accuracy"],
                           "held_out_run_balanced": held["balanced_accuracy"], "reference_balanced": ref["balanced_accuracy"]},
        "best_epoch": cfg.get("bn_check", {}).get("epoch"), "bn_gap_points": cfg.get("bn_check", {}).get("gap_points"),
    }


def run(args: argparse.Namespace) -> dict:
    """Train what is missing, evaluate every held-out run, write the JSON (and the doc section)."""
    import torch

    from models.experiments import realdata as R
    from models.tiles import good_index, read_tiles_manifest

    torch.set_num_threads(max(1, args.threads))
    runs, data_root = Path(args.runs), Path(args.data_root)
    ds, labels = args.dataset, "mask"
    if ds not in R.PROTOCOL:
        raise UnknownError(f"--dataset {ds!r}: one of {', '.join(R.PROTOCOL)}")
    R.check_overrides(args, "valve-model unknown loco")
    R.override_protocol(args, [ds])
    R.make_tiles(runs, data_root, ds, labels)
    train_tiles, test_tiles = R.tiles_dir(runs, ds, labels, "train"), R.tiles_dir(runs, ds, labels, "test")
    classes = read_tiles_manifest(train_tiles)["classes"]
    defects = [c for i, c in enumerate(classes) if i != good_index(classes)]
    chosen = [c for c in args.classes.split(",") if c] if args.classes else defects
    if len(defects) < 2:
        raise UnknownError(f"{ds} has {len(defects)} defect class(es): leaving one out needs at least two (e.g. "
                           f"--dataset magnetic-tile)")
    unknown = [c for c in chosen if c not in defects]
    if unknown:
        raise UnknownError(f"--classes {','.join(unknown)}: not a defect class of {ds} ({', '.join(defects)})")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise UnknownError("--seeds: give at least one training seed, e.g. --seeds 0")
    records = []
    for seed in seeds:
        reference = R.run_dir(runs, ds, labels, seed)
        R.train_run(train_tiles, reference, seed, ds, args.threads, args.device)
        for c in chosen:
            t0 = time.time()
            folder = runs / "tiles" / f"{ds}-{labels}-without-{c}" / "train"
            without_class(train_tiles, folder, c)
            out = runs / f"{ds}-{labels}-without-{c}" / f"seed{seed}"
            check_trained_on(out, folder)
            wall = R.train_run(folder, out, seed, ds, args.threads, args.device)
            check_same_recipe(out, reference)
            rec = evaluate_held_out(out, reference, folder, test_tiles, c, rate=args.false_flag_rate,
                                    device=args.device)
            rec.update(seed=seed, train_wall_s=round(wall, 1), eval_wall_s=round(time.time() - t0 - wall, 1))
            records.append(rec)
            a = rec["auroc_vs_good"]
            print(f"seed {seed} without {c}: AUROC vs good " + ", ".join(f"{k} {v:.3f}" for k, v in a.items())
                  + f"; known accuracy {rec['known_accuracy']['held_out_run']:.3f} "
                    f"(reference {rec['known_accuracy']['reference']:.3f})", flush=True)
    result = {"command": "valve-model unknown loco " + " ".join(args.argv), "date": time.strftime("%Y-%m-%d"),
              "dataset": ds, "labels": labels, "seeds": seeds, "classes": chosen,
              "protocol": R.protocol_text(ds, labels, json.loads((R.run_dir(runs, ds, labels, seeds[0])
                                                                  / "config.json").read_text())),
              "records": records, "summary": summarise(records, chosen)}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.doc:
        from models.experiments.results.doc import write_section

        write_section(Path(args.doc), SECTION, doc_section(result))
    return result


def summarise(records: list[dict], classes: list[str]) -> dict:
    """Per held-out class (over seeds) and over all records: mean +- std of the figures the doc reads."""
    from models.experiments.realdata import mean_std

    def block(rs: list[dict]) -> dict:
        return {**{f"auroc_{k}": mean_std([r["auroc_vs_good"][k] for r in rs]) for k in SCORES},
                "held_out_flagged": mean_std([r["flagged"]["held_out"] for r in rs]),
                "good_flagged": mean_std([r["flagged"]["good"] for r in rs]),
                "held_out_not_accepted": mean_std([r["held_out_not_accepted"]["either"] for r in rs]),
                "held_out_as_known_defect": mean_std([r["held_out_not_accepted"]["as_a_known_defect"] for r in rs]),
                "good_not_accepted": mean_std([r["good_not_accepted"] for r in rs]),
                "known_accuracy": mean_std([r["known_accuracy"]["held_out_run"] for r in rs]),
                "known_accuracy_reference": mean_std([r["known_accuracy"]["reference"] for r in rs])}
    return {"per_class": {c: block([r for r in records if r["held_out"] == c]) for c in classes},
            "all": block(records)}


def doc_section(result: dict) -> str:
    def f(d: dict, pct: bool = False) -> str:
        if d["mean"] is None:
            return "-"
        k, digits = (100.0, 1) if pct else (1.0, 3)
        return f"{d['mean'] * k:.{digits}f}" + (f" ± {d['std'] * k:.{digits}f}" if d["std"] is not None else "")

    s = result["summary"]
    rate = result["records"][0]["mahalanobis_threshold"]["rate"] if result["records"] else "-"
    name = {"magnetic-tile": "Magnetic-tile", "kolektorsdd": "KolektorSDD"}.get(result["dataset"], result["dataset"])
    lines = [f"## Unknown defects on {name}: leave one class out (`valve-model unknown loco`)", "",
             f"Written by `{result['command']}` on {result['date']}; numbers in `docs/results/unknown-loco.json`. "
             "For each defect class, a training without every tile of its images; the held-out class's test "
             "images are then the unknown defects. Image score = max over its tiles. AUROC against the good test "
             "images. *Flagged*: Mahalanobis score at the threshold calibrated on the run's good validation images "
             f"(rate {rate}). *Not accepted*: flagged, or a known defect at the run's calibrated image threshold; "
             "beside it the good test images that rule does not accept. *Known accuracy*: the test images of the "
             "other classes, the held-out run against the reference run trained on every class (each at its own "
             "calibrated threshold). Per class: mean ± std over the seeds; *all*: over every held-out run "
             f"({len(result['records'])}).", "",
             "| held out | AUROC Mahalanobis | AUROC energy | AUROC max-softmax | AUROC defect log-odds | flagged % "
             "(good %) | not accepted % (good %) | known accuracy % (reference) |", "|---|---|---|---|---|---|---|---|"]
    for c, b in [*s["per_class"].items(), ("all", s["all"])]:
        lines.append(f"| {c} | {f(b['auroc_mahalanobis'])} | {f(b['auroc_energy'])} | {f(b['auroc_max_softmax'])} | "
                     f"{f(b['auroc_defect_logodds'])} | {f(b['held_out_flagged'], True)} ({f(b['good_flagged'], True)}) | "
                     f"{f(b['held_out_not_accepted'], True)} ({f(b['good_not_accepted'], True)}) | "
                     f"{f(b['known_accuracy'], True)} ({f(b['known_accuracy_reference'], True)}) |")
    lines += ["", "Read with two caveats: the held-out run draws its own grouped validation split over the images "
              "left to it, so the known-accuracy difference includes the change of split (which picks the epoch and "
              "the threshold) beside the missing class; and an image's score is a max over its tiles, so classes "
              "whose images are larger (more tiles) score higher under every score.", "",
              f"Protocol: {result['protocol']}; seeds {', '.join(map(str, result['seeds']))}."]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from models.experiments import realdata as R

    p.add_argument("--dataset", default="magnetic-tile")
    p.add_argument("--classes", default=None, help="defect classes to hold out, one run each (default: all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default=str(R.DEFAULT_RUNS), help="realdata's runs folder (its tiles and reference runs)")
    p.add_argument("--data-root", default=str(R.DEFAULT_DATA_ROOT))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training")
    R.add_override_arguments(p)  # the realdata recipe's overrides, all of them: the reference run's recipe
    p.add_argument("--false-flag-rate", type=float, default=DEFAULT_RATE,
                   help=f"the Mahalanobis threshold's rate on the good validation images (default {DEFAULT_RATE})")
    p.add_argument("--json", dest="json_out", default=str(R.DEFAULT_SUMMARY.with_name("unknown-loco.json")))
    p.add_argument("--doc", default=None, help="write the section 'unknown-loco' of this markdown file "
                                               "(e.g. docs/results.md)")
