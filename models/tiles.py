"""The paper's slicing on public data: real images cut into S x S tiles at (near) native resolution.

The paper cuts each valve image into 192 x 192 slices "without reducing the resolution of the original
image" and labels the slices; the part verdict is "any slice defective". The public datasets come as
whole images (KolektorSDD 500 x ~1250, Magnetic-tile 100-630 x 220-400), so this module does the same
to them:

    image --scale (INTER_AREA; 1.0 = native)--> tiles of S x S every ``stride`` pixels
          (the last row/column flush with the border; an image smaller than S is reflect-padded)

and writes each part of the seeded train/test split (models.real_data) as a ``folders`` dataset that
``valve-model train`` reads unchanged, plus ``tiles.json`` mapping every tile to its source image:

    OUT/<class>/<group>__<image>__y<Y>_x<X>.png   (+ _mask.png: the tile's share of the defect mask)
    OUT/tiles.json                                  spec, classes, and per image: label, size, tiles

The group prefix (``<group>__``) keeps every tile of a part on one side of the training run's
validation split (``models.data.group_of``): KolektorSDD's kos01/kos26 and kos27/kos34 stay together.

Which labels train the model (``labels``):

* ``mask`` (slice labels derived from the masks, as the paper labels its slices): a tile of a defect
  image is that defect class when it holds at least ``min_defect_px`` mask pixels (and at least
  ``min_defect_share`` of the image's defect pixels, so a tile grazing the edge of a large defect is
  not a positive), else ``good``; a tile of a good image is ``good``.
* ``image`` (image labels only, no mask is used): every tile inherits its image's label. Noisy (most
  tiles of a defect image show no defect); the image verdict still comes from the most defective tile.

The image verdict (:func:`image_scores`, the daemon's part rule): an image is defective when any tile's
defect probability (1 - p(good)) reaches 0.5; its class is the defect class with the highest
probability over its tiles. Its score for AP is the highest defect probability over its tiles.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from models.data import load_samples
from models.errors import DataError
from models.images import read_image, read_mask
from models.metrics import confusion_matrix
from models.samples import SampleSet

TILES_FORMAT = "valve-inspect/tiles/1"
MANIFEST_NAME = "tiles.json"
LABEL_MODES = ("mask", "image")


@dataclass(frozen=True)
class TileSpec:
    """How images become tiles (recorded in tiles.json and in the runs that train on them).

    Args:
        size: the tile side S (the network's input, 192 in the paper).
        stride: pixels between tile origins (S: no overlap; S/2: half overlap).
        scale: resize factor before tiling (1.0 = native; >= 0.5 keeps at least half the pixel density).
        labels: ``mask`` (slice labels from the masks) or ``image`` (every tile gets the image's label).
        min_defect_px: ``mask`` labels: defect pixels (after scaling) a tile needs to be a defect tile.
        min_defect_share: ``mask`` labels: and at least this share of its image's defect pixels.
    """

    size: int = 192
    stride: int = 96
    scale: float = 1.0
    labels: str = "mask"
    min_defect_px: int = 16
    min_defect_share: float = 0.05

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 8:
            raise DataError(f"tile size must be a multiple of 8 and >= 8, not {self.size}")
        if not 0 < self.stride <= self.size:
            raise DataError(f"tile stride must be in 1..size ({self.size}), not {self.stride}")
        if not 0.05 <= self.scale <= 4.0:
            raise DataError(f"tile scale must be in [0.05, 4], not {self.scale}")
        if self.labels not in LABEL_MODES:
            raise DataError(f"tile labels must be one of {', '.join(LABEL_MODES)}, not {self.labels!r}")
        if self.min_defect_px < 1 or not 0 <= self.min_defect_share < 1:
            raise DataError("min_defect_px must be >= 1 and min_defect_share in [0, 1)")


def origins(length: int, size: int, stride: int) -> list[int]:
    """Tile origins along one axis: 0, stride, ..., and the last flush with the end.

    >>> origins(500, 192, 96), origins(192, 192, 96), origins(100, 192, 96)
    ([0, 96, 192, 288, 308], [0], [0])
    """
    if length <= size:
        return [0]
    out = list(range(0, length - size + 1, stride))
    if out[-1] != length - size:
        out.append(length - size)
    return out


def scaled(image: np.ndarray, scale: float, *, mask: bool = False) -> np.ndarray:
    """The image at ``scale`` (INTER_AREA; masks INTER_NEAREST); 1.0 returns it unchanged."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
    return cv2.resize(image, size, interpolation=interp)


def pad_to(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """An image smaller than ``size`` on a side, padded to it at the bottom/right: reflected for
    images (no artificial edge for the network to see), zeros for masks."""
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return image
    if mask:
        return np.pad(image, ((0, ph), (0, pw)))
    out = image
    while out.shape[0] < size or out.shape[1] < size:  # reflect needs pad < side: repeat for tiny images
        h, w = out.shape[:2]
        out = cv2.copyMakeBorder(out, 0, min(size - h, h - 1) if h < size else 0, 0,
                                 min(size - w, w - 1) if w < size else 0, cv2.BORDER_REFLECT_101)
    return out


def cut(image: np.ndarray, spec: TileSpec) -> list[tuple[int, int, np.ndarray]]:
    """(y, x, S x S tile) for every tile of an image already at its scale (padded when smaller)."""
    img = pad_to(image, spec.size, mask=image.dtype == bool)
    h, w = img.shape[:2]
    return [(y, x, img[y:y + spec.size, x:x + spec.size]) for y in origins(h, spec.size, spec.stride)
            for x in origins(w, spec.size, spec.stride)]


def tile_label(image_label: int, good: int, mask_tile: np.ndarray | None, defect_total: int, spec: TileSpec) -> int:
    """A tile's class index by the spec's labelling rule (module docstring)."""
    if image_label == good or spec.labels == "image":
        return image_label
    if mask_tile is None:  # a defect image without a usable mask: no slice label can be derived
        return image_label
    n = int(mask_tile.sum())
    if n >= spec.min_defect_px and n >= spec.min_defect_share * max(defect_total, 1):
        return image_label
    return good


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._-]+", "-", text)


def write_tiles(data: SampleSet, out: Path, spec: TileSpec, *, source: str = "", source_scale: float = 1.0) -> dict:
    """Cut every image of ``data`` into tiles under ``out`` (a ``folders`` dataset) and write tiles.json.

    A defect image without a mask (Magnetic-tile's 4 empty Uneven masks) keeps its label on every tile
    under ``mask`` labels too, and is listed with ``mask: false``.

    ``source_scale``: the scale the images of ``data`` already have against the originals (a copy
    written by :func:`prescale_copy`); the images are resized by ``spec.scale / source_scale``, so a
    copy at ``spec.scale`` is tiled as it is and gives the same tiles as the originals.
    """
    if not 0 < source_scale <= 1.0:
        raise DataError(f"source_scale must be in (0, 1], not {source_scale}")
    factor = spec.scale / source_scale  # exactly 1.0 for a copy at the spec's scale: scaled() leaves it as it is
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: tiles are written into a new folder (remove it or choose another)")
    good = next((i for i, c in enumerate(data.classes) if c.lower() in ("good", "free")), None)
    if good is None:
        raise DataError(f"the data has no 'good' class ({', '.join(data.classes)}): tiles need one for the "
                        "tiles without a defect")
    images = []
    counts = {c: 0 for c in data.classes}
    for s in data.samples:
        img = scaled(read_image(s.path), factor)
        mask = None
        if s.mask is not None and s.label != good:
            mask = scaled(read_mask(s.mask).astype(np.uint8), factor, mask=True) > 0
        total = int(mask.sum()) if mask is not None else 0
        mask_tiles = {(y, x): t for y, x, t in cut(mask, spec)} if mask is not None else {}
        stem = f"{_safe(s.group)}__{_safe(s.path.parent.name)}-{_safe(s.path.stem)}"
        entry = {"source": data.relpath(s), "label": data.classes[s.label], "group": s.group,
                 "height": int(img.shape[0]), "width": int(img.shape[1]), "mask": mask is not None, "tiles": []}
        for y, x, tile in cut(img, spec):
            mt = mask_tiles.get((y, x))
            label = tile_label(s.label, good, mt, total, spec)
            name = f"{stem}__y{y:04d}_x{x:04d}"
            folder = out / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.png"
            if not cv2.imwrite(str(path), np.ascontiguousarray(tile)):
                raise DataError(f"cannot write {path}: check the disk and permissions of --out")
            if mt is not None:
                cv2.imwrite(str(folder / f"{name}_mask.png"), mt.astype(np.uint8) * 255)
            counts[data.classes[label]] += 1
            entry["tiles"].append({"file": path.relative_to(out).as_posix(), "y": y, "x": x,
                                   "label": data.classes[label],
                                   "defect_px": int(mt.sum()) if mt is not None else 0})
        images.append(entry)
    manifest = {"format": TILES_FORMAT, "source": source, "source_scale": source_scale, "data_format": data.format,
                "classes": list(data.classes), "spec": asdict(spec), "tile_counts": counts,
                "image_counts": data.counts(), "images": images}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def prescale_copy(data: SampleSet, out: Path, scale: float) -> int:
    """A lossless copy of ``data`` at ``scale`` (PNG, the same layout and names with .png) for carrying
    to another machine: :func:`write_tiles` with ``source_scale=scale`` cuts from it exactly the tiles
    it cuts from the originals (the resize is done here, once, by the same :func:`scaled`).
    Returns the number of images written."""
    out = Path(out)
    n = 0
    for s in data.samples:
        rel = s.path.relative_to(data.root)
        dst = (out / rel).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(dst), scaled(read_image(s.path), scale)):
            raise DataError(f"cannot write {dst}: check the disk and permissions")
        if s.mask is not None:
            mdst = out / s.mask.relative_to(data.root)
            if mdst == dst:
                raise DataError(f"{s.mask} and its image would both be written to {dst}")
            m = scaled(read_mask(s.mask).astype(np.uint8), scale, mask=True) > 0
            cv2.imwrite(str(mdst), m.astype(np.uint8) * 255)
        n += 1
    return n


def read_tiles_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: --tiles takes a folder written by 'valve-model tiles write'")
    m = json.loads(path.read_text(encoding="utf-8"))
    if m.get("format") != TILES_FORMAT:
        raise DataError(f"{path} is not a {TILES_FORMAT} manifest (format {m.get('format')!r})")
    return m


# ---------------------------------------------------------------------------------------------
# image-level scores from tile probabilities


def good_index(classes: Sequence[str]) -> int:
    """The index of the good class ("good", or Magnetic-tile's "free") among ``classes``."""
    return next(i for i, c in enumerate(classes) if c.lower() in ("good", "free"))


def logit(p: float) -> float:
    """log(p / (1 - p)), +-inf at 1 and 0."""
    with np.errstate(divide="ignore"):
        return float(np.log(p) - np.log1p(-p))


def tile_logodds(p: np.ndarray, good: int) -> np.ndarray:
    """Per tile, log(p(defective) / p(good)) = log(sum of the defect classes' p) - log(p(good)).

    Monotone in 1 - p(good), so "p(defective) >= t" is "log-odds >= logit(t)"; unlike 1 - p(good) it
    does not saturate at 1.0 for confident tiles (float64 probabilities from :func:`tile_probabilities`),
    so confident good and defective images are still ranked and thresholded apart.
    """
    tiny = np.finfo(np.float64).tiny
    defect = np.delete(p, good, axis=1).sum(axis=1)
    return np.log(np.maximum(defect, tiny)) - np.log(np.maximum(p[:, good], tiny))


def image_class(p: np.ndarray, odds: np.ndarray, good: int, bound: float) -> int:
    """The daemon's rule on one image's tile probabilities ``p`` (T, K) and their :func:`tile_logodds` ``odds``:
    good unless a tile's log-odds reach ``bound``; then the defect class with the highest probability over the
    tiles (models.mil's image-level validation uses it too)."""
    if odds.max() < bound:
        return good
    d = p.copy()
    d[:, good] = -1.0
    return int(np.unravel_index(np.argmax(d), d.shape)[1])


def image_scores(manifest: dict, tile_probs: dict[str, np.ndarray], threshold: float = 0.5,
                 threshold_logodds: float | None = None) -> dict:
    """Per image: the defect score (max over its tiles of 1 - p(good)) and its log-odds (max over its
    tiles of :func:`tile_logodds`), the per-class scores (max over tiles of p(class)), the predicted
    class and the true class.

    The rule is the daemon's: the image is defective when a tile's defect probability reaches
    ``threshold`` (0.5), i.e. its log-odds reach logit(threshold); ``threshold_logodds`` gives that
    bound directly (a calibrated one, :func:`calibrate_threshold`). A defective image's class is the
    defect class with the highest probability over its tiles.

    ``tile_probs``: tile file (as in the manifest) -> class probabilities in ``manifest['classes']`` order.
    """
    classes = manifest["classes"]
    good = good_index(classes)
    bound = logit(threshold) if threshold_logodds is None else threshold_logodds
    out = {"classes": classes, "images": []}
    for im in manifest["images"]:
        p = np.stack([tile_probs[t["file"]] for t in im["tiles"]]).astype(np.float64)  # (T, K)
        odds = tile_logodds(p, good)
        per_class = p.max(axis=0)
        pred = image_class(p, odds, good, bound)
        out["images"].append({"source": im["source"], "true": classes.index(im["label"]), "pred": pred,
                              "defect_score": float((1.0 - p[:, good]).max()),
                              "defect_logodds": float(odds.max()), "class_scores": per_class.tolist()})
    return out


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """models.metrics.average_precision (step-wise, sklearn's average_precision_score) of ``scores``;
    None instead of NaN when there is no positive (the value goes to JSON)."""
    from models.metrics import average_precision as ap

    value = ap(np.asarray(positive, dtype=bool), scores)
    return None if math.isnan(value) else value


def image_metrics(scored: dict) -> dict:
    """Accuracy, balanced accuracy, per-class recall, confusion and AP of the image verdicts."""
    classes = scored["classes"]
    good = good_index(classes)
    true = np.array([r["true"] for r in scored["images"]])
    pred = np.array([r["pred"] for r in scored["images"]])
    k = len(classes)
    conf = confusion_matrix(true, pred, k)
    recall = {classes[i]: (conf[i, i] / conf[i].sum()) if conf[i].sum() else None for i in range(k)}
    present = [r for r in recall.values() if r is not None]
    # ranked by the log-odds where present: 1 - p(good) ties at 1.0 for every confident image
    defect_ap = average_precision([r.get("defect_logodds", r["defect_score"]) for r in scored["images"]], true != good)
    class_ap = {classes[c]: average_precision([r["class_scores"][c] for r in scored["images"]], true == c)
                for c in range(k) if c != good}
    aps = [v for v in class_ap.values() if v is not None]
    binary = k == 2
    return {
        "images": int(len(true)), "accuracy": float((true == pred).mean()) if len(true) else None,
        "balanced_accuracy": float(np.mean(present)) if present else None, "recall": recall,
        "confusion": conf.tolist(), "defect_ap": defect_ap, "class_ap": class_ap,
        # the summary's "ap": the defect score's AP for a binary set, the mean over defect classes otherwise
        "ap": defect_ap if binary else (float(np.mean(aps)) if aps else None),
        "defect_vs_good_accuracy": float(((true != good) == (pred != good)).mean()) if len(true) else None,
    }


def validation_manifest(run_dir: Path, train_tiles_dir: Path) -> dict:
    """The training tiles' manifest cut down to the images the run validated on (its split.json ``val``;
    the grouped split keeps every tile of a part on one side, so an image is wholly in or out)."""
    manifest = read_tiles_manifest(train_tiles_dir)
    split_path = Path(run_dir) / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path} not found: calibration needs the run's validation split")
    val = set(json.loads(split_path.read_text(encoding="utf-8"))["val"])
    images = [im for im in manifest["images"] if im["tiles"] and all(t["file"] in val for t in im["tiles"])]
    return {**manifest, "images": images}


def calibrate_threshold(scored: dict) -> dict:
    """The image rule's bound on the defect log-odds that maximises the balanced accuracy of defective vs
    good on ``scored`` (image_scores of the validation images). Candidates: 0 (p = 0.5, the daemon's
    default), the midpoints between consecutive distinct image log-odds, and one below the lowest and
    one above the highest; ties go to the candidate nearest 0. Returned as ``threshold_logodds`` and as
    the probability ``threshold`` (1 / (1 + e^-bound)), with the highest good and the lowest defective
    validation score (``good_max``, ``defect_min``) that bound it."""
    classes = scored["classes"]
    good = good_index(classes)
    score = np.array([r["defect_logodds"] for r in scored["images"]], dtype=float)
    defect = np.array([r["true"] != good for r in scored["images"]])
    if not defect.any() or defect.all():
        return {"threshold_logodds": 0.0, "threshold": 0.5, "images": int(len(score)),
                "defect_images": int(defect.sum()), "balanced_accuracy": None,
                "note": "validation holds one kind of image only: threshold left at 0.5"}
    u = np.unique(score[np.isfinite(score)])
    candidates = np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [u[0] - 1.0, u[-1] + 1.0]])

    def bal(t: float) -> float:
        flagged = score >= t
        return 0.5 * (flagged[defect].mean() + (~flagged[~defect]).mean())

    values = np.array([bal(t) for t in candidates])
    best = values.max()
    tied = candidates[np.isclose(values, best)]
    t = float(tied[np.argmin(np.abs(tied))])
    return {"threshold_logodds": t, "threshold": float(1.0 / (1.0 + np.exp(-t))), "images": int(len(score)),
            "defect_images": int(defect.sum()), "balanced_accuracy": float(best), "at_0.5": float(bal(0.0)),
            "good_max": float(score[~defect].max()), "defect_min": float(score[defect].min()),
            "score": "max over the image's tiles of log(p(defective) / p(good))"}


def tile_probabilities(run_dir: Path, tiles_dir: Path, manifest: dict, *, batch_size: int = 64,
                       weights: str = "model.safetensors", device: str = "cpu",
                       cache: bool = True) -> dict[str, np.ndarray]:
    """The trained run's class probabilities for every tile of the manifest (torch, eval mode): the fp32
    logits' softmax taken in float64, so a confident tile's p(good) stays above 0 (see :func:`tile_logodds`).

    With ``cache`` the probabilities are kept in the run directory (``tile-probs-<part>.npz``, keyed by the
    tile files and the weights file's size and mtime) and reused while both are unchanged.
    """
    import torch

    from models.checkpoint import load

    wpath = Path(run_dir) / weights if (Path(run_dir) / weights).is_file() else Path(run_dir)
    files = [t["file"] for im in manifest["images"] for t in im["tiles"]]
    stamp = f"{wpath.stat().st_size}:{wpath.stat().st_mtime_ns}" if wpath.is_file() else ""
    cache_path = Path(run_dir) / f"tile-probs-{Path(tiles_dir).parent.name}-{Path(tiles_dir).name}.npz"
    use_cache = cache and bool(stamp)
    known: dict[str, np.ndarray] = {}
    if use_cache and cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as z:
            if str(z["stamp"]) == stamp and str(z["tiles"]) == str(Path(tiles_dir).resolve()):
                known = dict(zip(z["files"].tolist(), z["probs"], strict=True))
        if all(f in known for f in files):
            return {f: known[f] for f in files}
    model = load(wpath, map_location=device)
    classes = list(model.config.classes)
    if classes != manifest["classes"]:
        raise DataError(f"the run's classes {classes} differ from the tiles' {manifest['classes']}")
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            x = torch.from_numpy(np.stack([read_image(Path(tiles_dir) / f) for f in chunk])).unsqueeze(1)
            p = torch.softmax(model(x.to(device)).float().double(), dim=1).cpu().numpy()
            out.update(zip(chunk, p, strict=True))
    if use_cache:
        merged = {**known, **out}
        np.savez(cache_path, files=np.array(list(merged)), probs=np.stack(list(merged.values())), stamp=stamp,
                 tiles=str(Path(tiles_dir).resolve()))
    return out


#: (saliency method, mask method) rows of the segmentation table: the paper's three with Otsu, and ours
SEGMENTATION_ROWS = (("cam", "otsu"), ("gradcam", "otsu"), ("gradcam++", "otsu"), ("gradcam++", "refined"))


def _canvas(im: dict, size: int) -> tuple[int, int]:
    """The padded image size the tiles were cut from."""
    return max(im["height"], size), max(im["width"], size)


def _score_stitched(acc: dict[str, list[float]], pred: np.ndarray, truth: np.ndarray, im: dict) -> None:
    """Append one image's defect-only IoU and eq. 18 mIoU (its stitched masks cut back to the image's size)."""
    from models.metrics import pixel_counts, scores_from_counts

    h, w = im["height"], im["width"]
    sc = scores_from_counts(pixel_counts(pred[:h, :w], truth[:h, :w]))
    acc["iou"].append(sc["iou"])
    acc["miou"].append(sc["miou_paper"])


def _row_means(acc: dict[str, list[float]]) -> dict:
    return {"defect_iou": float(np.mean(acc["iou"])) if acc["iou"] else None,
            "miou_paper": float(np.mean(acc["miou"])) if acc["miou"] else None}


def image_segmentation(run_dir: Path, tiles_dir: Path, manifest: dict, tile_probs: dict[str, np.ndarray],
                       rows: Sequence[tuple[str, str]] = SEGMENTATION_ROWS, weights: str = "model.safetensors",
                       batch_size: int = 32, device: str = "cpu") -> dict:
    """Defect-only IoU and the paper's eq. 18 mIoU of stitched tile masks on the defective images with a mask.

    Per image: the masks of the tiles predicted defective (by the image rule's tile class: the tile's
    most probable class when it is not good), each from that class's saliency (``models.saliency``)
    and a mask method of service.segment, OR-ed into the image at the tiles' places; the true mask is
    the tiles' masks put back the same way. Mean over images, per (saliency, mask) row.
    """
    import torch

    from models.checkpoint import load
    from models.saliency import saliency
    from service.segment import otsu_mask, refined_mask

    size = int(manifest["spec"]["size"])
    classes = manifest["classes"]
    good = good_index(classes)
    model = load(Path(run_dir) / weights if (Path(run_dir) / weights).is_file() else Path(run_dir),
                 map_location=device)
    per_row: dict[str, dict[str, list[float]]] = {f"{s}/{m}": {"iou": [], "miou": []} for s, m in rows}
    images = [im for im in manifest["images"] if im["label"] != classes[good] and im.get("mask")]
    for im in images:
        h, w = _canvas(im, size)
        truth = np.zeros((h, w), bool)
        for t in im["tiles"]:
            mpath = Path(tiles_dir) / t["file"].replace(".png", "_mask.png")
            if mpath.is_file():
                truth[t["y"]:t["y"] + size, t["x"]:t["x"] + size] |= read_mask(mpath)
        flagged = [t for t in im["tiles"] if int(np.argmax(tile_probs[t["file"]])) != good]
        preds = {key: np.zeros((h, w), bool) for key in per_row}
        for i in range(0, len(flagged), batch_size):
            chunk = flagged[i:i + batch_size]
            x_np = np.stack([read_image(Path(tiles_dir) / t["file"]) for t in chunk])
            x = torch.from_numpy(x_np).unsqueeze(1).to(device)
            cls = torch.tensor([int(np.argmax(tile_probs[t["file"]])) for t in chunk], device=device)
            maps_by = {}
            for sal_method in {s for s, _ in rows}:
                _, maps = saliency(model, x, sal_method, class_idx=cls)
                maps_by[sal_method] = maps.float().cpu().numpy()
            for j, t in enumerate(chunk):
                for sal_method, mask_method in rows:
                    m = maps_by[sal_method][j]
                    mask = refined_mask(x_np[j], m) if mask_method == "refined" else otsu_mask(m)
                    preds[f"{sal_method}/{mask_method}"][t["y"]:t["y"] + size, t["x"]:t["x"] + size] |= mask
        for key, pred in preds.items():
            _score_stitched(per_row[key], pred, truth, im)
    return {"images": len(images), "definition": "defective test images with a mask; mean over images of the "
                                                  "defect-only IoU and of eq. 18 (mean of defect and background IoU)",
            "rows": {k: _row_means(v) for k, v in per_row.items()}}


def refine_ceiling(tiles_dir: Path, manifest: dict, dilations: Sequence[int] = (1, 31)) -> dict:
    """What the runtime's ``refined`` masks can reach on a dataset when the map is perfect: every tile with
    a true mask gets that mask as its saliency (and so its class right), the refine step (service.segment,
    with the region grown by each of ``dilations``; 31 is the runtime's) picks the pixels, and the stitched
    masks are scored like :func:`image_segmentation` (defect-only IoU and eq. 18, mean over the defective
    images with a mask). No model is involved: this is the ceiling the annotation style leaves the method.
    """
    from service.segment import refined_mask

    size = int(manifest["spec"]["size"])
    classes = manifest["classes"]
    good = good_index(classes)
    rows: dict[int, dict[str, list[float]]] = {d: {"iou": [], "miou": []} for d in dilations}
    images = [im for im in manifest["images"] if im["label"] != classes[good] and im.get("mask")]
    for im in images:
        h, w = _canvas(im, size)
        truth = np.zeros((h, w), bool)
        preds = {d: np.zeros((h, w), bool) for d in dilations}
        for t in im["tiles"]:
            mpath = Path(tiles_dir) / t["file"].replace(".png", "_mask.png")
            if not mpath.is_file():
                continue
            tm = read_mask(mpath)
            truth[t["y"]:t["y"] + size, t["x"]:t["x"] + size] |= tm
            if tm.any():
                x = read_image(Path(tiles_dir) / t["file"])
                for d in dilations:
                    preds[d][t["y"]:t["y"] + size, t["x"]:t["x"] + size] |= refined_mask(
                        x, tm.astype(np.float32), dilate=d)
        for d, pred in preds.items():
            _score_stitched(rows[d], pred, truth, im)
    return {"images": len(images), "definition": "the true mask as each tile's map; refined masks stitched; mean "
                                                  "over the defective test images of defect-only IoU and eq. 18",
            "rows": {(f"truth/refined, region dilated by a {d} x {d} square" if d > 1
                      else "truth/refined, region not grown"): _row_means(v) for d, v in rows.items()}}


def calibrated_metrics(run_dir: Path, train_tiles_dir: Path, manifest: dict, probs: dict[str, np.ndarray],
                       **kwargs) -> dict:
    """The image metrics at the threshold calibrated on the run's validation images (the training side):
    the evaluation-only counterpart of a defect threshold set at commissioning."""
    val = validation_manifest(run_dir, train_tiles_dir)
    cal = calibrate_threshold(image_scores(val, tile_probabilities(run_dir, train_tiles_dir, val, **kwargs)))
    m = image_metrics(image_scores(manifest, probs, threshold_logodds=cal["threshold_logodds"]))
    return {"calibration": cal, **{k: m[k] for k in ("accuracy", "balanced_accuracy", "defect_vs_good_accuracy",
                                                     "recall", "confusion")}}


def evaluate_images(run_dir: Path, tiles_dir: Path, out: Path | None = None, segmentation: bool = True,
                    calibrate_on: Path | None = None, **kwargs) -> dict:
    """Image-level metrics of a run on a tiles folder (usually the test part); written to ``out``.

    With ``calibrate_on`` (the training tiles the run was trained on) the metrics at the image-rule
    threshold calibrated on the run's validation images are added under ``calibrated``
    (:func:`calibrated_metrics`); AP does not depend on the threshold.

    With ``segmentation`` the stitched masks are scored too (:func:`image_segmentation`); the summary's
    ``defect_iou`` and ``miou_paper`` are those of the runtime's method (Grad-CAM++ + refined).
    """
    manifest = read_tiles_manifest(tiles_dir)
    probs = tile_probabilities(run_dir, tiles_dir, manifest, **kwargs)
    scored = image_scores(manifest, probs)
    metrics = {"run": str(run_dir), "tiles": str(tiles_dir), "spec": manifest["spec"],
               **image_metrics(scored), "per_image": scored["images"]}
    if calibrate_on is not None:
        metrics["calibrated"] = calibrated_metrics(run_dir, calibrate_on, manifest, probs, **kwargs)
    if segmentation:
        seg = image_segmentation(run_dir, tiles_dir, manifest, probs, weights=kwargs.get("weights", "model.safetensors"),
                                 device=kwargs.get("device", "cpu"))
        metrics["segmentation"] = seg
        metrics["defect_iou"] = seg["rows"]["gradcam++/refined"]["defect_iou"]
        metrics["miou_paper"] = seg["rows"]["gradcam++/refined"]["miou_paper"]
    if out is not None:
        Path(out).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


# ---------------------------------------------------------------------------------------------
# command line


def fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valve-model tiles",
                                description="Cut real images into S x S tiles at (near) native resolution, the "
                                            "paper's slicing (write), and score a run's image verdicts from its "
                                            "tiles (evaluate).")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="cut a dataset (or one part of its split) into a folders dataset of tiles")
    w.add_argument("--data", required=True, help="dataset root (or a split folder)")
    w.add_argument("--format", required=True,
                   help="dataset format, e.g. kolektorsdd-train, kolektorsdd-test, magnetic-tile-train, folders")
    w.add_argument("--out", required=True, help="new folder for the tiles")
    d = TileSpec()
    w.add_argument("--size", type=int, default=d.size, help=f"tile side (default {d.size})")
    w.add_argument("--stride", type=int, default=d.stride, help=f"pixels between tiles (default {d.stride})")
    w.add_argument("--scale", type=float, default=d.scale, help=f"resize before tiling (default {d.scale}: native)")
    w.add_argument("--labels", choices=LABEL_MODES, default=d.labels,
                   help="mask: slice labels derived from the masks; image: every tile gets its image's label")
    w.add_argument("--min-defect-px", type=int, default=d.min_defect_px)
    w.add_argument("--min-defect-share", type=float, default=d.min_defect_share)
    e = sub.add_parser("evaluate", help="image-level verdicts of a trained run from its tiles")
    e.add_argument("--run", required=True, help="the run directory (valve-model train --out)")
    e.add_argument("--tiles", required=True, help="a folder written by 'tiles write' (usually the test part)")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument("--weights", default="model.safetensors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "write":
            spec = TileSpec(size=args.size, stride=args.stride, scale=args.scale, labels=args.labels,
                            min_defect_px=args.min_defect_px, min_defect_share=args.min_defect_share)
            data = load_samples(args.data, args.format)
            m = write_tiles(data, Path(args.out), spec, source=f"{args.format}:{args.data}")
            n = sum(len(im["tiles"]) for im in m["images"])
            print(f"{len(m['images'])} images -> {n} tiles in {args.out}: {m['tile_counts']}")
        else:
            m = evaluate_images(Path(args.run), Path(args.tiles), Path(args.out) if args.out else None,
                                weights=args.weights)
            print(f"{m['images']} images: accuracy {fmt(m['accuracy'])}, balanced {fmt(m['balanced_accuracy'])}, "
                  f"AP {fmt(m['ap'])}, defect-vs-good {fmt(m['defect_vs_good_accuracy'])}")
    except DataError as exc:
        print(f"valve-model tiles: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
