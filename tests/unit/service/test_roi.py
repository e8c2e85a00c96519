"""service.roi: the paper's ROI (Fig. 6) on synthetic frames, its errors and its geometry."""

import cv2
import numpy as np
import pytest

from service.errors import ImplausibleRegion, NoPartError, NoValveFound, ValveClipped
from service.roi import RoiParams, SliceBatch, assemble, extract, split
from service.sim.synth import Pose, render_part


def _frame(cls="good", seed=0, pose=None):
    frame, mask, info = render_part(np.random.default_rng([123, seed]), cls, pose=pose)
    return frame, mask, info


@pytest.fixture(scope="module")
def rotated():
    pose = Pose(1180.4, 1010.7, 772.0, 386.0, 3.2)
    frame, mask, info = _frame("dirt", 1, pose)
    return frame, mask, pose, extract(frame)


def test_extract_gives_eight_contiguous_row_major_uint8_slices(rotated):
    """extract returns (8, 1, 192, 192) contiguous uint8 slices cut row-major from the 768x384 ROI."""
    _, _, _, batch = rotated
    assert isinstance(batch, SliceBatch)
    assert batch.slices.shape == (8, 1, 192, 192) and batch.slices.dtype == np.uint8
    assert batch.slices.flags.c_contiguous
    assert batch.roi.shape == (384, 768)
    np.testing.assert_array_equal(batch.slices[1, 0], batch.roi[0:192, 192:384])
    np.testing.assert_array_equal(batch.slices[4, 0], batch.roi[192:384, 0:192])
    np.testing.assert_array_equal(batch.slices[7, 0], batch.roi[192:384, 576:768])
    np.testing.assert_array_equal(assemble(batch.slices), batch.roi)
    np.testing.assert_array_equal(split(batch.roi), batch.slices[:, 0])


@pytest.mark.parametrize("angle", [0.0, 2.5, -4.0])
def test_rotated_rectangle_matches_the_rendered_pose(angle):
    """The rotated rectangle found agrees with the valve's true centre, size and rotation."""
    pose = Pose(1300.2, 900.6, 760.0, 380.0, angle)
    frame, _, _ = _frame("ec", 2, pose)
    r = extract(frame).rect
    assert abs(r.cx - pose.cx) < 1.0 and abs(r.cy - pose.cy) < 1.0
    assert abs(r.length - pose.length) < 2.5 and abs(r.diameter - pose.diameter) < 2.5
    assert abs(r.angle_deg - pose.angle_deg) < 0.2


def test_rotation_is_undone_in_the_roi(rotated):
    """The ROI of a rotated valve has the valve's edges horizontal: its top and bottom rows are the rims."""
    _, _, _, batch = rotated
    rows = batch.roi.astype(np.float32).mean(axis=1)
    assert rows[2] > 50 and rows[-3] > 50  # the valve's rim, not background (~10)
    band = batch.roi[2:5, 100:668].astype(np.float32), batch.roi[-5:-2, 100:668].astype(np.float32)
    # a residual rotation would leave a wedge of background along the top or bottom edge
    assert band[0].min() > 35 and band[1].min() > 35


def test_blank_and_dust_only_frames_raise_no_valve_found():
    """A dark frame, or one with only small glints, raises NoValveFound with a message."""
    blank = np.full((2048, 2448), 12, np.uint8)
    with pytest.raises(NoValveFound, match="no valve"):
        extract(blank)
    dusty = blank.copy()
    for x, y in [(100, 100), (2000, 1500), (1200, 300)]:
        cv2.circle(dusty, (x, y), 6, 200, -1)
    with pytest.raises(NoValveFound) as exc:
        extract(dusty)
    assert exc.value.reason == "no_valve"


@pytest.mark.parametrize("cx, cy", [(200.0, 1000.0), (1200.0, 2000.0), (2300.0, 150.0)])
def test_valve_clipped_by_the_border_raises_valve_clipped(cx, cy):
    """A valve running off the frame raises ValveClipped (a NoPartError), never a crash."""
    frame, _, _ = _frame("good", 3, Pose(cx, cy, 770.0, 385.0, 1.0))
    with pytest.raises(ValveClipped, match="clipped") as exc:
        extract(frame)
    assert isinstance(exc.value, NoPartError) and exc.value.reason == "valve_clipped"


def test_implausible_regions_raise_implausible_region():
    """Too short, too long, too rotated, or glare over the whole frame raise ImplausibleRegion."""
    cases = {
        "short": _frame("good", 4, Pose(1200.0, 1000.0, 480.0, 380.0, 0.0))[0],
        "long": _frame("good", 5, Pose(1200.0, 1000.0, 1100.0, 380.0, 0.0))[0],
        "rotated": _frame("good", 6, Pose(1200.0, 1000.0, 770.0, 385.0, 30.0))[0],
        "glare": np.full((2048, 2448), 230, np.uint8),
    }
    blob = np.full((2048, 2448), 10, np.uint8)
    blob[900:1000, 1000:1120] = 180
    cases["small blob"] = blob
    for name, frame in cases.items():
        with pytest.raises(ImplausibleRegion, match="plausible|larger than a valve") as exc:
            extract(frame)
        assert exc.value.reason == "implausible_region", name


@pytest.mark.parametrize("bad", [np.zeros((2048, 2448), np.float32), np.zeros((2048, 2448, 3), np.uint8),
                                 np.zeros((2048, 2448), np.uint16), [[0, 1], [2, 3]]])
def test_wrong_frame_type_raises_value_error_naming_expected_and_got(bad):
    """A frame that is not (H, W) uint8 raises ValueError saying what was expected and what came."""
    with pytest.raises(ValueError, match="expected .*uint8.*got"):
        extract(bad)


def test_params_must_fit_the_slice_grid():
    """RoiParams rejects an ROI that is not cols x rows slices, with a message naming the fix."""
    with pytest.raises(ValueError, match="cols\\*slice_size"):
        RoiParams(roi_width=700)
    RoiParams(roi_width=384, cols=2)  # a consistent grid is fine


def test_roi_to_frame_round_trip(rotated):
    """ROI -> frame -> ROI reproduces an image (smooth and bool), and the ROI drawn back matches the frame."""
    frame, _, _, batch = rotated
    yy, xx = np.mgrid[0:384, 0:768].astype(np.float32)
    smooth = 100 + 50 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    back = batch.frame_to_roi(batch.roi_to_frame(smooth))
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(back[inner] - smooth[inner]).max() < 1.5
    box = np.zeros((384, 768), bool)
    box[100:250, 300:500] = True
    on_frame = batch.roi_to_frame(box)
    assert on_frame.dtype == bool and on_frame.shape == frame.shape
    assert abs(int(on_frame.sum()) - box.sum()) < 0.02 * box.sum()
    again = batch.frame_to_roi(on_frame)
    assert (again & box).sum() / (again | box).sum() > 0.98
    drawn = batch.roi_to_frame(batch.roi)
    valve = batch.roi_to_frame(np.ones((384, 768), bool))
    inside = cv2.erode(valve.view(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert np.abs(drawn[inside].astype(int) - frame[inside].astype(int)).mean() < 4.0


def test_slice_polygons_tile_the_valve_rectangle(rotated):
    """slice_polygons gives each slice's 4 corners in the frame; together they tile the valve's rectangle."""
    _, _, _, batch = rotated
    polys = batch.slice_polygons()
    assert polys.shape == (8, 4, 2) and polys.dtype == np.float32
    corners = batch.rect.corners()
    np.testing.assert_allclose(polys[0, 0], corners[0], atol=1e-3)
    np.testing.assert_allclose(polys[3, 1], corners[1], atol=1e-3)
    np.testing.assert_allclose(polys[7, 2], corners[2], atol=1e-3)
    np.testing.assert_allclose(polys[4, 3], corners[3], atol=1e-3)
    np.testing.assert_allclose(polys[0, 1], polys[1, 0], atol=1e-3)  # neighbours share their edge
    np.testing.assert_allclose(polys[0, 3], polys[4, 0], atol=1e-3)
    area = sum(cv2.contourArea(p) for p in polys)
    assert area == pytest.approx(batch.rect.length * batch.rect.diameter, rel=1e-4)


def test_slices_to_frame_places_a_slice_where_it_was_cut(rotated):
    """A per-slice map drawn with slices_to_frame lands inside that slice's polygon."""
    _, _, _, batch = rotated
    per_slice = np.zeros((8, 192, 192), np.float32)
    per_slice[6, 60:130, 60:130] = 1.0
    on_frame = batch.slices_to_frame(per_slice)
    ys, xs = np.nonzero(on_frame > 0.5)
    centre = (float(xs.mean()), float(ys.mean()))
    assert cv2.pointPolygonTest(batch.slice_polygons()[6], centre, False) > 0
    assert cv2.pointPolygonTest(batch.slice_polygons()[5], centre, False) < 0


def test_roi_to_box_is_the_frame_mapping_cut_to_the_valves_box(rotated):
    """roi_to_box over bounding_box equals roi_to_frame cropped to the same box, and the box holds the valve."""
    _, _, _, batch = rotated
    per_slice = np.random.default_rng(3).random((8, 192, 192)).astype(np.float32)
    box = batch.bounding_box(0.25)
    x0, y0, x1, y1 = box
    corners = batch.rect.corners()
    assert x0 < corners[:, 0].min() and corners[:, 0].max() < x1 and y0 < corners[:, 1].min() < corners[:, 1].max() < y1
    full = batch.slices_to_frame(per_slice)
    cut = batch.roi_to_box(batch.assemble(per_slice), box)
    assert cut.shape == (y1 - y0, x1 - x0)
    diff = np.abs(cut - full[y0:y1, x0:x1])  # OpenCV's warp rounds sub-pixel positions to 1/32 px
    assert diff.max() < 0.05 and diff.mean() < 1e-3
    mask = batch.roi_to_box(batch.assemble(per_slice > 0.5), box, interpolation="nearest")
    assert mask.dtype == bool and mask.shape == cut.shape
    assert batch.bounding_box(100.0) == (0, 0, batch.frame_shape[1], batch.frame_shape[0])  # clipped to the frame
