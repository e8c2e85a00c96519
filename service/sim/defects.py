"""The defects drawn on the valve's local canvas (``service.sim.surface``), one renderer per type: the trained
classes dirt, scratch and ec (pits), and the novel types dent, stain and chip that no model trains on
(``service.sim.synth``'s docstring describes each; ``render_part`` calls them). Each renderer changes the
radiance (and a chip the coverage) in place, sets the defect's pixels in ``mask`` and returns the manifest's
defect records; its draws from ``rng`` are in a fixed order, so a seed renders byte-identical frames."""

from __future__ import annotations

import math

import cv2
import numpy as np

from service.sim.surface import _f, _smooth_noise


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
