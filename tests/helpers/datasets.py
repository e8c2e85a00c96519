"""A tiny synthetic dataset in the ``folders`` format, easy to separate, for the model-side tests.

Each class has its own look on a noisy mid-gray background:

    good     background only
    dirt     a dark disc (mask: the disc)
    scratch  a bright straight line (mask: the line)
    ec       coarse horizontal stripes over the whole image (no mask)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("good", "dirt", "scratch", "ec")


def render(cls: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """One (size, size) uint8 image of ``cls`` and its bool mask (None for good and ec)."""
    img = np.clip(rng.normal(128, 10, (size, size)), 0, 255).astype(np.uint8)
    mask = None
    if cls == "dirt":
        m = np.zeros((size, size), np.uint8)
        r = int(rng.integers(size // 8, size // 5 + 1))
        cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
        cv2.circle(m, (cx, cy), r, 1, -1)
        img[m > 0] = rng.integers(20, 50)
        mask = m > 0
    elif cls == "scratch":
        m = np.zeros((size, size), np.uint8)
        p1 = tuple(int(v) for v in rng.integers(0, size // 3, 2))
        p2 = tuple(int(v) for v in rng.integers(2 * size // 3, size, 2))
        if rng.random() < 0.5:
            p1, p2 = (p1[0], size - 1 - p1[1]), (p2[0], size - 1 - p2[1])
        cv2.line(m, p1, p2, 1, max(1, size // 24))
        img[m > 0] = rng.integers(215, 250)
        mask = m > 0
    elif cls == "ec":
        period = max(4, size // 6)
        stripes = ((np.arange(size) // (period // 2)) % 2).astype(np.int16) * 70 - 35
        img = np.clip(img.astype(np.int16) + stripes[:, None], 0, 255).astype(np.uint8)
    elif cls != "good":
        img = np.clip(img.astype(np.int16) + 40, 0, 255).astype(np.uint8)  # any other class: brighter
    return img, mask


def make_folders_dataset(root: Path, classes: tuple[str, ...] = CLASSES, n_per_class: int = 12,
                         size: int = 48, seed: int = 0, masks: bool = True, suffix: str = ".png") -> Path:
    """Write ROOT/<class>/<class>_<i>.png (+ _mask.png for dirt/scratch when ``masks``); return ROOT."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for cls in classes:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, mask = render(cls, size, rng)
            cv2.imwrite(str(d / f"{cls}_{i:03d}{suffix}"), img)
            if masks and mask is not None:
                cv2.imwrite(str(d / f"{cls}_{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
