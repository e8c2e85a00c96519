"""The score's numbers in float64: the Mahalanobis Gaussians and the variation model of good parts (fit and
reference score; the graph must agree with these), the threshold's calibration, AUROC and the part score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.unknown.frames import PartSlices, UnknownError

#: shrinkage of the tied covariance towards eps * mean variance * I
SHRINKAGE = 0.01


@dataclass
class Gaussians:
    """Class-conditional Gaussians with a tied covariance, per block: the score's constants."""

    blocks: list[int]
    classes: list[str]
    means: list[np.ndarray]       # per block (K, D_b) float64
    whiteners: list[np.ndarray]   # per block (D_b, D_b) float64, W^T W = (S + eps I)^-1

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The float64 reference of the graph's ``unknown`` output from the pooled features (B, D_b) per block."""
        total = 0.0
        for f, mu, w in zip(features, self.means, self.whiteners, strict=True):
            z = np.asarray(f, np.float64) @ w.T                       # (B, D)
            m = mu @ w.T                                              # (K, D)
            d = ((z[:, None, :] - m[None]) ** 2).sum(axis=2).min(axis=1) / mu.shape[1]
            total = total + d
        return np.asarray(total / len(self.means), np.float64)


def fit_gaussians(features: Sequence[np.ndarray], labels: np.ndarray, classes: Sequence[str], blocks: Sequence[int],
                  shrinkage: float = SHRINKAGE) -> Gaussians:
    """Class means and the whitening of the tied covariance of each block's features (rows = slices)."""
    labels = np.asarray(labels)
    present = [c for c in range(len(classes)) if (labels == c).any()]
    missing = [classes[c] for c in range(len(classes)) if c not in present]
    if missing:
        raise UnknownError(f"the fit data has no slice of class(es) {missing}: the score needs every class the "
                           f"model knows. Fix: fit on the model's training side (all classes).")
    means, whiteners = [], []
    for f in features:
        f = np.asarray(f, np.float64)
        mu = np.stack([f[labels == c].mean(axis=0) for c in range(len(classes))])
        centred = f - mu[labels]
        cov = centred.T @ centred / max(1, len(f) - 1)
        cov = cov + shrinkage * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0]) + 1e-9 * np.eye(cov.shape[0])
        chol = np.linalg.cholesky(cov)                                # cov = L L^T
        w = np.linalg.inv(chol)                                       # W = L^-1: W^T W = cov^-1
        means.append(mu)
        whiteners.append(w)
    return Gaussians(list(blocks), list(classes), means, whiteners)


#: the variation model's defaults: 4 x 4 mean pooling (192 -> 48 px per slice), 3 x 3 smoothing of the deviation
VARIATION_FACTOR = 4
VARIATION_SMOOTH = 3
#: the shading removed before the model (Gaussian low-pass sigma, px): part-to-part lighting and pose move the
#: specular band, and the good parts' spread of raw gray values hides a dent or a stain; 0 = raw gray values
VARIATION_HIGHPASS = 12.0
#: how the shading is taken out before the model ("profile" since 2026-11-30, the default; "highpass" shipped before):
#: "profile": log gray values of the pooled slice, minus each row's median, then minus each column's median. The ROI
#:   puts the valve's axis along the rows, so a cylinder's lighting is a profile across it (one level per row) times
#:   the part's gain, plus the ends' falloff along it (one level per column); in log gray values the gain and the
#:   profile are sums, which the medians remove, and a stain or dent covering less than half a row or column of the
#:   slice barely moves either median, so it stays in the residual even where it is as smooth as the lighting.
#: "highpass": the slice minus its Gaussian low-pass (sigma VARIATION_HIGHPASS px), which also removes a smooth stain.
SHADINGS = ("profile", "highpass")
VARIATION_SHADING = "profile"
#: log(pooled gray value + PROFILE_OFFSET): defined at 0 (measured: offsets 1, 8 and 32 flag the same novel parts)
PROFILE_OFFSET = 1.0
#: the position tolerance (pooled px, per direction): each pixel is compared with the good parts' mean and spread at
#: the best-fitting place within +-t pooled px (the valve's pose moves machining lines and the band's edges by a
#: few px; the spread is fitted on residuals aligned the same way); 0 = pixel to pixel
VARIATION_TOLERANCE = 1


def shifted(a: np.ndarray, t: int) -> np.ndarray:
    """(..., h, w) -> (..., (2t+1)^2, h, w): a shifted by every (dy, dx) in [-t, t]^2, edges replicated; t = 0: a
    with one shift axis."""
    if not t:
        return a[..., None, :, :]
    h, w = a.shape[-2:]
    pad = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(t, t), (t, t)], mode="edge")
    return np.stack([pad[..., t + dy:t + dy + h, t + dx:t + dx + w]
                     for dy in range(-t, t + 1) for dx in range(-t, t + 1)], axis=-3)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel OpenCV's GaussianBlur uses for float images at ``sigma`` (ksize = round(8 sigma + 1) | 1)."""
    import cv2

    ksize = int(round(sigma * 8 + 1)) | 1
    return cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F)[:, 0]


def pooled_blur_matrix(n: int, factor: int, sigma: float) -> np.ndarray:
    """(n // factor, n) float64: f-mean pooling after the 1-D Gaussian of ``gaussian_kernel(sigma)`` with reflect-101
    borders, as one matrix: pool(blur(x)) along an axis of length n = this @ x."""
    import cv2

    k = gaussian_kernel(sigma)
    r = len(k) // 2
    if r >= n:
        raise UnknownError(f"high-pass sigma {sigma:g} px: its kernel ({len(k)} taps) is wider than the slice ({n} px). "
                           f"Fix: a smaller --highpass.")
    blur = np.zeros((n, n))
    for i in range(n):
        for j, kj in enumerate(k):
            blur[i, cv2.borderInterpolate(i + j - r, n, cv2.BORDER_REFLECT_101)] += kj
    pool = np.kron(np.eye(n // factor), np.full((1, factor), 1.0 / factor))
    return pool @ blur


def highpass(x: np.ndarray, sigma: float) -> np.ndarray:
    """x - GaussianBlur(x, sigma) per image, reflect-101 borders (float64; x (N, H, W)); sigma 0: x."""
    import cv2

    if not sigma:
        return x
    k = gaussian_kernel(sigma)
    return np.stack([img - cv2.sepFilter2D(img, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT_101)
                     for img in np.asarray(x, np.float64)])


def median(x: np.ndarray, axis: int) -> np.ndarray:
    """np.median along ``axis``, kept as a length-1 axis (even length: the mean of the two middle values, as the
    graph's TopK + Slice + ReduceMean computes it)."""
    return np.median(x, axis=axis, keepdims=True)


def shading_removed(x: np.ndarray, factor: int, shading: str, sigma: float) -> np.ndarray:
    """(N, H, W) gray values -> (N, H/f, W/f) float64: the pooled slices with the shading taken out (see SHADINGS):
    "profile" pools first (f x f means), then log(x + PROFILE_OFFSET) minus the row medians, then minus the
    column medians; "highpass" subtracts the Gaussian low-pass (sigma px; 0 = raw gray values), then pools."""
    x = np.asarray(x, np.float64)
    n, hh, ww = x.shape
    f = factor
    if shading == "profile":
        q = np.log(x.reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4)) + PROFILE_OFFSET)
        q = q - median(q, axis=2)
        return q - median(q, axis=1)
    if shading != "highpass":
        raise UnknownError(f"shading {shading!r}: one of {', '.join(SHADINGS)}")
    return highpass(x, sigma).reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4))


@dataclass
class VariationModel:
    """A variation model of good parts (as machine vision's "variation model" of a golden part): per slice
    position and per (pooled) pixel, the mean gray value of the good slices and their spread.

    score(slice at position s) = max over pixels of box_k( min over shifts |r(x) - mean_s'| / scale_s' )

    (mean_s', scale_s' = std + floor: the model shifted by up to ``tolerance`` pooled px each way, see ``shifted``)

    r: ``shading_removed``, the f x f pooled slice without the shading that lighting and pose move: by
    ``shading`` "profile", log gray values minus the row and column medians; by "highpass", the slice minus its
    Gaussian low-pass (sigma ``highpass`` px; 0 = raw gray values); box_k: the k x k mean over the valid neighbours (as ONNX AveragePool with
    count_include_pad = 0); floor: the median std, so that a pixel with no spread in the good data does not
    divide by ~0. It looks at the pixels, not at the classifier's features: what the classifier never
    learned to see can still be unlike every good part (docs/model.md, "Unknown defects").
    """

    factor: int
    smooth: int
    mean: np.ndarray   # (S, h, w) float64
    scale: np.ndarray  # (S, h, w) float64: std + floor
    floor: float = 0.0
    highpass: float = 0.0
    tolerance: int = 0
    shading: str = "highpass"

    def deviation(self, slices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(N, h, w) smoothed normalised deviation, float64 reference (slices (N, 1, H, W) uint8)."""
        p = shading_removed(np.asarray(slices)[:, 0], self.factor, self.shading, self.highpass)
        t = self.tolerance
        d = (np.abs(p[:, None] - shifted(self.mean, t)[positions]) / shifted(self.scale, t)[positions]).min(axis=1)
        k = self.smooth
        if k > 1:
            r = k // 2
            pad = np.pad(d, ((0, 0), (r, r), (r, r)))
            ones = np.pad(np.ones(d.shape[1:]), r)
            box = sum(pad[:, i:i + d.shape[1], j:j + d.shape[2]] for i in range(k) for j in range(k))
            cnt = sum(ones[i:i + d.shape[1], j:j + d.shape[2]] for i in range(k) for j in range(k))
            d = box / cnt
        return d

    def score(self, slices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.deviation(slices, positions).max(axis=(1, 2))


def fit_variation(parts: PartSlices, factor: int = VARIATION_FACTOR, smooth: int = VARIATION_SMOOTH,
                  highpass_sigma: float = VARIATION_HIGHPASS, tolerance: int = VARIATION_TOLERANCE,
                  shading: str = VARIATION_SHADING) -> VariationModel:
    """Mean and spread per slice position of the slices labelled good (the good parts' and the good slices of
    defect parts). With a ``tolerance``, the spread is the RMS of each good slice's residual to the mean at the
    best-fitting shift (as the score compares), so that pose does not widen it."""
    if shading not in SHADINGS:
        raise UnknownError(f"shading {shading!r}: one of {', '.join(SHADINGS)}")
    n_pos = parts.slices.shape[1]
    size = parts.slices.shape[-1]
    if size % factor:
        raise UnknownError(f"slice size {size} is not a multiple of the pooling factor {factor}")
    good = np.asarray([[lab == "good" for lab in labs] for labs in parts.slice_labels])
    h = size // factor
    mean, std = np.zeros((n_pos, h, h)), np.zeros((n_pos, h, h))
    for s in range(n_pos):
        x = parts.slices[good[:, s], s, 0]
        if len(x) < 10:
            raise UnknownError(f"slice position {s}: {len(x)} good slices in the fit data, the variation model "
                               f"needs >= 10. Fix: fit on more parts.")
        p = shading_removed(x, factor, shading, highpass_sigma)
        mean[s] = p.mean(axis=0)
        if tolerance:
            residual = np.abs(p[:, None] - shifted(mean[s], tolerance)[None]).min(axis=1)
            std[s] = np.sqrt((residual ** 2).mean(axis=0))
        else:
            std[s] = p.std(axis=0)
    floor = float(np.median(std))
    return VariationModel(factor, smooth, mean, std + floor, floor, highpass_sigma if shading == "highpass" else 0.0,
                          tolerance, shading)


def part_max(scores: np.ndarray, n_parts: int) -> np.ndarray:
    return np.asarray(scores, np.float64).reshape(n_parts, -1).max(axis=1)


def calibrate(part_scores: np.ndarray, rate: float) -> float:
    """The smallest threshold that flags at most ``rate`` of these parts (a part: its max slice score).

    >>> calibrate(np.arange(200.0), 0.01)  # 2 of 200 may be flagged: 198 and 199
    197.00000000000003
    """
    s = np.sort(np.asarray(part_scores, np.float64))
    allowed = int(np.floor(rate * len(s)))                   # parts that may be flagged
    # flag score >= t: t just above the (allowed+1)-th largest score
    k = len(s) - allowed - 1
    return float(np.nextafter(s[k], np.inf)) if k >= 0 else float(s[0])


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half (the Mann-Whitney U / (n m))."""
    neg, pos = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    if not len(neg) or not len(pos):
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))
