"""The paper's ROI and slicing (Fig. 6), shared by the runtime and the training data.

    frame (H, W) uint8 Mono8
      -> fixed-threshold binarisation (on a frame downscaled by ``detect_scale``), morphological
         closing, the valve = the largest bright region (external contour, so the dark dirt and
         pits inside it are filled and never split it)
      -> refined at full resolution in a window around it: rotated bounding rectangle (cv2.minAreaRect)
      -> plausibility: clipped by the frame border? length, diameter, rotation and fill in range?
      -> the rotated rectangle warped (bilinear) onto a ``roi_width`` x ``roi_height`` ROI (768x384),
         the long side horizontal, so a small rotation of the part is undone
      -> ``cols`` x ``rows`` slices of ``slice_size`` (4 x 2 of 192x192), **row-major**:

            +----+----+----+----+
            | s0 | s1 | s2 | s3 |     slice k covers ROI rows    (k // cols) * 192 ...
            +----+----+----+----+                    ROI columns (k %  cols) * 192 ...
            | s4 | s5 | s6 | s7 |
            +----+----+----+----+

Coordinates are OpenCV pixel coordinates throughout: (x, y), the centre of pixel (i, j) at (j, i).
The ROI's left edge is the valve end with the smaller x in the frame, its top edge the side with
the smaller y, so for the small rotations that occur the ROI looks like the frame, straightened.

A frame that holds no inspectable valve raises a ``NoPartError`` subclass (``NoValveFound``,
``ValveClipped``, ``ImplausibleRegion``) with a message; a frame of the wrong type raises
``ValueError``. Nothing else is raised for a bad frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from service.errors import ImplausibleRegion, NoValveFound, ValveClipped

__all__ = [
    "RoiParams",
    "SliceBatch",
    "ValveRect",
    "assemble",
    "extract",
    "find_valve",
    "geometry_for_rect",
    "split",
]


#: The binarisation threshold's bounds (one definition: [roi] threshold uses them too). Pixels
#: ``> threshold`` are the valve, so 0 would make every non-black pixel the valve and 255 none.
THRESHOLD_MIN, THRESHOLD_MAX = 1, 254


@dataclass(frozen=True)
class RoiParams:
    """Threshold and geometry of the ROI and its slices.

    Args:
        threshold: gray value; pixels ``> threshold`` are the bright valve, the rest background.
        roi_width, roi_height: the normalised ROI (the valve's rotated rectangle is warped onto it).
        cols, rows, slice_size: the slice grid; ``roi_width == cols * slice_size`` and
            ``roi_height == rows * slice_size``.
        length_range, diameter_range: plausible valve length (long side) and diameter (short side)
            in frame pixels; outside them the region is ``ImplausibleRegion``.
        max_angle_deg: the largest plausible rotation of the valve axis against the frame's x axis.
        min_fill: the smallest plausible ratio of the region's area (holes filled) to its rotated
            rectangle's area (a cylinder fills ~0.98; two touching parts or a glare do not).
        min_region_area: bright regions smaller than this (frame pixels) are not a valve at all
            (dust, glints): a frame holding nothing larger is ``NoValveFound``.
        border_margin: a region closer than this to the frame border (frame pixels) is clipped.
        detect_scale: the frame is downscaled by this factor to find the region (speed).
        morph_kernel: side of the square closing kernel on the downscaled binary image.
        refine_kernel: side of the closing kernel at full resolution (0 or 1: none).
        refine_pad: frame pixels added around the coarse region for the full-resolution refinement.
    """

    threshold: int = 40
    roi_width: int = 768
    roi_height: int = 384
    cols: int = 4
    rows: int = 2
    slice_size: int = 192
    length_range: tuple[float, float] = (600.0, 960.0)
    diameter_range: tuple[float, float] = (300.0, 480.0)
    max_angle_deg: float = 15.0
    min_fill: float = 0.85
    min_region_area: int = 5000
    border_margin: int = 2
    detect_scale: int = 4
    morph_kernel: int = 5
    refine_kernel: int = 5
    refine_pad: int = 16

    def __post_init__(self) -> None:
        if not THRESHOLD_MIN <= int(self.threshold) <= THRESHOLD_MAX:
            raise ValueError(f"RoiParams.threshold must be in {THRESHOLD_MIN}..{THRESHOLD_MAX}, got {self.threshold}")
        if self.roi_width != self.cols * self.slice_size or self.roi_height != self.rows * self.slice_size:
            raise ValueError(
                f"RoiParams: the ROI {self.roi_width}x{self.roi_height} must be cols*slice_size x rows*slice_size"
                f" = {self.cols * self.slice_size}x{self.rows * self.slice_size}; fix roi_width/roi_height or the grid"
            )
        for name in ("length_range", "diameter_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo < hi:
                raise ValueError(f"RoiParams.{name} must be (low, high) with 0 < low < high, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.detect_scale < 1 or self.morph_kernel < 1 or self.refine_kernel < 0 or self.border_margin < 0:
            raise ValueError("RoiParams: detect_scale and morph_kernel must be >= 1, refine_kernel and "
                             "border_margin >= 0")
        if not 0 < self.min_fill <= 1:
            raise ValueError(f"RoiParams.min_fill must be in (0, 1], got {self.min_fill}")

    @property
    def n_slices(self) -> int:
        return self.cols * self.rows

    @classmethod
    def from_settings(cls, roi: Any) -> RoiParams:
        """The ROI stage's parameters from the [roi] section (service.config.RoiSettings): the same
        field names, the slice grid from the sizes."""
        names = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in roi.model_dump().items() if k in names}
        values["cols"] = roi.roi_width // roi.slice_size
        values["rows"] = roi.roi_height // roi.slice_size
        return cls(**values)


@dataclass(frozen=True)
class ValveRect:
    """The valve's rotated rectangle in frame pixel coordinates.

    ``cx, cy``: its centre; ``length``: the long side (along the valve axis); ``diameter``: the short
    side; ``angle_deg``: the axis' direction, counter-clockwise on screen from the frame's +x axis
    (the sense of ``cv2.getRotationMatrix2D``), in (-90, 90]. Sizes are the extents of the pixels'
    areas (a region of pixel centres 0..99 is 100 long).
    """

    cx: float
    cy: float
    length: float
    diameter: float
    angle_deg: float

    @property
    def axis(self) -> np.ndarray:
        """Unit vector along the valve axis (ROI +x) in frame coordinates."""
        a = math.radians(self.angle_deg)
        return np.array([math.cos(a), -math.sin(a)])

    @property
    def normal(self) -> np.ndarray:
        """Unit vector across the valve (ROI +y) in frame coordinates."""
        ax, ay = self.axis
        return np.array([-ay, ax])

    def corners(self) -> np.ndarray:
        """(4, 2) float64 corners TL, TR, BR, BL (ROI sense) of the pixel areas, in frame pixel coordinates.

        A corner is where the outer pixel edges meet, half a pixel beyond the outer pixel centres.
        """
        c = np.array([self.cx, self.cy])
        hl, hd = self.axis * self.length / 2, self.normal * self.diameter / 2
        return np.stack([c - hl - hd, c + hl - hd, c + hl + hd, c - hl + hd])

    def to_dict(self) -> dict:
        return {"cx": round(self.cx, 3), "cy": round(self.cy, 3), "length": round(self.length, 3),
                "diameter": round(self.diameter, 3), "angle_deg": round(self.angle_deg, 4)}


def geometry_for_rect(rect: ValveRect, params: RoiParams) -> tuple[np.ndarray, np.ndarray]:
    """The 2x3 affines (ROI -> frame, frame -> ROI) in pixel coordinates for a valve rectangle.

    The ROI's pixel areas tile the rectangle exactly: ROI pixel (u, v) has its centre at
    ``TL + (u + 0.5) * sx * axis + (v + 0.5) * sy * normal`` with ``sx = length / roi_width``.
    """
    sx, sy = rect.length / params.roi_width, rect.diameter / params.roi_height
    a, n = rect.axis, rect.normal
    origin = rect.corners()[0] + 0.5 * sx * a + 0.5 * sy * n  # the centre of ROI pixel (0, 0)
    roi_to_frame = np.array([[a[0] * sx, n[0] * sy, origin[0]], [a[1] * sx, n[1] * sy, origin[1]]])
    return roi_to_frame, cv2.invertAffineTransform(roi_to_frame)


def _interp_flag(interpolation: str) -> int:
    try:
        return {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}") from None


_WARPABLE = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64))


def _warp(image: np.ndarray, matrix_dst_to_src: np.ndarray, size_wh: tuple[int, int], interpolation: str,
          border: int, fill: float) -> np.ndarray:
    """Warp with an affine that maps destination to source pixels; bool images stay bool (majority)."""
    flags = _interp_flag(interpolation) | cv2.WARP_INVERSE_MAP
    src = np.ascontiguousarray(image)
    if src.dtype == bool:
        out = cv2.warpAffine(src.view(np.uint8) * np.uint8(255), matrix_dst_to_src, size_wh, flags=flags,
                             borderMode=border, borderValue=0)
        return out >= 128
    if src.dtype not in _WARPABLE:
        raise ValueError(f"cannot warp an image of dtype {src.dtype}: use bool, uint8, uint16, int16, float32 or float64")
    return cv2.warpAffine(src, matrix_dst_to_src, size_wh, flags=flags, borderMode=border, borderValue=fill)


def split(roi_image: np.ndarray, params: RoiParams | None = None) -> np.ndarray:
    """(roi_height, roi_width, ...) -> (n_slices, slice_size, slice_size, ...) row-major, contiguous copy."""
    p = params or RoiParams()
    if roi_image.shape[:2] != (p.roi_height, p.roi_width):
        raise ValueError(f"split expects an ROI image of shape ({p.roi_height}, {p.roi_width}, ...), "
                         f"got {roi_image.shape}")
    s, rest = p.slice_size, roi_image.shape[2:]
    blocks = roi_image.reshape(p.rows, s, p.cols, s, *rest).swapaxes(1, 2)
    return np.ascontiguousarray(blocks.reshape(p.n_slices, s, s, *rest))


def assemble(per_slice: np.ndarray, params: RoiParams | None = None) -> np.ndarray:
    """(n_slices, slice_size, slice_size, ...) or (n_slices, 1, S, S) -> (roi_height, roi_width, ...);
    the inverse of ``split``."""
    p = params or RoiParams()
    x = np.asarray(per_slice)
    s = p.slice_size
    if x.ndim == 4 and x.shape[:2] == (p.n_slices, 1) and x.shape[2:] == (s, s):
        x = x[:, 0]
    if x.shape[:3] != (p.n_slices, s, s):
        raise ValueError(f"assemble expects ({p.n_slices}, {s}, {s}, ...) or ({p.n_slices}, 1, {s}, {s}), "
                         f"got {x.shape}")
    rest = x.shape[3:]
    grid = x.reshape(p.rows, p.cols, s, s, *rest).swapaxes(1, 2)
    return np.ascontiguousarray(grid.reshape(p.roi_height, p.roi_width, *rest))


@dataclass(frozen=True, eq=False)
class SliceBatch:
    """The slices of one frame and the geometry to map results back onto it.

    Attributes:
        slices: (n_slices, 1, S, S) uint8, C-contiguous, row-major slice order (see the module doc).
        roi: (roi_height, roi_width) uint8, the normalised ROI the slices were cut from.
        rect: the valve's rotated rectangle in the frame.
        roi_to_frame_affine: 2x3 float64, ROI pixel -> frame pixel.
        frame_to_roi_affine: 2x3 float64, frame pixel -> ROI pixel.
        frame_shape: (H, W) of the frame.
        region_area: area of the bright region (holes filled), frame pixels.
        params: the RoiParams used.
    """

    slices: np.ndarray
    roi: np.ndarray
    rect: ValveRect
    roi_to_frame_affine: np.ndarray
    frame_to_roi_affine: np.ndarray
    frame_shape: tuple[int, int]
    region_area: float
    params: RoiParams = field(default_factory=RoiParams)

    def __len__(self) -> int:
        return self.slices.shape[0]

    def roi_to_frame(self, image_roi: np.ndarray, interpolation: str = "linear", fill: float = 0) -> np.ndarray:
        """An ROI-sized image (roi_height, roi_width[, C]) -> a frame-sized image, ``fill`` outside the ROI.

        For drawing masks and saliency onto the full frame. bool stays bool.
        """
        p = self.params
        if image_roi.shape[:2] != (p.roi_height, p.roi_width):
            raise ValueError(f"roi_to_frame expects shape ({p.roi_height}, {p.roi_width}[, C]), got {image_roi.shape}")
        h, w = self.frame_shape
        return _warp(image_roi, self.frame_to_roi_affine, (w, h), interpolation, cv2.BORDER_CONSTANT, fill)

    def bounding_box(self, margin: float = 0.0) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive: the axis-aligned frame rectangle around the valve, grown on every
        side by ``margin`` x its diameter and clipped to the frame (the crop of an ROI overlay)."""
        pad = margin * self.rect.diameter
        c = self.rect.corners()
        h, w = self.frame_shape
        x0, y0 = (max(0, int(np.floor(v - pad))) for v in c.min(axis=0))
        x1, y1 = min(w, int(np.ceil(c[:, 0].max() + pad)) + 1), min(h, int(np.ceil(c[:, 1].max() + pad)) + 1)
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def roi_to_box(self, image_roi: np.ndarray, box: tuple[int, int, int, int], interpolation: str = "linear",
                   fill: float = 0) -> np.ndarray:
        """Like ``roi_to_frame``, but only the frame's rectangle ``box`` (x0, y0, x1, y1) is rendered:
        (y1 - y0, x1 - x0[, C]), pixel (0, 0) = frame pixel (x0, y0). bool stays bool."""
        p = self.params
        if image_roi.shape[:2] != (p.roi_height, p.roi_width):
            raise ValueError(f"roi_to_box expects shape ({p.roi_height}, {p.roi_width}[, C]), got {image_roi.shape}")
        x0, y0, x1, y1 = box
        m = self.frame_to_roi_affine.copy()
        m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)  # box pixel -> frame pixel -> ROI pixel
        return _warp(image_roi, m, (x1 - x0, y1 - y0), interpolation, cv2.BORDER_CONSTANT, fill)

    def frame_to_roi(self, image_frame: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """A frame-sized image (e.g. a ground-truth mask) -> (roi_height, roi_width) through the same geometry."""
        if image_frame.shape[:2] != self.frame_shape:
            raise ValueError(f"frame_to_roi expects a frame of shape {self.frame_shape}, got {image_frame.shape[:2]}")
        p = self.params
        return _warp(image_frame, self.roi_to_frame_affine, (p.roi_width, p.roi_height), interpolation,
                     cv2.BORDER_REPLICATE, 0)

    def slices_to_frame(self, per_slice: np.ndarray, interpolation: str = "linear", fill: float = 0) -> np.ndarray:
        """(n_slices, S, S) per-slice maps (masks, saliency) -> a frame-sized image."""
        return self.roi_to_frame(assemble(per_slice, self.params), interpolation, fill)

    def frame_to_slices(self, image_frame: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """A frame-sized image -> (n_slices, S, S), cut exactly like the slices."""
        return split(self.frame_to_roi(image_frame, interpolation), self.params)

    def assemble(self, per_slice: np.ndarray) -> np.ndarray:
        """(n_slices, S, S[, ...]) -> (roi_height, roi_width[, ...])."""
        return assemble(per_slice, self.params)

    def split(self, roi_image: np.ndarray) -> np.ndarray:
        """(roi_height, roi_width[, ...]) -> (n_slices, S, S[, ...])."""
        return split(roi_image, self.params)

    def roi_points_to_frame(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) ROI pixel coordinates (x, y) -> (N, 2) frame pixel coordinates."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return pts @ self.roi_to_frame_affine[:, :2].T + self.roi_to_frame_affine[:, 2]

    def frame_points_to_roi(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) frame pixel coordinates (x, y) -> (N, 2) ROI pixel coordinates."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return pts @ self.frame_to_roi_affine[:, :2].T + self.frame_to_roi_affine[:, 2]

    def slice_polygons(self) -> np.ndarray:
        """(n_slices, 4, 2) float32: each slice's outer corners TL, TR, BR, BL in frame pixel coordinates,
        row-major slice order; ``cv2.polylines(img, [np.round(p).astype(np.int32) for p in polys], True, ...)``."""
        p, s = self.params, self.params.slice_size
        out = np.empty((p.n_slices, 4, 2), dtype=np.float32)
        for k in range(p.n_slices):
            r, c = divmod(k, p.cols)
            x0, y0 = c * s - 0.5, r * s - 0.5  # the pixel edges, not centres
            corners = np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]])
            out[k] = self.roi_points_to_frame(corners)
        return out


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"expected the frame as a (H, W) uint8 numpy array (Mono8), got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 frame (Mono8), got dtype {frame.dtype} shape {frame.shape}; "
                         "convert the camera's pixel format to Mono8")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise ValueError(f"expected a camera frame, got a tiny image of shape {frame.shape}")
    return frame if frame.flags.c_contiguous else np.ascontiguousarray(frame)


def _largest_contour(binary: np.ndarray) -> tuple[np.ndarray | None, float]:
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None, 0.0
    areas = [cv2.contourArea(c) + 0.5 * cv2.arcLength(c, True) + 1.0 for c in contours]  # pixel areas, not centres
    i = int(np.argmax(areas))
    return contours[i], float(areas[i])


def _rect_from_points(points: np.ndarray) -> ValveRect:
    """minAreaRect on pixel centres -> ValveRect with the long side as length and the angle in (-90, 90]."""
    (cx, cy), (w, h), _ = cv2.minAreaRect(points)
    box = cv2.boxPoints(((cx, cy), (w, h), _))
    # the edge from box[0] to box[1] and the one from box[1] to box[2]; the longer one is the axis
    e1, e2 = box[1] - box[0], box[2] - box[1]
    axis = e1 if np.hypot(*e1) >= np.hypot(*e2) else e2
    length, diameter = max(w, h), min(w, h)
    if axis[0] < 0 or (axis[0] == 0 and axis[1] > 0):
        axis = -axis
    angle = -math.degrees(math.atan2(float(axis[1]), float(axis[0])))
    if angle <= -90.0:
        angle += 180.0
    # +1: minAreaRect spans the outer pixel centres; the pixels' areas reach half a pixel further
    return ValveRect(float(cx), float(cy), float(length) + 1.0, float(diameter) + 1.0, angle)


def find_valve(frame: np.ndarray, params: RoiParams | None = None) -> tuple[ValveRect, float]:
    """The valve's rotated rectangle and region area in a Mono8 frame; raises NoPartError subclasses."""
    p = params or RoiParams()
    frame = _check_frame(frame)
    h, w = frame.shape
    s = max(1, int(p.detect_scale))
    hs, ws = max(1, h // s), max(1, w // s)
    small = cv2.resize(frame, (ws, hs), interpolation=cv2.INTER_AREA) if s > 1 else frame
    _, binary = cv2.threshold(small, p.threshold, 255, cv2.THRESH_BINARY)
    if p.morph_kernel > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (p.morph_kernel, p.morph_kernel))
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    contour, area_small = _largest_contour(binary)
    area = area_small * (w / ws) * (h / hs)
    if contour is None or area < p.min_region_area:
        got = "no pixel is" if contour is None else f"the largest bright region is only ~{area:.0f} px"
        raise NoValveFound(
            f"no valve in the frame: {got} brighter than the threshold {p.threshold} "
            f"(a valve needs >= {p.min_region_area} px). Is a part in front of the camera, the light on and "
            f"the exposure right? Otherwise lower RoiParams.threshold (roi threshold in the config)")
    bx, by, bw, bh = cv2.boundingRect(contour)
    fx, fy = w / ws, h / hs
    x0, y0, x1, y1 = bx * fx, by * fy, (bx + bw) * fx, (by + bh) * fy
    max_len = p.length_range[1]
    margin_s = max(1, int(math.ceil(p.border_margin / s)))
    touches = bx < margin_s or by < margin_s or bx + bw > ws - margin_s or by + bh > hs - margin_s
    if touches:
        if max(x1 - x0, y1 - y0) > 1.15 * max_len and min(x1 - x0, y1 - y0) > 1.15 * p.diameter_range[1]:
            raise ImplausibleRegion(
                f"the bright region spans {x1 - x0:.0f}x{y1 - y0:.0f} px and runs into the frame border: far larger "
                f"than a valve (length at most {max_len:.0f} px). Glare or stray light? Check the lighting, the "
                f"exposure and RoiParams.threshold ({p.threshold})")
        raise ValveClipped(
            f"the valve is clipped by the frame border (its region spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}"
            f" in a {w}x{h} frame, margin {p.border_margin} px): the part is not fully in view. Check the trigger "
            f"timing/position of the part, or the camera's ROI/offset")

    # refine at full resolution in a window around the coarse region
    pad = p.refine_pad + s
    wx0, wy0 = max(0, int(x0) - pad), max(0, int(y0) - pad)
    wx1, wy1 = min(w, int(math.ceil(x1)) + pad), min(h, int(math.ceil(y1)) + pad)
    _, fine = cv2.threshold(frame[wy0:wy1, wx0:wx1], p.threshold, 255, cv2.THRESH_BINARY)
    if p.refine_kernel > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (p.refine_kernel, p.refine_kernel))
        fine = cv2.morphologyEx(fine, cv2.MORPH_CLOSE, kernel)
    contour_f, area_f = _largest_contour(fine)
    if contour_f is None:  # cannot happen when the coarse stage found a region; kept for safety
        raise NoValveFound(f"no valve in the frame: the region found at 1/{s} scale vanished at full resolution "
                           f"(threshold {p.threshold}); lower RoiParams.threshold or detect_scale")
    fbx, fby, fbw, fbh = cv2.boundingRect(contour_f)
    gx0, gy0, gx1, gy1 = fbx + wx0, fby + wy0, fbx + fbw + wx0, fby + fbh + wy0
    m = p.border_margin
    if gx0 < m or gy0 < m or gx1 > w - m or gy1 > h - m:
        raise ValveClipped(
            f"the valve is clipped by the frame border (its region spans x {gx0}..{gx1}, y {gy0}..{gy1} in a "
            f"{w}x{h} frame, margin {m} px): the part is not fully in view. Check the trigger timing/position")
    pts = contour_f.reshape(-1, 2).astype(np.float32) + np.array([wx0, wy0], dtype=np.float32)
    rect = _rect_from_points(pts)
    _check_plausible(rect, area_f, p)
    return rect, area_f


def _check_plausible(rect: ValveRect, area: float, p: RoiParams) -> None:
    problems = []
    lo, hi = p.length_range
    if not lo <= rect.length <= hi:
        problems.append(f"length {rect.length:.0f} px not in {lo:.0f}..{hi:.0f}")
    lo, hi = p.diameter_range
    if not lo <= rect.diameter <= hi:
        problems.append(f"diameter {rect.diameter:.0f} px not in {lo:.0f}..{hi:.0f}")
    if abs(rect.angle_deg) > p.max_angle_deg:
        problems.append(f"rotation {rect.angle_deg:.1f} deg beyond +-{p.max_angle_deg:g}")
    fill = area / max(rect.length * rect.diameter, 1.0)
    if fill < p.min_fill:
        problems.append(f"the region fills only {fill:.2f} of its rotated rectangle (min {p.min_fill:g})")
    if problems:
        raise ImplausibleRegion(
            f"the bright region at ({rect.cx:.0f}, {rect.cy:.0f}) is not a plausible valve: " + "; ".join(problems)
            + ". A different part, two parts, glare, or a wrong threshold? Check the part and lighting, or adjust "
              "RoiParams (length_range, diameter_range, max_angle_deg, min_fill, threshold)")


def extract(frame: np.ndarray, params: RoiParams | None = None) -> SliceBatch:
    """Find the valve in a Mono8 frame and cut its normalised ROI into slices.

    Args:
        frame: (H, W) uint8, as the camera delivers it (e.g. 2048x2448).
        params: threshold and geometry (default ``RoiParams()``).
    Returns:
        SliceBatch with ``slices`` (n_slices, 1, S, S) uint8 in row-major order and the geometry.
    Raises:
        NoValveFound, ValveClipped, ImplausibleRegion: the frame holds no inspectable valve.
        ValueError: ``frame`` is not a (H, W) uint8 array.
    """
    p = params or RoiParams()
    frame = _check_frame(frame)
    rect, area = find_valve(frame, p)
    roi_to_frame, frame_to_roi = geometry_for_rect(rect, p)
    roi = cv2.warpAffine(frame, roi_to_frame, (p.roi_width, p.roi_height),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    slices = split(roi, p)[:, None]
    return SliceBatch(slices=slices, roi=roi, rect=rect, roi_to_frame_affine=roi_to_frame,
                      frame_to_roi_affine=frame_to_roi, frame_shape=frame.shape, region_area=area, params=p)
