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


# ----------------------------------------------------------------- pinned by mutation testing (docs/testing.md)


def test_maps_outside_0_1_are_clipped_not_wrapped():
    """A map overshooting [0, 1] (to -0.1 or 1.5) is clipped before Otsu: the overshoot stays fore- or background."""
    sal = np.zeros((32, 32))
    sal[0:8, 0:8] = 1.5  # would wrap to 126 of 255
    sal[10:18, 10:18] = 0.8
    sal[20:32, :] = 0.3
    sal[18:20, 0:8] = -0.1  # would wrap to 230
    mask = otsu_mask(sal)
    np.testing.assert_array_equal(mask, otsu_mask(np.clip(sal, 0, 1)))
    assert mask[0:8, 0:8].all() and mask[10:18, 10:18].all() and mask.sum() == 128


def test_empty_masks_are_bool():
    """The empty masks (a flat map; a region with no residual contrast) are bool like every other mask."""
    assert otsu_mask(np.zeros((8, 8))).dtype == bool
    sal = np.zeros((32, 32))
    sal[8:16, 8:16] = 1.0
    flat = refined_mask(np.full((32, 32), 100, np.uint8), sal)
    assert flat.dtype == bool and not flat.any()
    assert background_residual(np.full((4, 4), 7, np.uint8)).dtype == np.float32


def test_a_one_grey_level_defect_is_still_delineated():
    """Any residual contrast in the region counts: a defect one grey level off a flat slice is masked."""
    img = np.full((64, 64), 100, np.uint8)
    img[30:36, 30:36] = 101
    sal = np.zeros((64, 64))
    sal[24:40, 24:40] = 1.0
    mask = refined_mask(img, sal, dilate=1)
    assert mask[30:36, 30:36].all() and mask.sum() == 36


def test_a_component_of_exactly_min_px_is_kept_and_min_px_2_drops_single_pixels():
    """Components of min_px pixels or more stay; with min_px = 2 a lone pixel is dropped."""
    img = np.full((64, 64), 100, np.uint8)
    img[30:34, 30:35] = 40  # 20 px
    img[40, 40] = 40  # 1 px
    sal = np.zeros((64, 64))
    sal[20:50, 20:50] = 1.0
    assert refined_mask(img, sal, dilate=1, min_px=20).sum() == 20
    assert refined_mask(img, sal, dilate=1, min_px=2).sum() == 20
    assert refined_mask(img, sal, dilate=1, min_px=1).sum() == 21


def test_errors_name_the_shapes_and_the_choices():
    """refined_mask names both shapes; masks_for names the methods to choose from and what refined needs."""
    with pytest.raises(ValueError, match=r"^refined_mask: image \(4, 4\) and saliency \(4, 5\) differ$"):
        refined_mask(np.zeros((4, 4), np.uint8), np.zeros((4, 5)))
    sal = np.zeros((1, 8, 8))
    with pytest.raises(ValueError, match=r"^masks_for\(method='refined'\) needs the slices the maps belong to$"):
        masks_for(sal, np.array([1]), np.array([False, True]))
    with pytest.raises(ValueError, match=r"^unknown segmentation method 'crf': choose one of refined, otsu$"):
        masks_for(sal, np.array([1]), np.array([False, True]), method="crf")


def test_a_two_pixel_dilation_already_grows_the_region():
    """dilate = 2 grows the saliency region by a pixel: enough background comes in for the defect to stand out."""
    img = np.full((64, 64), 100, np.uint8)
    img[30:36, 30:36] = 40
    sal = np.zeros((64, 64))
    sal[31:36, 31:36] = 1.0  # inside the defect: no contrast without dilation
    assert refined_mask(img, sal, dilate=1, min_px=1).sum() == 0
    assert refined_mask(img, sal, dilate=2, min_px=1).sum() == 25


def _otsu_numpy(u8: np.ndarray) -> int:
    """Otsu's threshold of 8-bit values, written from the definition (maximise the between-class variance
    w0 w1 (mu0 - mu1)^2 over t; class 0 is <= t): no OpenCV."""
    hist = np.bincount(u8.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256)
    best_t, best = 0, -1.0
    for t in range(256):
        w0, w1 = p[:t + 1].sum(), p[t + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (levels[:t + 1] * p[:t + 1]).sum() / w0
        mu1 = (levels[t + 1:] * p[t + 1:]).sum() / w1
        var = w0 * w1 * (mu0 - mu1) ** 2
        if var > best + 1e-12:
            best_t, best = t, var
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_methods_cut_exactly_where_an_independent_otsu_does(seed):
    """otsu: the map scaled to 0..255 and cut by Otsu's threshold; refined: inside the dilated region, the
    residual scaled to 0..255 over the region and cut at lo + t/255 (hi - lo). Both are compared pixel for
    pixel with a from-the-definition Otsu (a cut moved by a fraction of a grey level flips pixels here)."""
    rng = np.random.default_rng(seed)
    img = surface(seed)
    img[70:110, 60:120] -= rng.uniform(8, 20)                       # a dark defect
    yy, xx = np.mgrid[0:192, 0:192]
    sal = np.exp(-(((yy - 90) / 30.0) ** 2 + ((xx - 90) / 40.0) ** 2)) + rng.uniform(0, 0.02, (192, 192))
    sal = (sal - sal.min()) / (sal.max() - sal.min())
    u8 = np.clip(np.rint(sal * 255.0), 0, 255).astype(np.uint8)
    region = u8 > _otsu_numpy(u8)
    np.testing.assert_array_equal(otsu_mask(sal), region)

    import cv2

    grown = cv2.dilate(region.astype(np.uint8), np.ones((31, 31), np.uint8)) > 0
    r = background_residual(img)
    vals = r[grown].astype(np.float64)
    lo, hi = vals.min(), vals.max()
    q = np.clip(np.rint((vals - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    want = grown & (r > lo + (_otsu_numpy(q) / 255.0) * (hi - lo))
    got = refined_mask(img, sal, min_px=1)
    np.testing.assert_array_equal(got, want)
    assert 50 < want.sum() < grown.sum()  # a real cut: neither empty nor the whole region


def test_a_flat_residual_gives_no_mask_and_an_offset_residual_is_scaled_from_its_minimum():
    """A checkerboard whose residual is the same everywhere (> 0) gives an empty mask; with a defect on it,
    the residual inside the region starts well above 0 (lo > 0), and the cut still matches the independent
    Otsu scaled from lo to hi (a formula using hi + lo instead of hi - lo would cut elsewhere)."""
    import cv2

    yy, xx = np.mgrid[0:192, 0:192]
    board = 100.0 + 10.0 * np.where((yy + xx) % 2 == 0, 1.0, -1.0)
    sal = np.exp(-(((yy - 96) / 30.0) ** 2 + ((xx - 96) / 30.0) ** 2))
    assert np.ptp(background_residual(board)) < 1e-6 and background_residual(board).min() > 5
    assert not refined_mask(board, sal, min_px=1).any()
    rng = np.random.default_rng(7)
    img = board.copy()
    img[80:110, 80:110] += np.where((yy[80:110, 80:110] + xx[80:110, 80:110]) % 2 == 0, 1.0, -1.0) * \
        rng.uniform(1, 40, (30, 30))
    u8 = np.clip(np.rint(sal * 255.0), 0, 255).astype(np.uint8)
    grown = cv2.dilate((u8 > _otsu_numpy(u8)).astype(np.uint8), np.ones((31, 31), np.uint8)) > 0
    r = background_residual(img)
    vals = r[grown].astype(np.float64)
    lo, hi = vals.min(), vals.max()
    assert lo > 5  # the offset the formula must subtract
    q = np.clip(np.rint((vals - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    want = grown & (r > lo + (_otsu_numpy(q) / 255.0) * (hi - lo))
    np.testing.assert_array_equal(refined_mask(img, sal, min_px=1), want)
    assert 0 < want.sum() < 900


def test_a_map_one_grey_level_above_zero_is_cut_between_0_and_1():
    """Grey levels 0 and 1 are two levels: a map that is 0 except for a patch at 1/255 (one 8-bit level up)
    has a single possible Otsu cut, between 0 and 1, so the mask is exactly the patch. Clipping the quantised
    map from 1 instead of 0 would merge the two levels into a flat map and mask nothing."""
    sal = np.zeros((16, 16))
    sal[4:8, 4:12] = 1 / 255
    mask = otsu_mask(sal)
    assert mask[4:8, 4:12].all() and mask.sum() == 32


@pytest.mark.parametrize(("d", "masked"), [(5e-7, False), (1e-4, True)])
def test_a_residual_spread_within_1e_6_is_flat_even_far_from_0(d, masked):
    """The flatness test is on the residual's spread hi - lo, whatever its level: a 0.25 / 0.75 checkerboard
    (rows' medians 0.5, columns' medians 0: the residual is 0.25 everywhere) with d added to some of its 0.75
    cells has the residual 0.25 + d there. d = 5e-7 (within 1e-6: float noise) gives no mask although the
    residual is 0.25 > 0; d = 1e-4 is contrast, and the mask is exactly those cells."""
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.where((yy + xx) % 2 == 0, 0.75, 0.25)
    bumped = np.zeros((32, 32), bool)
    bumped[12:20, 12:20] = (yy[12:20, 12:20] + xx[12:20, 12:20]) % 2 == 0  # 4 of a row's (column's) 16 0.75s
    img[bumped] += d
    sal = np.zeros((32, 32))
    sal[8:24, 8:24] = 1.0
    r = background_residual(img)
    assert r.min() == np.float32(0.25) and 0 < r.max() - r.min() < 2 * d
    mask = refined_mask(img, sal, dilate=1, min_px=1)
    if masked:
        np.testing.assert_array_equal(mask, bumped)
    else:
        assert not mask.any()
