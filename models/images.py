"""Image files -> uint8 arrays, and the input policy that brings any image to the model's S x S input.

Both dataset loaders (models.data: the ``folders`` format; models.real_data: KolektorSDD and
Magnetic-tile) and everything that feeds the model (train, evaluate, tiles, the experiments) read
pixels here, so the input policy is decided in one place.

Input policy (:data:`INPUT_POLICY`, recorded in every run's config.json, evaluation report and split
manifest): :func:`to_input_size` letterboxes. An image that is not S x S is scaled so that its long
side is S (``cv2.INTER_AREA``, aspect kept), centred, and padded with 0 to S x S; masks the same way
with ``cv2.INTER_NEAREST``. A square image is a plain resize; an image already S x S is returned as
is. :func:`letterbox_geometry` says where the image lies in its input, :func:`unletterbox` maps a
map or mask back to the original frame. Why letterbox for the public datasets: docs/real-data.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.errors import DataError

#: how train, evaluate (and whoever feeds the exported graph) bring an image to S x S; recorded in runs
INPUT_POLICY = "letterbox"


# ---------------------------------------------------------------------------------------------
# files


def imread_gray(path: Path) -> np.ndarray | None:
    """An image file as decoded by OpenCV (IMREAD_GRAYSCALE), or None when it is missing, empty or no image."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)  # also works for non-ASCII paths, unlike imread
    except OSError:
        return None
    if buf.size == 0:
        return None
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def read_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file -> (size, size) uint8 gray (OpenCV, IMREAD_GRAYSCALE), resized by the policy."""
    img = imread_gray(Path(path))
    if img is None:
        raise DataError(f"cannot read image {path}: the file is missing, empty or not an image; "
                        "replace or remove it")
    if img.dtype != np.uint8:  # IMREAD_GRAYSCALE gives 8 bits already; be safe for odd decoders
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img if size is None else to_input_size(img, size)


def read_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """A mask file -> (size, size) bool, foreground where the pixel is non-zero (INTER_NEAREST)."""
    m = imread_gray(Path(path))
    if m is None:
        raise DataError(f"cannot read mask {path}: the file is missing, empty or not an image; "
                        "replace or remove it")
    m = m > 0
    if size is not None:
        m = to_input_size(m.astype(np.uint8), size, mask=True) > 0
    return m


# ---------------------------------------------------------------------------------------------
# the input policy


def to_input_size(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """The input policy: (H, W) -> (size, size) by :func:`letterbox`: the long side becomes S (aspect
    kept), centred, padded with 0. Images use INTER_AREA, masks INTER_NEAREST.

    A square image is a plain resize; an image already size x size is returned as is.
    """
    if image.shape[:2] == (size, size):
        return image
    return letterbox(image, size, mask=mask)


@dataclass(frozen=True)
class Letterbox:
    """Where an (height, width) image lies in its size x size letterbox: the inner box and the scale."""

    height: int
    width: int
    size: int
    top: int
    left: int
    inner_height: int
    inner_width: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    def valid(self) -> np.ndarray:
        """(size, size) bool: True on the image, False on the padding."""
        m = np.zeros((self.size, self.size), dtype=bool)
        m[self.top:self.top + self.inner_height, self.left:self.left + self.inner_width] = True
        return m


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """The long side becomes ``size`` (aspect kept, at least 1 px), the image centred (extra pixel bottom/right)."""
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"letterbox needs positive sizes, got {height}x{width} -> {size}")
    scale = size / max(height, width)
    ih = min(size, max(1, round(height * scale)))
    iw = min(size, max(1, round(width * scale)))
    return Letterbox(height=height, width=width, size=size, top=(size - ih) // 2, left=(size - iw) // 2,
                     inner_height=ih, inner_width=iw)


def letterbox(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """(H, W) -> (size, size), aspect kept, padded with 0; same signature as :func:`to_input_size`.
    Images use INTER_AREA, masks INTER_NEAREST (bool masks stay bool).

    A square image is a plain resize (identical to ``to_input_size``); one already size x size is
    returned as is.
    """
    if image.shape[:2] == (size, size):
        return image
    box = letterbox_geometry(image.shape[0], image.shape[1], size)
    is_bool = image.dtype == bool
    src = image.astype(np.uint8) if is_bool else image
    interp = cv2.INTER_NEAREST if mask or is_bool else cv2.INTER_AREA
    inner = cv2.resize(src, (box.inner_width, box.inner_height), interpolation=interp)
    out = np.zeros((size, size) + src.shape[2:], dtype=src.dtype)
    out[box.top:box.top + box.inner_height, box.left:box.left + box.inner_width] = inner
    return out.astype(bool) if is_bool else out


def unletterbox(array: np.ndarray, height: int, width: int, *, mask: bool = False) -> np.ndarray:
    """A (size, size) map or mask in the letterbox frame -> (height, width) in the original image's frame.

    The padding is cropped and the inner box resized back: INTER_NEAREST for masks (bool stays
    bool), INTER_LINEAR for maps.
    """
    size = array.shape[0]
    if array.shape[:2] != (size, size):
        raise ValueError(f"unletterbox takes a square (size, size) array, got shape {array.shape}")
    box = letterbox_geometry(height, width, size)
    inner = array[box.top:box.top + box.inner_height, box.left:box.left + box.inner_width]
    is_bool = inner.dtype == bool
    src = inner.astype(np.uint8) if is_bool else inner
    interp = cv2.INTER_NEAREST if mask or is_bool else cv2.INTER_LINEAR
    out = cv2.resize(src, (width, height), interpolation=interp)
    return out.astype(bool) if is_bool else out
