"""Fixtures shared by the models' tests: a made-up Magnetic-tile layout and a tiny realdata protocol."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.experiments import realdata

CLASSES = {"MT_Free": 16, "MT_Blowhole": 6, "MT_Break": 6, "MT_Crack": 6, "MT_Fray": 6, "MT_Uneven": 6}


@pytest.fixture
def mt_like(tmp_path):
    """Magnetic-tile's layout, 192 x 192 images (one tile each): textured gray tiles; each defect class a dark
    mark of its own shape; fray (the class held out below) a saturated white disc no other image has."""
    root = tmp_path / "data" / "magnetic-tile"
    rng = np.random.default_rng(7)
    for folder, n in CLASSES.items():
        d = root / folder
        d.mkdir(parents=True)
        for i in range(n):
            img = cv2.GaussianBlur(rng.normal(120, 25, (192, 192)).clip(0, 255).astype(np.uint8), (5, 5), 0)
            mask = np.zeros((192, 192), np.uint8)
            y, x = rng.integers(40, 150, 2)
            if folder == "MT_Blowhole":
                cv2.circle(mask, (int(x), int(y)), 12, 255, -1)
            elif folder == "MT_Break":
                mask[:30, :] = 255
            elif folder == "MT_Crack":
                cv2.line(mask, (20, int(y)), (170, int(y) + 10), 255, 3)
            elif folder == "MT_Uneven":
                mask[60:140, 60:140] = 255
            elif folder == "MT_Fray":
                cv2.circle(mask, (int(x), int(y)), 30, 255, -1)
            if folder == "MT_Fray":
                img[mask > 0] = 255
            elif folder != "MT_Free":
                img[mask > 0] = (img[mask > 0] * 0.3).astype(np.uint8)
            cv2.imwrite(str(d / f"exp{i}_num_{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(d / f"exp{i}_num_{i}.png"), mask)
    return root


@pytest.fixture
def tiny_protocol(monkeypatch):
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "tiles", {"size": 192, "stride": 96, "scale": 1.0})
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train",
                        {"preset": "compact", "attention": "iam", "epochs": 1, "batch_size": 8, "epoch_size": 32})
