"""``models.tiles.refine_ceiling``: the refined masks' IoU when the map is the true mask.

docs/results.md reads the real-data segmentation shortfall against it, so it must give IoU 1 where the
annotation is the dark defect itself, and the defect's share of the annotation where the annotation is
drawn wider than the defect (KolektorSDD's style).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.data import load_samples
from models.tiles import TileSpec, read_tiles_manifest, refine_ceiling, write_tiles


def dataset(root, annotation_halfwidth: int):
    """KolektorSDD layout: kos01 good, kos02/Part0 with a dark crack 6 x 40 px, shorter than half a tile (the refine step's background is a row median); its mask is the crack
    widened by ``annotation_halfwidth`` px each side (0: the crack itself)."""
    rng = np.random.default_rng(3)
    for k, defective in ((1, False), (2, True)):
        d = root / f"kos{k:02d}"
        d.mkdir(parents=True)
        img = (150 + rng.normal(0, 2, (300, 200))).clip(0, 255).astype(np.uint8)
        mask = np.zeros_like(img)
        if defective:
            img[40:46, 20:60] = 40
            mask[40 - annotation_halfwidth:46 + annotation_halfwidth, 20:60] = 255
        cv2.imwrite(str(d / "Part0.png"), img)
        cv2.imwrite(str(d / "Part0_label.png"), mask)
    return root


@pytest.mark.parametrize("halfwidth, expected", [(0, 1.0), (6, 6 / 18)])
def test_the_ceiling_is_the_defect_share_of_its_annotation(tmp_path, halfwidth, expected):
    root = dataset(tmp_path / "kolektorsdd", halfwidth)
    out = tmp_path / "tiles"
    write_tiles(load_samples(root, "kolektorsdd"), out, TileSpec(size=96, stride=96, scale=1.0, labels="mask"))
    c = refine_ceiling(out, read_tiles_manifest(out), dilations=(31,))
    assert c["images"] == 1
    row = c["rows"]["truth/refined, region dilated by a 31 x 31 square"]
    assert row["defect_iou"] == pytest.approx(expected, abs=0.03)
    assert 0.5 < row["miou_paper"] <= 1.0


def test_a_region_not_grown_splits_the_annotation_into_defect_and_background(tmp_path):
    """The annotation 3x the crack's width is the region itself: the step still finds the crack in it."""
    root = dataset(tmp_path / "kolektorsdd", 6)
    out = tmp_path / "tiles"
    write_tiles(load_samples(root, "kolektorsdd"), out, TileSpec(size=96, stride=96, scale=1.0, labels="mask"))
    c = refine_ceiling(out, read_tiles_manifest(out), dilations=(1,))
    assert c["rows"]["truth/refined, region not grown"]["defect_iou"] == pytest.approx(6 / 18, abs=0.03)
