"""Synthetic camera frames of fuel-injector valves, with ground truth (numpy/OpenCV only).

``valve-inspect synth --out DIR --parts N --seed S [--mix good=0.4,dirt=0.2,scratch=0.2,ec=0.2]``
writes what the Basler aca2440-20gm delivers (Mono8, 2448 wide x 2048 high) and what we know about it:

    DIR/frames/part_000000.png ...   the frames, and nothing else (the pylon camera emulator replays
                                     every entry of this folder in sorted order: ImageFilename=DIR/frames)
    DIR/masks/part_000000.png ...    full-frame 0/255 defect masks: dirt, scratch and novel parts only
    DIR/manifest.jsonl               one JSON object per frame (see ``write_dataset``)

The frames: a dark background; a horizontal cylindrical valve (~768x384 px) with jitter of position
and a small rotation; the lighting of a cylinder under a parallel light in the middle and spherical
lights at the sides (a bright axial specular band that saturates in places, weaker side bands,
brighter ends, falloff towards the rims); circumferential and axial machining lines, grain, and
sensor noise. One defect type per part, as in the paper: dirt (darker irregular blobs), scratch
(thin strips of low contrast, gray close to the surface), ec (electrochemical corrosion: many small
pits over the whole valve), good (none). Sizes and contrasts are drawn from wide ranges, so some
defects are hard to see. Everything is drawn from a ``numpy.random.Generator``: the same seed gives
byte-identical PNGs.

Novel defects (``NOVEL``, class "novel", issue 14), on the same valve, lighting and noise, to test an
unknown-defect score: dent (a smooth hollow under directional light: a bright crescent on one side, a
dark one on the other, 30-120 px), stain (a large diffuse discoloration, a lighter film that also evens
out the machining lines or a blotchy texture of its own, irregular soft outline, 80-250 px, contrast
6-30 %), chip (an angular notch cut out of the silhouette at a rim or an end, showing the background,
with a thin bright or dark fracture face, 20-80 px wide). ``--mix good=0.5,novel=0.5`` splits the novel
parts evenly over the subtypes; ``dent=..,stain=..,chip=..`` name them one by one. No shipped model
trains on them (``CLASSES`` are the trained classes; ``valve-model demo-model`` refuses novel in its mix,
``valve-model train`` refuses a dataset with a novel/ folder). Mixes without novel keys render exactly
the frames they rendered before these types existed (the random stream of the classes is unchanged).

The per-slice labels come from the mask pushed through the very ROI transform that ``service.roi``
cuts (``label_slices``), so they agree with what the runtime and ``valve-model build-dataset`` see.

The valve's shading and texture are ``service.sim.surface``, the defects drawn on it
``service.sim.defects``; this module poses the valve, composes the frame, labels the slices and writes
the dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from service.errors import NoPartError
from service.roi import RoiParams, SliceBatch, ValveRect, extract
from service.sim.defects import _add_chip, _add_dent, _add_dirt, _add_pits, _add_scratch, _add_stain
from service.sim.surface import _f, _shade_valve

#: The classes a model trains on (the shipped demo model's, in its order).
CLASSES = ("good", "dirt", "scratch", "ec")
SEGMENTED = ("dirt", "scratch")
#: Novel defects: never in a training set; their parts and slices are labelled NOVEL_LABEL.
NOVEL_LABEL = "novel"
NOVEL = ("dent", "stain", "chip")
#: Labels whose slices come from the part's mask (``slice_labels``).
MASKED = (*SEGMENTED, NOVEL_LABEL)
#: What ``--mix`` may name: the classes, "novel" (its parts split evenly over NOVEL), or a NOVEL subtype.
MIX_KEYS = (*CLASSES, NOVEL_LABEL, *NOVEL)
DEFAULT_MIX = {"good": 0.4, "dirt": 0.2, "scratch": 0.2, "ec": 0.2}
FRAMES_DIR = "frames"
MASKS_DIR = "masks"
MANIFEST = "manifest.jsonl"
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


@dataclass(frozen=True)
class SynthParams:
    """What the synthetic line looks like.

    Args:
        width, height: the frame (the aca2440-20gm: 2448 x 2048).
        length_range, diameter_range: the valve's size in pixels (its ROI is normalised to 768x384).
        max_angle_deg: rotations are drawn from +-this.
        position_jitter: the valve centre is drawn within +-(dx, dy) px of the frame centre, clipped so
            that the valve stays ``margin`` px inside the frame.
        margin: the smallest distance of the valve's rectangle to the frame border.
        min_defect_px: a slice is labelled with the part's defect when the defect mask covers at least
            this many of the slice's pixels (dirt, scratch, novel); otherwise ``good``.
        roi: the ROI parameters used to compute the slice labels (use the ones you cut with).
    """

    width: int = 2448
    height: int = 2048
    length_range: tuple[float, float] = (740.0, 796.0)
    diameter_range: tuple[float, float] = (366.0, 400.0)
    max_angle_deg: float = 4.0
    position_jitter: tuple[float, float] = (500.0, 420.0)
    margin: int = 24
    min_defect_px: int = 40
    roi: RoiParams = field(default_factory=RoiParams)

    def __post_init__(self) -> None:
        need_w = self.length_range[1] + self.diameter_range[1] * math.sin(math.radians(self.max_angle_deg)) \
            + 2 * self.margin
        need_h = self.diameter_range[1] + self.length_range[1] * math.sin(math.radians(self.max_angle_deg)) \
            + 2 * self.margin
        if self.width < need_w or self.height < need_h:
            raise ValueError(f"a {self.width}x{self.height} frame cannot hold the valve (up to "
                             f"{self.length_range[1]:.0f}x{self.diameter_range[1]:.0f} px rotated by "
                             f"{self.max_angle_deg:g} deg): use a frame of at least {math.ceil(need_w)}x"
                             f"{math.ceil(need_h)}")


@dataclass(frozen=True)
class Pose:
    """Where the valve lies: centre (frame pixel coordinates), length, diameter and rotation
    (counter-clockwise on screen, degrees), as ``service.roi.ValveRect``."""

    cx: float
    cy: float
    length: float
    diameter: float
    angle_deg: float

    def rect(self) -> ValveRect:
        return ValveRect(self.cx, self.cy, self.length, self.diameter, self.angle_deg)


def draw_pose(rng: np.random.Generator, params: SynthParams) -> Pose:
    """A random pose: size, rotation and a jittered centre that keeps the valve inside the frame."""
    length = rng.uniform(*params.length_range)
    diameter = rng.uniform(*params.diameter_range)
    angle = rng.uniform(-params.max_angle_deg, params.max_angle_deg)
    a = math.radians(angle)
    hx = (length * abs(math.cos(a)) + diameter * abs(math.sin(a))) / 2 + params.margin
    hy = (length * abs(math.sin(a)) + diameter * abs(math.cos(a))) / 2 + params.margin
    mx, my = (params.width - 1) / 2, (params.height - 1) / 2
    jx = max(0.0, min(params.position_jitter[0], mx - hx))
    jy = max(0.0, min(params.position_jitter[1], my - hy))
    return Pose(mx + rng.uniform(-jx, jx), my + rng.uniform(-jy, jy), length, diameter, angle)


def render_part(rng: np.random.Generator, cls: str, params: SynthParams | None = None,
                pose: Pose | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one camera frame of a valve of class ``cls``.

    Args:
        rng: all randomness comes from it (same state -> byte-identical frame).
        cls: good | dirt | scratch | ec, or a novel subtype: dent | stain | chip (class "novel").
        params: the line (default ``SynthParams()``).
        pose: where the valve lies; drawn at random (``draw_pose``) when None.
    Returns:
        frame: (height, width) uint8 Mono8.
        mask: (height, width) uint8, 255 on the defect's pixels (dirt, scratch, novel; EC: the pits), else 0.
            A chip's mask is the part of the valve cut away (background now) and its fracture face.
        info: JSON-ready dict: class, bbox [x, y, w, h] (pixels covered >= half by the valve), rect
            (cx, cy, length, diameter, angle_deg of the true valve), angle_deg, defects, lighting;
            novel parts: class "novel" and ``subtype`` (dent, stain, chip) after it.
    """
    if cls not in CLASSES and cls not in NOVEL:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)} or a novel subtype "
                         f"({', '.join(NOVEL)})")
    p = params or SynthParams()
    pose = pose or draw_pose(rng, p)
    pad = 3
    radiance, alpha, lighting = _shade_valve(rng, pose.length, pose.diameter, pad, cls)
    valve = alpha >= 0.5  # before a chip cuts into it
    local_mask = np.zeros(radiance.shape, dtype=bool)
    if cls == "dirt":
        defects = _add_dirt(rng, radiance, local_mask, pose.length, pose.diameter, pad)
    elif cls == "scratch":
        defects = _add_scratch(rng, radiance, local_mask, pose.length, pose.diameter, pad)
    elif cls == "ec":
        defects = _add_pits(rng, radiance, local_mask, pose.length, pose.diameter, pad, (p.roi.cols, p.roi.rows))
    elif cls == "dent":
        defects = _add_dent(rng, radiance, local_mask, pose.length, pose.diameter, pad)
    elif cls == "stain":
        defects = _add_stain(rng, radiance, local_mask, pose.length, pose.diameter, pad)
    elif cls == "chip":
        defects = _add_chip(rng, radiance, alpha, local_mask, pose.length, pose.diameter, pad)
    else:
        defects = []
    local_mask &= valve

    # local canvas -> frame: local pixel (i, j) is at (j + 0.5 - pad, i + 0.5 - pad) along/across the valve
    rect = pose.rect()
    ax, nm = rect.axis, rect.normal
    hc, wc = radiance.shape
    ox, oy = pad + pose.length / 2 - 0.5, pad + pose.diameter / 2 - 0.5
    m = np.array([[ax[0], nm[0], pose.cx - ax[0] * ox - nm[0] * oy],
                  [ax[1], nm[1], pose.cy - ax[1] * ox - nm[1] * oy]])
    corners = np.array([[-1, -1], [wc, -1], [wc, hc], [-1, hc]], dtype=np.float64) @ m[:, :2].T + m[:, 2]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(p.width, int(x1)), min(p.height, int(y1))
    mw = m.copy()
    mw[:, 2] -= [x0, y0]
    size = (x1 - x0, y1 - y0)
    premult = np.dstack([radiance * alpha, alpha])
    warped = cv2.warpAffine(premult, mw, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    rad_w, alpha_w = warped[..., 0], warped[..., 1]
    mask_w = cv2.warpAffine(local_mask.view(np.uint8) * np.uint8(255), mw, size, flags=cv2.INTER_LINEAR)

    # the frame: dark background with a gentle gradient, the valve, dust glints, sensor noise
    h, w = p.height, p.width
    b0 = rng.uniform(6, 16)
    gx = np.linspace(-0.5, 0.5, w, dtype=np.float32) * np.float32(rng.uniform(-6, 6))
    gy = np.linspace(-0.5, 0.5, h, dtype=np.float32) * np.float32(rng.uniform(-6, 6))
    frame = rng.standard_normal((h, w), dtype=np.float32)
    frame *= np.float32(rng.uniform(1.2, 2.2))
    frame += gy[:, None]
    frame += gx[None, :] + np.float32(b0)
    win = frame[y0:y1, x0:x1]
    shot = rng.standard_normal(win.shape, dtype=np.float32) * np.sqrt(np.float32(rng.uniform(0.02, 0.05)) * rad_w)
    win *= 1.0 - alpha_w
    win += rad_w + shot
    for _ in range(int(rng.integers(0, 4))):  # glints of dust on the background: small, never the largest
        sx, sy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
        if x0 - 10 <= sx <= x1 + 10 and y0 - 10 <= sy <= y1 + 10:
            continue
        cv2.circle(frame, (int(sx), int(sy)), int(rng.integers(1, 4)), float(rng.uniform(60, 220)), -1)
    np.clip(frame, 0.0, 255.0, out=frame)
    frame += 0.5
    out = frame.astype(np.uint8)

    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = np.where(mask_w >= 128, 255, 0).astype(np.uint8)
    ys, xs = np.nonzero(alpha_w >= 0.5)
    bbox = [int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1]
    head = {"class": NOVEL_LABEL, "subtype": cls} if cls in NOVEL else {"class": cls}
    info = {**head, "bbox": bbox, "rect": rect.to_dict(), "angle_deg": _f(pose.angle_deg),
            "defects": defects, "lighting": lighting}
    return out, mask, info


# ------------------------------------------------------------------------------------ labels


def slice_labels(cls: str, mask_slices: np.ndarray | None, min_defect_px: int) -> tuple[list[str], list[int]]:
    """Per-slice labels of a part: good -> all good; ec -> all ec (EC covers the whole valve);
    dirt/scratch/novel -> the class where the mask covers >= min_defect_px of the slice, else good.

    Args:
        cls: a class, "novel", or a novel subtype (dent, stain, chip: labelled "novel").
        mask_slices: (n, S, S) bool, the mask cut exactly like the slices (``SliceBatch.frame_to_slices``).
    Returns:
        labels, defect pixels per slice.
    """
    if cls in NOVEL:
        cls = NOVEL_LABEL
    if cls not in CLASSES and cls != NOVEL_LABEL:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join((*CLASSES, NOVEL_LABEL, *NOVEL))}")
    if mask_slices is None:
        if cls in MASKED:
            raise ValueError(f"a {cls} part needs its mask to label its slices")
        n = RoiParams().n_slices
        return [cls] * n, [0] * n
    px = [int(v) for v in mask_slices.reshape(mask_slices.shape[0], -1).sum(axis=1)]
    if cls in MASKED:
        return [cls if v >= min_defect_px else "good" for v in px], px
    return [cls] * len(px), px if cls == "ec" else [0] * len(px)


def label_frame(frame: np.ndarray, mask: np.ndarray | None, cls: str, roi_params: RoiParams | None = None,
                min_defect_px: int = 40) -> tuple[list[str], list[int], SliceBatch]:
    """Cut the frame with ``service.roi.extract`` and label its slices from the mask pushed through the
    same geometry. Raises the ROI's NoPartError when the frame is rejected."""
    p = roi_params or RoiParams()
    batch = extract(frame, p)
    mask_slices = batch.frame_to_slices(mask > 0) if mask is not None else None
    labels, px = slice_labels(cls, mask_slices, min_defect_px)
    return labels, px, batch


# ----------------------------------------------------------------------------------- the dataset


def parse_mix(text: str | dict | None) -> dict[str, float]:
    """'good=0.4,dirt=0.2,scratch=0.2,ec=0.2' (or a dict) -> normalised weights over CLASSES, plus the
    novel keys the mix names ("novel" and/or the subtypes dent, stain, chip; see ``class_sequence``)."""
    if text is None:
        return dict(DEFAULT_MIX)
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in filter(None, (s.strip() for s in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--mix: {part!r} is not class=weight (e.g. good=0.4,dirt=0.2,scratch=0.2,ec=0.2)")
            try:
                items.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"--mix: the weight of {name.strip()!r} is not a number: {value!r}") from None
    mix = dict.fromkeys(CLASSES, 0.0)
    for name, weight in items:
        if name not in MIX_KEYS:
            raise ValueError(f"--mix: unknown class {name!r}; the classes are {', '.join(CLASSES)}, and "
                             f"{NOVEL_LABEL} (or its subtypes {', '.join(NOVEL)}) for defects no model trains on")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"--mix: the weight of {name!r} must be a finite number >= 0, got {weight}")
        mix[name] = float(weight)
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("--mix: at least one class needs a weight > 0")
    return {k: v / total for k, v in mix.items()}


def class_sequence(parts: int, seed: int, mix: dict[str, float]) -> list[str]:
    """Exactly round(parts * weight) of each mix key (largest remainders), in a seeded random order.

    Returns what to render per part: a class or a novel subtype. The parts of "novel" are split over the
    subtypes as evenly as possible (which subtypes get one more is seeded), then added to any subtype
    named in the mix. A mix without novel keys gives the sequence it always gave (same counts, same order).
    """
    raw = {c: parts * mix.get(c, 0.0) for c in MIX_KEYS}
    counts = {c: int(math.floor(v)) for c, v in raw.items()}
    rest = parts - sum(counts.values())
    for c in sorted(MIX_KEYS, key=lambda c: (-(raw[c] - counts[c]), MIX_KEYS.index(c)))[:rest]:
        counts[c] += 1
    novel = counts.pop(NOVEL_LABEL)
    extra = set(np.random.default_rng([seed, 0x40E1]).permutation(len(NOVEL))[:novel % len(NOVEL)].tolist())
    for k, sub in enumerate(NOVEL):
        counts[sub] += novel // len(NOVEL) + (k in extra)
    seq = [c for c in (*CLASSES, *NOVEL) for _ in range(counts[c])]
    order = np.random.default_rng([seed, 0x5EC]).permutation(parts)
    return [seq[i] for i in order]


def read_manifest(path: str | Path) -> list[dict]:
    """The rows of a manifest.jsonl (a folder holding one, or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
    return rows


def _prepare_out(out: Path, overwrite: bool) -> None:
    frames, masks = out / FRAMES_DIR, out / MASKS_DIR
    old = sorted(frames.glob("*")) if frames.is_dir() else []
    if (old or (out / MANIFEST).exists()) and not overwrite:
        raise FileExistsError(f"{out} already holds a synthetic dataset ({len(old)} entries in {frames}); "
                              f"pass --overwrite (overwrite=True) or choose an empty folder")
    if overwrite:
        for f in old:
            if f.is_file() and f.name.startswith("part_") and f.suffix == ".png":
                f.unlink()
        for f in (sorted(masks.glob("part_*.png")) if masks.is_dir() else []):
            f.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
        left = sorted(frames.glob("*")) if frames.is_dir() else []
        if left:
            raise FileExistsError(f"{frames} holds other entries ({left[0].name}, ...): the camera emulator would "
                                  f"try to replay them; remove them or choose another folder")
    frames.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)


def write_dataset(out: str | Path, parts: int, seed: int, mix: str | dict | None = None,
                  params: SynthParams | None = None, overwrite: bool = False,
                  progress=None) -> list[dict]:
    """Render ``parts`` frames into ``out`` (frames/, masks/, manifest.jsonl) and return the manifest rows.

    Manifest row (one JSON object per line, in part order):
        file: "frames/part_000000.png" (relative to ``out``); part: index; class: good|dirt|scratch|ec|novel;
        subtype: dent|stain|chip (novel parts only; other rows have no such key); seed: the dataset seed;
        attempt: the render attempt that was kept (see below);
        width, height: the frame size; bbox: [x, y, w, h] of the valve; rect: {cx, cy, length, diameter,
        angle_deg} of the true valve; angle_deg: its rotation (counter-clockwise on screen);
        slice_labels: 8 labels in the ROI's row-major slice order; slice_defect_px: mask pixels per slice;
        mask: "masks/part_000000.png" (dirt, scratch, novel) or null; roi_rect: the rectangle service.roi found;
        roi_threshold, min_defect_px: what the labels were computed with; defects, lighting: render details.

    Part i is rendered from ``np.random.default_rng([seed, i, attempt])``; a dirt, scratch or novel part
    whose defect covers no slice enough to label it (or a frame the ROI rejects, which should not happen) is
    rendered again with the next attempt, so each part of class dirt/scratch/novel has >= 1 such slice.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    p = params or SynthParams()
    weights = parse_mix(mix)
    out = Path(out)
    _prepare_out(out, overwrite)
    digits = max(6, len(str(parts - 1)))
    rows = []
    for i, kind in enumerate(class_sequence(parts, seed, weights)):
        name = f"part_{i:0{digits}d}.png"
        cls = NOVEL_LABEL if kind in NOVEL else kind
        for attempt in range(20):
            frame, mask, info = render_part(np.random.default_rng([seed, i, attempt]), kind, p)
            try:
                labels, px, batch = label_frame(frame, mask if cls in MASKED else None, cls, p.roi,
                                                p.min_defect_px)
            except NoPartError:
                continue
            if cls not in MASKED or cls in labels:
                break
        else:
            raise RuntimeError(f"part {i} ({kind}): 20 renders in a row were rejected by the ROI or had no labelled "
                               f"slice; the SynthParams and RoiParams do not fit together")
        cv2.imwrite(str(out / FRAMES_DIR / name), frame, PNG_FLAGS)
        mask_file = None
        if cls in MASKED:
            mask_file = f"{MASKS_DIR}/{name}"
            cv2.imwrite(str(out / mask_file), mask, PNG_FLAGS)
        head = {"class": cls, "subtype": kind} if cls == NOVEL_LABEL else {"class": cls}
        row = {"file": f"{FRAMES_DIR}/{name}", "part": i, **head, "seed": int(seed), "attempt": attempt,
               "width": p.width, "height": p.height, "bbox": info["bbox"], "rect": info["rect"],
               "angle_deg": info["angle_deg"], "slice_labels": labels, "slice_defect_px": px, "mask": mask_file,
               "roi_rect": batch.rect.to_dict(), "roi_threshold": p.roi.threshold, "min_defect_px": p.min_defect_px,
               "defects": info["defects"], "lighting": info["lighting"]}
        rows.append(row)
        if progress is not None:
            progress(i, row)
    with open(out / MANIFEST, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="valve-inspect synth",
        description="Render synthetic camera frames (Mono8 PNG) of valves with ground truth: OUT/frames/, "
                    "OUT/masks/ (dirt, scratch, novel) and OUT/manifest.jsonl. Replay OUT/frames with the pylon "
                    "camera emulator (PYLON_CAMEMU=1, ImageFilename=OUT/frames).")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--parts", required=True, type=int, help="number of frames (one part each)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default 0); same seed -> same PNGs")
    ap.add_argument("--mix", default=None,
                    help="class weights, default good=0.4,dirt=0.2,scratch=0.2,ec=0.2 (normalised); "
                         f"{NOVEL_LABEL} (split evenly over {', '.join(NOVEL)}) or those subtypes render defects "
                         "no model trains on, e.g. good=0.5,novel=0.5")
    ap.add_argument("--width", type=int, default=2448, help="frame width (default 2448)")
    ap.add_argument("--height", type=int, default=2048, help="frame height (default 2048)")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    try:
        if args.parts < 1:
            raise ValueError(f"--parts must be >= 1, got {args.parts}")
        params = SynthParams(width=args.width, height=args.height)
        t0 = time.perf_counter()

        def progress(i: int, row: dict) -> None:
            if not args.quiet and ((i + 1) % 50 == 0 or i + 1 == args.parts):
                print(f"  {i + 1}/{args.parts} frames", file=sys.stderr)

        rows = write_dataset(args.out, args.parts, args.seed, args.mix, params, args.overwrite, progress)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"valve-inspect synth: {exc}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    shown = CLASSES + ((NOVEL_LABEL,) if any(r["class"] == NOVEL_LABEL for r in rows) else ())
    counts = {c: sum(r["class"] == c for r in rows) for c in shown}
    slices = {c: sum(lab == c for r in rows for lab in r["slice_labels"]) for c in shown}
    print(f"wrote {len(rows)} frames to {args.out / FRAMES_DIR} ({dt / len(rows) * 1000:.0f} ms per part incl. PNG)")
    print("  parts:  " + "  ".join(f"{c}={n}" for c, n in counts.items()))
    print("  slices: " + "  ".join(f"{c}={n}" for c, n in slices.items()))
    if NOVEL_LABEL in shown:
        subtypes = {t: sum(r.get("subtype") == t for r in rows) for t in NOVEL}
        print("  novel:  " + "  ".join(f"{t}={n}" for t, n in subtypes.items())
              + "  (never train on these: they test an unknown-defect score)")
    print(f"  manifest: {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
