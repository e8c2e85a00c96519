"""service.segment's refined masks: the saliency says where, the slice's departure from its separable
(row, column) median background says which pixels."""

from __future__ import annotations

import numpy as np
import pytest

from service.segment import background_residual, masks_for, otsu_mask, refined_mask


def surface(seed: int = 0) -> np.ndarray:
    """A 192 x 192 valve-like slice: shading along rows, machining streaks along columns, sensor noise."""
    rng = np.random.default_rng(seed)
    rows = 120 + 60 * np.exp(-((np.arange(192) - 96) / 30.0) ** 2)  # the specular band across the cylinder
    cols = rng.normal(0, 6, 192)  # streaks
    img = rows[:, None] + cols[None, :] + rng.normal(0, 1.5, (192, 192))
    return img


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_background_residual_removes_row_shading_and_column_streaks():
    """The separable median background leaves only the noise of a defect-free surface."""
    r = background_residual(surface())
    assert r.mean() < 2.5 and np.abs(surface() - surface().mean()).mean() > 15


def test_a_thin_scratch_is_delineated_to_its_pixels_while_the_otsu_blob_is_wide():
    """A 2-px line 12 % darker inside a coarse saliency blob: the refined mask follows the line (IoU > 0.7),
    plain Otsu of the blob covers several times the line's area."""
    img = surface()
    truth = np.zeros((192, 192), bool)
    for x in range(40, 160):
        y = 60 + (x - 40) // 2
        truth[y:y + 2, x] = True
    img[truth] *= 0.88
    yy, xx = np.mgrid[0:192, 0:192]
    sal = np.exp(-(((yy - 90) / 35.0) ** 2 + ((xx - 100) / 55.0) ** 2))  # a smooth 24x24-like blob
    u8 = np.clip(img, 0, 255).astype(np.uint8)
    mask = refined_mask(u8, sal)
    blob = otsu_mask(sal)
    assert iou(mask, truth) > 0.7, iou(mask, truth)
    assert blob.sum() > 5 * truth.sum() and iou(blob, truth) < 0.1


def test_a_dark_blob_outside_the_saliency_region_is_not_masked():
    """Only what lies within the (dilated) saliency region can be a defect pixel."""
    img = surface()
    img[20:50, 20:50] -= 60  # dirt far from the map's evidence
    img[120:150, 120:150] -= 60  # dirt where the map points
    sal = np.zeros((192, 192))
    sal[125:145, 125:145] = 1.0
    mask = refined_mask(np.clip(img, 0, 255).astype(np.uint8), sal)
    assert not mask[20:50, 20:50].any()
    assert mask[120:150, 120:150].mean() > 0.9 and mask.sum() < 1.2 * 900


def test_speckles_smaller_than_the_minimum_component_are_dropped():
    """A 3 x 3 speck inside the region is texture, not a defect: min_px removes it."""
    img = np.full((64, 64), 100.0)
    img[30:33, 30:33] = 40
    sal = np.zeros((64, 64))
    sal[20:44, 20:44] = 1.0
    assert refined_mask(img.astype(np.uint8), sal, dilate=1, min_px=20).sum() == 0
    assert refined_mask(img.astype(np.uint8), sal, dilate=1, min_px=0).sum() == 9


def test_refined_needs_the_slices_and_rejects_unknown_methods():
    sal = np.zeros((1, 8, 8))
    with pytest.raises(ValueError, match="needs the slices"):
        masks_for(sal, np.array([1]), np.array([False, True]))
    with pytest.raises(ValueError, match="unknown segmentation method"):
        masks_for(sal, np.array([1]), np.array([False, True]), method="crf")
