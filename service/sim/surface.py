"""The valve's surface on its local, axis-aligned canvas (numpy/OpenCV only): the silhouette, the lighting of a
cylinder (ambient, diffuse falloff, the specular band, side bands, bright ends) and the machining texture, plus
the noise primitives the defects (``service.sim.defects``) draw with. ``service.sim.synth`` warps the canvas
into the frame. Everything comes from the caller's ``numpy.random.Generator``, in a fixed order: the frames of
a seed are byte-identical."""

from __future__ import annotations

import math

import cv2
import numpy as np


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
