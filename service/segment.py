"""Saliency -> defect masks: Otsu binarisation, shared by the runtime and the evaluation.

Grad-CAM++ maps arrive min-max scaled to [0, 1] per slice. They are quantised to 8 bits and
binarised with Otsu's threshold (OpenCV). Classes that are not segmented (Good, and EC, which
covers the whole valve) get an empty mask.
"""

from __future__ import annotations

import cv2
import numpy as np


def otsu_mask(saliency: np.ndarray) -> np.ndarray:
    """One (H, W) saliency map in [0, 1] -> bool mask of the pixels above Otsu's threshold.

    A flat map (no contrast, e.g. all zeros) has no foreground and gives an empty mask.
    """
    if saliency.ndim != 2:
        raise ValueError(f"otsu_mask takes one (H, W) map, got shape {saliency.shape}")
    u8 = np.clip(np.rint(np.nan_to_num(saliency, nan=0.0) * 255.0), 0, 255).astype(np.uint8)
    if int(u8.max()) == int(u8.min()):
        return np.zeros(u8.shape, dtype=bool)
    thresh, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return u8 > thresh


def masks_for(saliency: np.ndarray, predicted: np.ndarray, segmented: np.ndarray) -> np.ndarray:
    """Masks for a batch: Otsu where the predicted class is segmented, empty elsewhere.

    Args:
        saliency: (B, H, W) float maps in [0, 1].
        predicted: (B,) predicted class indices.
        segmented: (K,) bool, which classes are segmented (dirt, scratch).
    Returns:
        (B, H, W) bool masks.
    """
    out = np.zeros(saliency.shape, dtype=bool)
    for i, cls in enumerate(np.asarray(predicted).tolist()):
        if segmented[cls]:
            out[i] = otsu_mask(saliency[i])
    return out
