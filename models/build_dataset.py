"""``valve-model build-dataset``: camera frames -> the 'folders' dataset of 192x192 slices.

    valve-model build-dataset --frames DIR --out OUT [--roi-threshold T] [--overwrite]
    valve-model build-dataset --archive ARCHIVE --out OUT [--overwrite]     # the daemon's archive
    valve-model build-dataset --apply-labels OUT                            # after reviewing OUT/labels.csv

DIR is either a synthetic dataset (``valve-inspect synth``: DIR/manifest.jsonl, DIR/frames/,
DIR/masks/) or a plain folder of Mono8 frames (PNG/BMP/TIFF; no manifest: the slices are
unlabelled). Every frame goes through ``service.roi.extract``, the very code the runtime runs,
and its slices are written as

    OUT/<slice label>/<frame stem>__s<k>.png        192x192 uint8, k = 0..7 in row-major order
    OUT/<label>/<frame stem>__s<k>_mask.png         0/255, for slices labelled dirt, scratch or novel
    OUT/unlabelled/<frame stem>__s<k>.png           frames without a manifest entry
    OUT/novel/<frame stem>__s<k>.png                slices of novel defects (synth's dent, stain, chip):
                                                    for an unknown-defect evaluation, never for training
                                                    (``valve-model train`` refuses a dataset with novel/)

The double underscore is models.data's group separator: all slices of one frame form one group and
stay on one side of a train/validation split (slices of one part are strongly correlated).
    OUT/slices.jsonl                                one row per slice: file, label, mask, frame, slice,
                                                    defect_px, part, part_class, subtype (novel parts),
                                                    seed (split by part/seed!)
    OUT/skipped.jsonl                               frames the ROI rejected: file, reason, message

Slice labels of dirt, scratch and novel parts are recomputed from the part's mask pushed through the
geometry this run cut with (``service.sim.synth.slice_labels``), so they stay consistent with the
slices even under another ``--roi-threshold``; the manifest's labels are used where there is no mask.
``models.data`` (format ``folders``) reads this: ``*_mask.png`` are masks, never images.

From the daemon's archive (``--archive``; docs/retraining.md): every entry with a frame (rejects, the
``accept_every`` sample of accepted parts, NotInspected parts) is cut by the same ROI, and each slice
gets the daemon's decision as its *provisional* label: the class of a slice that rejected the part,
"good" for every other slice of an inspected part, none for a part that was never inspected
(``.unlabelled/``, which the ``folders`` format skips, like every hidden folder). Beside the slices:

    OUT/labels.csv     file, provisional, label, predicted, p, part_id, frame_id, verdict, slice,
                       score_dirt, score_scratch, score_ec, entry, model_sha256

``label`` starts as the provisional label; the engineer corrects it (a class name, or ``exclude``,
or empty for "not reviewed, keep out") and ``--apply-labels OUT`` moves every slice into the folder
of its ``label`` (``.excluded/`` for exclude or empty) and rewrites ``file``. Run it again after more
corrections: it only moves what changed.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from models.errors import ValveModelError
from service.errors import NoPartError
from service.roi import RoiParams, extract
from service.sim.synth import CLASSES, FRAMES_DIR, MANIFEST, MASKED, NOVEL_LABEL, read_manifest, slice_labels

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
UNLABELLED = "unlabelled"
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
LABELS_CSV = "labels.csv"
LABEL_COLUMNS = ("file", "provisional", "label", "predicted", "p", "part_id", "frame_id", "verdict", "slice",
                 "score_dirt", "score_scratch", "score_ec", "entry", "model_sha256")
#: Hidden folders (the 'folders' format ignores them): slices without a label, and slices left out.
ARCHIVE_UNLABELLED = ".unlabelled"
EXCLUDED = ".excluded"
EXCLUDE = "exclude"
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class UsageError(ValveModelError):
    """A problem with the arguments or the folders: exit code 2 with this message."""


def _list_frames(folder: Path) -> list[tuple[Path, dict | None]]:
    """(frame path, manifest row or None) in part order."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            rows = read_manifest(manifest)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = []
        for n, row in enumerate(rows, 1):
            if "file" not in row:
                raise UsageError(f"{manifest}:{n}: a row without 'file'")
            out.append((folder / row["file"], row))
        return out
    for cand in (folder, folder / FRAMES_DIR):
        files = sorted(p for p in cand.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return [(p, None) for p in files]
    raise UsageError(f"no frames in {folder}: expected {MANIFEST} (valve-inspect synth) or image files "
                     f"({', '.join(IMAGE_SUFFIXES)}) in it or in {folder / FRAMES_DIR}")


def _prepare_out(out: Path, overwrite: bool, files: tuple[str, ...] = ("skipped.jsonl", "slices.jsonl"),
                 hidden: bool = False) -> None:
    """Refuse (or, with ``overwrite``, remove) an earlier dataset in ``out``: its slices (in hidden folders
    too when ``hidden``) and ``files``."""
    existing = [p for p in out.glob("*/*.png")] + ([p for p in out.glob(".*/*.png")] if hidden else []) + \
        [p for p in (out / name for name in files) if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{out} already holds a dataset ({len(existing)} files, e.g. {existing[0]}); pass "
                         f"--overwrite to replace it or choose an empty folder")
    for p in existing:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _labels_for(row: dict | None, folder: Path, batch, n: int) -> tuple[list[str], np.ndarray | None, str | None]:
    """(labels, mask slices (n, S, S) bool or None, a note when the manifest's labels were replaced)."""
    if row is None:
        return [UNLABELLED] * n, None, None
    cls = row.get("class")
    given = row.get("slice_labels")
    mask_file = row.get("mask")
    if cls in MASKED and mask_file:
        mask_path = folder / mask_file
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise LookupError(f"mask {mask_path} is missing or unreadable")
        if mask.shape != batch.frame_shape:
            raise LookupError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, the frame "
                              f"{batch.frame_shape[1]}x{batch.frame_shape[0]}")
        mask_slices = batch.frame_to_slices(mask > 0)
        labels, _ = slice_labels(cls, mask_slices, int(row.get("min_defect_px", 40)))
        note = None if given is None or list(given) == labels else f"manifest {given} -> {labels}"
        return labels, mask_slices, note
    if given is not None:
        if len(given) != n:
            raise LookupError(f"the manifest has {len(given)} slice labels, the ROI cuts {n} slices")
        return [str(x) for x in given], None, None
    if cls in CLASSES and cls not in MASKED:
        return slice_labels(cls, None, 0)[0], None, None
    raise LookupError(f"class {cls!r} without slice_labels or a mask: cannot label the slices")


def build(frames: Path, out: Path, params: RoiParams, overwrite: bool = False, log=print) -> dict:
    """Slice every frame of ``frames`` into ``out``; returns a summary dict (counts, skipped, relabelled)."""
    if not frames.is_dir():
        raise UsageError(f"--frames {frames} is not a folder")
    items = _list_frames(frames)
    _prepare_out(out, overwrite)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    masks_written, relabelled, used = 0, [], 0
    t0 = time.perf_counter()
    with open(out / "skipped.jsonl", "w", encoding="utf-8") as skipped, \
            open(out / "slices.jsonl", "w", encoding="utf-8") as index:
        def skip(path: Path, reason: str, message: str) -> None:
            reasons[reason] += 1
            skipped.write(json.dumps({"file": str(path), "reason": reason, "message": message}) + "\n")

        for path, row in items:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                skip(path, "unreadable", f"{path} is missing or not an image OpenCV can read")
                continue
            try:
                batch = extract(image, params)
            except NoPartError as exc:
                skip(path, exc.reason, str(exc))
                continue
            except ValueError as exc:  # not Mono8
                skip(path, "not_mono8", str(exc))
                continue
            n = len(batch)
            try:
                labels, mask_slices, note = _labels_for(row, frames, batch, n)
            except LookupError as exc:
                skip(path, "no_labels", str(exc))
                continue
            if note:
                relabelled.append(f"{path.name}: {note}")
            stem = path.stem
            for k in range(n):
                label = labels[k]
                (out / label).mkdir(exist_ok=True)
                name = f"{stem}__s{k}.png"  # "__": models.data groups a frame's slices (no leakage)
                cv2.imwrite(str(out / label / name), batch.slices[k, 0], PNG_FLAGS)
                mask_name = None
                if mask_slices is not None and label in MASKED:
                    mask_name = f"{label}/{stem}__s{k}_mask.png"
                    cv2.imwrite(str(out / mask_name), np.where(mask_slices[k], 255, 0).astype(np.uint8), PNG_FLAGS)
                    masks_written += 1
                counts[label] += 1
                index.write(json.dumps({
                    "file": f"{label}/{name}", "label": label, "mask": mask_name, "frame": str(path), "slice": k,
                    "defect_px": None if mask_slices is None else int(mask_slices[k].sum()),
                    "part": None if row is None else row.get("part"),
                    "part_class": None if row is None else row.get("class"),
                    "subtype": None if row is None else row.get("subtype"),
                    "seed": None if row is None else row.get("seed")}) + "\n")
            used += 1
    dt = time.perf_counter() - t0
    summary = {"frames": len(items), "used": used, "skipped": sum(reasons.values()), "skip_reasons": dict(reasons),
               "slices": dict(counts), "masks": masks_written, "relabelled": relabelled, "seconds": dt}
    order = [c for c in (*CLASSES, UNLABELLED) if c in counts] + sorted(set(counts) - {*CLASSES, UNLABELLED})
    log(f"{used}/{len(items)} frames sliced into {out} ({dt:.1f} s)")
    log("  slices: " + ("  ".join(f"{c}={counts[c]}" for c in order) or "none") + f"  (masks: {masks_written})")
    if reasons:
        log(f"  skipped {sum(reasons.values())} frames: " + ", ".join(f"{r}={n}" for r, n in reasons.items())
            + f"  (details: {out / 'skipped.jsonl'})")
    if counts[NOVEL_LABEL]:
        log(f"  {counts[NOVEL_LABEL]} novel slices in {out / NOVEL_LABEL}: defects no model trains on, for an "
            f"unknown-defect evaluation; valve-model train refuses this folder (train on a dataset without it)")
    if relabelled:
        log(f"  {len(relabelled)} frames' slice labels recomputed from their masks for this ROI "
            f"(e.g. {relabelled[0]})")
    return summary


# ------------------------------------------------------------------------------------ from the archive


def _archive_entries(archive: Path) -> list[tuple[Path, dict]]:
    """(frame path, sidecar) of every archive entry with a frame, oldest first."""
    if not archive.is_dir():
        raise UsageError(f"--archive {archive} is not a folder")
    out = []
    for side in sorted(archive.glob("*.json")):
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(meta, dict) or "verdict" not in meta or "files" not in meta:
            continue  # not an archive sidecar
        frame = meta["files"].get("frame")
        if frame:
            out.append((archive / frame, meta))
    if not out:
        raise UsageError(f"no archive entries in {archive}: expected <stem>.json sidecars beside <stem>.png frames "
                         f"(the daemon's [archive] dir)")
    return out


def provisional_labels(meta: dict, n: int) -> tuple[list[str], list[str], list[float]]:
    """The daemon's decision per slice -> (provisional labels, predicted classes, their probabilities).

    A slice that rejected the part carries its class; every other slice of an inspected part is "good"
    (also one whose defect class stayed below its threshold: the line counted it good); a part without
    per-slice results (NotInspected) gets "" (no label)."""
    verdict = meta.get("verdict", {})
    slices = (verdict.get("extra") or {}).get("slices") or []
    if meta.get("label") not in ("accept", "reject") or len(slices) != n:
        return [""] * n, [""] * n, [float("nan")] * n
    labels = [str(s.get("class")) if s.get("rejects") else "good" for s in slices]
    return labels, [str(s.get("class")) for s in slices], [float(s.get("p", float("nan"))) for s in slices]


def build_from_archive(archive: Path, out: Path, params: RoiParams, overwrite: bool = False, log=print) -> dict:
    """Slice every archived frame into ``out`` under its provisional labels and write ``out/labels.csv``."""
    entries = _archive_entries(archive)
    _prepare_out(out, overwrite, files=(LABELS_CSV, "skipped.jsonl"), hidden=True)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    used = 0
    with open(out / LABELS_CSV, "w", encoding="utf-8", newline="") as f, \
            open(out / "skipped.jsonl", "w", encoding="utf-8") as skipped:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        for path, meta in entries:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            reason, message = None, ""
            if image is None:
                reason, message = "unreadable", f"{path} is missing or not an image OpenCV can read"
            else:
                try:
                    batch = extract(image, params)
                except NoPartError as exc:
                    reason, message = exc.reason, str(exc)
                except ValueError as exc:
                    reason, message = "not_mono8", str(exc)
            if reason:
                reasons[reason] += 1
                skipped.write(json.dumps({"file": str(path), "reason": reason, "message": message}) + "\n")
                continue
            n = len(batch)
            labels, predicted, probs = provisional_labels(meta, n)
            v = meta.get("verdict", {})
            for k in range(n):
                folder = labels[k] or ARCHIVE_UNLABELLED
                (out / folder).mkdir(exist_ok=True)
                name = f"{path.stem}__s{k}.png"  # "__": models.data keeps a part's slices on one side of a split
                cv2.imwrite(str(out / folder / name), batch.slices[k, 0], PNG_FLAGS)
                counts[folder] += 1
                writer.writerow({
                    "file": f"{folder}/{name}", "provisional": labels[k], "label": labels[k],
                    "predicted": predicted[k], "p": "" if probs[k] != probs[k] else round(probs[k], 4),
                    "part_id": meta.get("part_id"), "frame_id": meta.get("frame_id"), "verdict": meta.get("label"),
                    "slice": k, "score_dirt": v.get("score_dirt"), "score_scratch": v.get("score_scratch"),
                    "score_ec": v.get("score_ec"), "entry": path.stem,
                    "model_sha256": (meta.get("meta") or {}).get("model_sha256") or ""})
            used += 1
    log(f"{used}/{len(entries)} archived frames sliced into {out}; provisional labels in {out / LABELS_CSV}")
    log("  slices: " + ("  ".join(f"{c}={n}" for c, n in sorted(counts.items())) or "none"))
    if reasons:
        log(f"  skipped {sum(reasons.values())} frames: " + ", ".join(f"{r}={n}" for r, n in reasons.items())
            + f"  (details: {out / 'skipped.jsonl'})")
    log(f"  next: review the 'label' column of {out / LABELS_CSV}, then valve-model build-dataset --apply-labels {out}")
    return {"entries": len(entries), "used": used, "skipped": sum(reasons.values()), "skip_reasons": dict(reasons),
            "slices": dict(counts)}


def apply_labels(out: Path, log=print) -> dict:
    """Move each slice of ``out`` into the folder of its reviewed ``label`` (``.excluded/`` for exclude or
    empty) and rewrite labels.csv's ``file`` column; returns the counts per folder and the moves."""
    path = out / LABELS_CSV
    if not path.is_file():
        raise UsageError(f"{path} does not exist: build the dataset with --archive first")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [(i + 2, r.get("label")) for i, r in enumerate(rows)
           if (r.get("label") or "").strip() not in ("", EXCLUDE) and not _LABEL_RE.match((r.get("label") or "").strip())]
    if bad:
        raise UsageError(f"{path}: labels must be class names (lower case letters, digits, _ and -), '{EXCLUDE}' or "
                         f"empty; line {bad[0][0]} has {bad[0][1]!r} ({len(bad)} such lines)")
    moved = 0
    counts: Counter[str] = Counter()
    for r in rows:
        label = (r.get("label") or "").strip()
        folder = EXCLUDED if label in ("", EXCLUDE) else label
        src = out / r["file"]
        dst = out / folder / Path(r["file"]).name
        if src != dst:
            if not src.is_file():
                raise UsageError(f"{path}: {r['file']} is not in {out} (moved or deleted by hand?)")
            dst.parent.mkdir(exist_ok=True)
            src.replace(dst)
            r["file"] = f"{folder}/{dst.name}"
            moved += 1
        counts[folder] += 1
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else list(LABEL_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    for d in out.iterdir():  # a class folder emptied by the review would stop training ('holds no images')
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    log(f"{moved} slices moved to their reviewed labels in {out}")
    log("  slices: " + ("  ".join(f"{c}={n}" for c, n in sorted(counts.items())) or "none"))
    return {"moved": moved, "slices": dict(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="valve-model build-dataset",
        description="Slice camera frames through the runtime's ROI (service.roi) into the 'folders' dataset "
                    "format: OUT/<label>/<frame>__s<k>.png (+ _mask.png for dirt/scratch/novel).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", type=Path,
                     help="a 'valve-inspect synth' folder (manifest.jsonl) or a folder of Mono8 frames")
    src.add_argument("--archive", type=Path,
                     help="the daemon's archive folder ([archive] dir): slices with the daemon's verdicts as "
                          "provisional labels, and OUT/labels.csv to review")
    src.add_argument("--apply-labels", type=Path, metavar="OUT",
                     help="a dataset built with --archive: move each slice to the folder of its reviewed label")
    ap.add_argument("--out", type=Path, help="output folder (with --frames or --archive)")
    ap.add_argument("--roi-threshold", type=int, default=None,
                    help=f"binarisation threshold of the ROI (default {RoiParams().threshold})")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = ap.parse_args(argv)
    if args.apply_labels is None and args.out is None:
        ap.error("--out is required with --frames or --archive")
    try:
        params = RoiParams() if args.roi_threshold is None else RoiParams(threshold=args.roi_threshold)
        if args.apply_labels is not None:
            apply_labels(args.apply_labels)
            return 0
        if args.archive is not None:
            summary = build_from_archive(args.archive, args.out, params, args.overwrite)
        else:
            summary = build(args.frames, args.out, params, args.overwrite)
    except (UsageError, ValueError, OSError) as exc:
        print(f"valve-model build-dataset: {exc}", file=sys.stderr)
        return 2
    if summary["used"] == 0:
        print(f"valve-model build-dataset: every frame was skipped; see {args.out / 'skipped.jsonl'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
