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


# ---------------------------------------------------------------------------------------------- helpers


def _f(x: float) -> float:
    return round(float(x), 4)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a (cells) grid of normals, upsampled bicubically."""
    grid = rng.standard_normal((max(2, cells[0]), max(2, cells[1]))).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC) / 1.5


def _line_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """1-D noise of unit standard deviation, correlated over ~sigma samples (machining lines)."""
    x = rng.standard_normal((1, n)).astype(np.float32)
    x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)[0]
    return x / max(float(x.std()), 1e-6)


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


# ------------------------------------------------------------------------------------------ the valve


def _shade_valve(rng: np.random.Generator, length: float, diameter: float, pad: int, cls: str):
    """Radiance (may exceed 255: overexposure) and coverage of the valve on a local, axis-aligned canvas."""
    wc, hc = int(math.ceil(length)) + 2 * pad, int(math.ceil(diameter)) + 2 * pad
    px = np.arange(wc, dtype=np.float32) + 0.5 - pad  # continuous position along the axis, 0..length
    py = np.arange(hc, dtype=np.float32) + 0.5 - pad  # across, 0..diameter
    u = (px / length)[None, :]
    t = np.clip((py - diameter / 2) / (diameter / 2), -1.0, 1.0)[:, None]

    # silhouette: a rounded rectangle (chamfered ends), antialiased coverage
    rc = diameter * rng.uniform(0.04, 0.09)
    qx = np.abs(px - length / 2) - (length / 2 - rc)
    qy = np.abs(py - diameter / 2) - (diameter / 2 - rc)
    qx2, qy2 = qx[None, :], qy[:, None]
    sd = np.hypot(np.maximum(qx2, 0), np.maximum(qy2, 0)) + np.minimum(np.maximum(qx2, qy2), 0) - rc
    alpha = np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32)

    # lighting: ambient + diffuse falloff to the rims + parallel light's specular band + side lights
    nz = np.sqrt(np.maximum(1.0 - t * t, 0.0))
    ambient = rng.uniform(62, 80)
    diffuse = rng.uniform(60, 95) * nz ** rng.uniform(0.6, 1.1)
    t0, w0 = rng.uniform(-0.07, 0.07), rng.uniform(0.10, 0.17)
    spec_strength = rng.uniform(95, 175) * (rng.uniform(0.78, 0.95) if cls == "ec" else 1.0)
    along = 1.0 + 0.18 * _smooth_noise(rng, (1, wc), (2, rng.integers(3, 7)))  # local overexposure
    band = spec_strength * np.exp(-(((t - t0) / w0) ** 2)) * along
    ts, ws = rng.uniform(0.5, 0.68), rng.uniform(0.07, 0.12)
    s2 = rng.uniform(25, 60)
    side_bands = s2 * (np.exp(-(((t - ts) / ws) ** 2)) + rng.uniform(0.7, 1.0) * np.exp(-(((t + ts) / ws) ** 2)))
    sig = rng.uniform(0.07, 0.14)
    ends = (rng.uniform(15, 40) * np.exp(-u / sig) + rng.uniform(15, 40) * np.exp(-(1 - u) / sig)) * np.sqrt(nz)
    radiance = rng.uniform(0.93, 1.07) * (ambient + diffuse + band + side_bands + ends)

    # machining texture: circumferential lines (constant along the circumference = vertical lines),
    # axial lines, fine grain, and low-frequency mottling (stains on EC parts)
    circ = rng.uniform(0.012, 0.03) * _line_noise(rng, wc, rng.uniform(0.6, 1.4))[None, :]
    axial = rng.uniform(0.004, 0.012) * _line_noise(rng, hc, rng.uniform(0.8, 2.0))[:, None]
    grain = cv2.GaussianBlur(rng.standard_normal((hc, wc), dtype=np.float32), (0, 0), 0.8)
    grain *= rng.uniform(0.008, 0.018) / max(float(grain.std()), 1e-6)
    mottle_amp = rng.uniform(0.025, 0.06) if cls == "ec" else rng.uniform(0.005, 0.025)
    mottle = mottle_amp * _smooth_noise(rng, (hc, wc), (rng.integers(3, 6), rng.integers(6, 12)))
    radiance = (radiance * (1.0 + circ + axial + grain + mottle)).astype(np.float32)
    lighting = {"ambient": _f(ambient), "specular": _f(spec_strength), "band_width": _f(w0),
                "band_offset": _f(t0), "side_bands": _f(s2)}
    return radiance, alpha, lighting


def _patch(cx: float, cy: float, half: float, shape: tuple[int, int]):
    """Integer window around (cx, cy) clipped to shape, and its pixel-centre coordinates."""
    x0, x1 = max(0, int(cx - half)), min(shape[1], int(math.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(cy - half)), min(shape[0], int(math.ceil(cy + half)) + 1)
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def _add_dirt(rng, radiance, mask, length, diameter, pad) -> list[dict]:
    """Darker irregular blobs: each pulls the surface towards a dark level with a soft, ragged edge."""
    defects = []
    n = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    for _ in range(n):
        r = float(np.exp(rng.uniform(math.log(6.0), math.log(42.0))))
        cx = pad + rng.uniform(r + 6, length - r - 6)
        cy = pad + rng.uniform(min(r + 6, diameter / 2 - 1), max(diameter - r - 6, diameter / 2 + 1))
        opacity, level = rng.uniform(0.5, 0.95), rng.uniform(0.3, 0.75)
        blobs = [(cx, cy, r)]
        for _ in range(int(rng.integers(0, 4))):  # satellites: small specks close to the blob
            d, phi = rng.uniform(1.1, 1.8) * r, rng.uniform(0, 2 * math.pi)
            blobs.append((cx + d * math.cos(phi), cy + d * math.sin(phi), rng.uniform(2.0, max(2.5, 0.25 * r))))
        for bx, by, br in blobs:
            sl, xs, ys = _patch(bx, by, 1.7 * br + 3, radiance.shape)
            if xs.size == 0 or ys.size == 0:
                continue
            rot, aspect = rng.uniform(0, math.pi), rng.uniform(0.55, 1.0)
            dx, dy = xs + 0.5 - bx, ys + 0.5 - by
            rx = dx * math.cos(rot) + dy * math.sin(rot)
            ry = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
            dist, theta = np.hypot(rx, ry) / br, np.arctan2(ry, rx)
            edge = np.ones_like(theta)
            for k in range(2, 6):  # a ragged outline
                edge += rng.uniform(0, 0.16) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
            soft = max(0.8, rng.uniform(0.1, 0.3) * br) / br
            inside = edge - dist
            op = np.clip(inside / soft + 0.5, 0.0, 1.0)
            op *= 1.0 - rng.uniform(0.0, 0.4) * np.clip(dist / edge, 0.0, 1.0) ** 2  # darker towards the core
            tex = rng.uniform(0.0, 0.35)
            op *= 1.0 - tex * (0.5 + 0.5 * _smooth_noise(rng, op.shape, (4, 4)))
            a = (opacity * op).astype(np.float32)
            region = radiance[sl]
            region += (level * np.minimum(region, 255.0) - region) * a
            mask[sl] |= inside >= 0
        defects.append({"type": "dirt", "cx": _f(cx - pad), "cy": _f(cy - pad), "radius": _f(r),
                        "opacity": _f(opacity), "level": _f(level), "satellites": len(blobs) - 1})
    return defects


def _add_scratch(rng, radiance, mask, length, diameter, pad) -> list[dict]:
    """Thin, slightly curved strips whose gray value stays close to the surface's (low contrast)."""
    defects = []
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    m = 10.0
    for _ in range(n):
        ell = rng.uniform(80, 360)
        for _try in range(30):
            p0 = np.array([rng.uniform(m, length - m), rng.uniform(m, diameter - m)])
            psi = rng.uniform(0, math.pi)
            p2 = p0 + ell * np.array([math.cos(psi), math.sin(psi)])
            if m <= p2[0] <= length - m and m <= p2[1] <= diameter - m:
                break
            ell = max(80.0, ell * 0.9)
        else:
            p2 = np.clip(p2, m, [length - m, diameter - m])
        ell = float(np.hypot(*(p2 - p0)))
        normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]]) / max(ell, 1e-6)
        p1 = (p0 + p2) / 2 + normal * ell * rng.uniform(-0.12, 0.12)
        s = np.linspace(0, 1, max(8, int(ell / 2)))[:, None]
        curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2 + pad
        width, contrast = rng.uniform(1.6, 4.5), rng.uniform(0.09, 0.24)
        sign = -1.0 if rng.random() < 0.6 else 1.0
        x0, y0 = np.floor(curve.min(axis=0) - width - 3).astype(int)
        x1, y1 = np.ceil(curve.max(axis=0) + width + 3).astype(int)
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(radiance.shape[1], x1), min(radiance.shape[0], y1)
        line = np.full((y1 - y0, x1 - x0), 255, np.uint8)
        pts = np.round((curve - [x0 + 0.5, y0 + 0.5]) * 16).astype(np.int32)
        cv2.polylines(line, [pts], False, 0, 1, cv2.LINE_8, shift=4)
        dist = cv2.distanceTransform(line, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        prof = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        d_end = np.minimum(np.hypot(xs - curve[0, 0], ys - curve[0, 1]), np.hypot(xs - curve[-1, 0], ys - curve[-1, 1]))
        taper = np.clip(d_end / (0.12 * ell), 0.0, 1.0)
        along = 0.75 + 0.25 * np.clip(0.5 + 0.5 * _smooth_noise(rng, prof.shape, (5, 5)), 0, 1)
        w = (prof * taper * along).astype(np.float32)
        region = radiance[y0:y1, x0:x1]
        base = np.minimum(region, 255.0)
        target = np.where(base >= 248.0, base * (1.0 - contrast), base * (1.0 + sign * contrast))
        region += (target - region) * w
        mask[y0:y1, x0:x1] |= (prof >= 0.5) & (taper >= 0.35)
        defects.append({"type": "scratch", "x0": _f(p0[0]), "y0": _f(p0[1]), "x1": _f(p2[0]), "y1": _f(p2[1]),
                        "length": _f(ell), "width": _f(width), "contrast": _f(sign * contrast)})
    return defects


def _add_pits(rng, radiance, mask, length, diameter, pad, grid: tuple[int, int]) -> list[dict]:
    """Electrochemical corrosion: many small dark pits, spread so that every slice gets its share."""
    cols, rows = grid
    total = float(np.exp(rng.uniform(math.log(170), math.log(900))))
    strength = rng.uniform(0.4, 0.8)
    sigmas = (0.9, 1.3, 1.9)
    probs = np.array([0.4, 0.35, 0.25])
    fields = [np.zeros(radiance.shape, np.float32) for _ in sigmas]
    m, placed = 7.0, 0
    for r in range(rows):
        for c in range(cols):
            k = max(16, int(rng.poisson(total / (rows * cols) * rng.uniform(0.7, 1.3))))
            xs = pad + rng.uniform(max(m, c * length / cols), min(length - m, (c + 1) * length / cols), k)
            ys = pad + rng.uniform(max(m, r * diameter / rows), min(diameter - m, (r + 1) * diameter / rows), k)
            grp = rng.choice(len(sigmas), size=k, p=probs)
            amp = strength * rng.uniform(0.6, 1.0, k)
            for g, sg in enumerate(sigmas):
                sel = grp == g
                np.add.at(fields[g], (ys[sel].astype(int), xs[sel].astype(int)), amp[sel] * 2 * math.pi * sg * sg)
            placed += k
    pit = np.zeros(radiance.shape, np.float32)
    for f, sg in zip(fields, sigmas, strict=True):
        pit += cv2.GaussianBlur(f, (0, 0), sg)
    np.clip(pit, 0.0, 0.9, out=pit)
    radiance += (0.15 * np.minimum(radiance, 255.0) - radiance) * pit
    mask |= pit >= 0.15
    return [{"type": "ec", "pits": placed, "strength": _f(strength)}]


# ------------------------------------------------------------------------- novel defects (never trained on)

#: Radiance above this is clamped inside a novel defect's window before it is modulated, so that a defect in
#: the overexposed band still shows (a dark lobe pulls 280 below 255); 280 itself displays as 255 (noise < 5).
_SAT = 280.0


def _ragged(rng, theta: np.ndarray, harmonics: range, amp: float) -> np.ndarray:
    """An irregular outline: 1 + a few random harmonics of the polar angle, each up to ``amp``."""
    edge = np.ones_like(theta)
    for k in harmonics:
        edge += rng.uniform(0, amp) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return edge


def _add_dent(rng, radiance, mask, length, diameter, pad) -> list[dict]:
    """A smooth local deformation under directional light: the slope of a shallow Gaussian hollow, lit from
    one side, gives a bright crescent on one side and a dark one on the other (a shading dipole)."""
    r = float(np.exp(rng.uniform(math.log(15.0), math.log(60.0))))  # 30-120 px across
    cx = pad + rng.uniform(r + 6, length - r - 6)
    cy = pad + rng.uniform(r + 6, diameter - r - 6)
    rot, aspect = rng.uniform(0, math.pi), rng.uniform(0.6, 1.0)
    light = rng.uniform(0, 2 * math.pi)
    contrast = rng.uniform(0.08, 0.4)
    sl, xs, ys = _patch(cx, cy, 1.6 * r + 3, radiance.shape)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    rx = dx * math.cos(rot) + dy * math.sin(rot)
    ry = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    sigma = r / 2.5
    bump = np.exp(-(rx * rx + ry * ry) / (2 * sigma * sigma))
    # -(grad h . light) of h = -bump, normalised so that the crescents peak at +-1 (at one sigma)
    lx, ly = math.cos(light - rot), math.sin(light - rot) / aspect
    shade = (rx * lx + ry * ly) / sigma * bump / math.exp(-0.5)
    region = radiance[sl]
    np.minimum(region, _SAT, out=region)
    region *= (1.0 + contrast * shade).astype(np.float32)
    mask[sl] |= rx * rx + ry * ry <= r * r
    return [{"type": "dent", "cx": _f(cx - pad), "cy": _f(cy - pad), "radius": _f(r), "aspect": _f(aspect),
             "angle_deg": _f(math.degrees(rot)), "light_deg": _f(math.degrees(light)), "contrast": _f(contrast)}]


def _add_stain(rng, radiance, mask, length, diameter, pad) -> list[dict]:
    """A large diffuse discoloration with an irregular outline and a wide soft edge: either a lighter tint
    (sometimes with a faint darker tide line at its border) or a blotchy texture of its own."""
    r = float(np.exp(rng.uniform(math.log(40.0), math.log(125.0))))  # 80-250 px across
    cx = pad + rng.uniform(0.6 * r, length - 0.6 * r)
    cy = pad + rng.uniform(min(0.5 * r, diameter / 2), max(diameter - 0.5 * r, diameter / 2))
    rot, aspect = rng.uniform(0, math.pi), rng.uniform(0.5, 1.0)
    mode = "tint" if rng.random() < 0.55 else "texture"
    contrast = rng.uniform(0.06, 0.3)
    soft = rng.uniform(0.1, 0.3)
    sl, xs, ys = _patch(cx, cy, 1.45 * r + 3, radiance.shape)
    if xs.size == 0 or ys.size == 0:
        return []
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    rx = dx * math.cos(rot) + dy * math.sin(rot)
    ry = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    dist, theta = np.hypot(rx, ry) / r, np.arctan2(ry, rx)
    shape = (ys.size, xs.size)
    edge = _ragged(rng, theta, range(2, 7), 0.12) + 0.12 * _smooth_noise(rng, shape, (6, 6))
    inside = edge - dist
    cover = np.clip(inside / soft + 0.5, 0.0, 1.0)
    cover = cover * cover * (3 - 2 * cover)  # smoothstep: a diffuse border
    if mode == "tint":
        change = contrast * (0.85 + 0.15 * _smooth_noise(rng, shape, (3, 3))) * cover
        tide = rng.uniform(0.0, 0.6) * contrast if rng.random() < 0.5 else 0.0
        if tide:  # a dried stain's rim: a thin darker line along the outline
            change -= tide * np.exp(-((inside / 0.03) ** 2))
    else:
        cells = (max(2, int(shape[0] / rng.uniform(8, 16))), max(2, int(shape[1] / rng.uniform(8, 16))))
        change = contrast * np.clip(0.3 + _smooth_noise(rng, shape, cells), -1.0, 2.0) * cover
        tide = 0.0
    region = radiance[sl]
    np.minimum(region, _SAT, out=region)
    if mode == "tint":  # a film: it also evens out the machining lines beneath it
        smooth = cv2.GaussianBlur(region, (0, 0), 3.0)
        region -= (region - smooth) * (rng.uniform(0.3, 0.8) * cover).astype(np.float32)
    region *= (1.0 + change).astype(np.float32)
    mask[sl] |= inside >= 0
    return [{"type": "stain", "cx": _f(cx - pad), "cy": _f(cy - pad), "radius": _f(r), "aspect": _f(aspect),
             "angle_deg": _f(math.degrees(rot)), "mode": mode, "contrast": _f(contrast), "tide_line": _f(tide)}]


def _add_chip(rng, radiance, alpha, mask, length, diameter, pad) -> list[dict]:
    """A chipped edge: an angular notch (a polygon of 3-6 fracture facets) cut out of the silhouette at a rim
    (3/4) or an end (1/4), showing the background, with a thin fracture face along its border (a bright
    glint or a dark shadow). Notches stay clear of the corners, so the valve's bounding rectangle (what
    service.roi finds) does not change."""
    side = str(rng.choice(["top", "bottom", "left", "right"], p=[0.375, 0.375, 0.125, 0.125]))
    width = float(np.exp(rng.uniform(math.log(20.0), math.log(80.0))))
    depth = width * rng.uniform(0.3, 0.7)
    along_len = length if side in ("top", "bottom") else diameter
    m = 0.1 * diameter + width / 2 + 8  # clear of the rounded corners
    s = rng.uniform(m, along_len - m)
    # the notch in edge coordinates: u along the edge, v into the valve (v < 0 is background)
    k = int(rng.integers(3, 7))
    phi = np.sort(rng.uniform(0.1, math.pi - 0.1, k))
    rad = rng.uniform(0.65, 1.15, k)
    u = np.concatenate([[-width / 2, -width / 2], -np.cos(phi) * rad * width / 2, [width / 2, width / 2]])
    v = np.concatenate([[-4.0, 0.0], np.sin(phi) * rad * depth, [0.0, -4.0]])
    if side == "top":
        pts = np.stack([pad + s + u, pad + v], axis=1)
    elif side == "bottom":
        pts = np.stack([pad + s + u, pad + diameter - v], axis=1)
    elif side == "left":
        pts = np.stack([pad + v, pad + s + u], axis=1)
    else:
        pts = np.stack([pad + length - v, pad + s + u], axis=1)
    rim_w, rim_bright = rng.uniform(1.5, 4.0), rng.random() < 0.6
    rim_contrast = rng.uniform(0.25, 0.6)
    c = pts.mean(axis=0)
    sl, xs, ys = _patch(float(c[0]), float(c[1]), 0.6 * width + depth + rim_w + 6, radiance.shape)
    x0, y0 = int(xs[0, 0]), int(ys[0, 0])
    ss = 4  # antialiased coverage: fill at 4x, then average
    big = np.zeros((ys.size * ss, xs.size * ss), np.uint8)
    cv2.fillPoly(big, [np.round(((pts - [x0, y0]) * ss - 0.5) * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    notch = cv2.resize(big.astype(np.float32) / 255.0, (xs.size, ys.size), interpolation=cv2.INTER_AREA)
    away = cv2.distanceTransform((notch < 0.5).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    face = np.clip(1.0 - np.abs(away - rim_w / 2) / (rim_w / 2), 0.0, 1.0) * (1.0 - notch)
    valve = alpha[sl] >= 0.5
    region = radiance[sl]
    target = np.minimum(region, 255.0) * (1.0 + rim_contrast if rim_bright else 1.0 - rim_contrast)
    region += ((target - region) * face).astype(np.float32)
    alpha[sl] *= 1.0 - notch
    mask[sl] |= valve & ((notch >= 0.5) | (face >= 0.5))
    cu, cv = {"top": (s, 0.0), "bottom": (s, diameter), "left": (0.0, s), "right": (length, s)}[side]
    return [{"type": "chip", "side": side, "cx": _f(cu), "cy": _f(cv), "width": _f(width), "depth": _f(depth),
             "facets": k + 1, "rim": "bright" if rim_bright else "dark", "rim_contrast": _f(rim_contrast)}]


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
