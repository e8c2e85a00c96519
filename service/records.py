"""Typed, numpy-only records that pass between the pipeline's stages.

    camera -> Frame -> roi -> SliceBatch (service.roi) -> infer -> Prediction
           -> segment + decide -> Verdict -> plc / metrics / archive / log
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One camera image as grabbed.

    Args:
        image: (H, W) uint8, Mono8.
        frame_id: the camera's frame counter (BlockID, or our own count where the device has none).
        camera_timestamp: the device's timestamp in ticks (0 when unknown).
        arrival: time.monotonic() when the buffer arrived in the process.
        part_id: the PLC PartId the frame belongs to, when known at grab time.
    """

    image: np.ndarray
    frame_id: int
    arrival: float
    camera_timestamp: int = 0
    part_id: int | None = None


@dataclass(frozen=True)
class Prediction:
    """The ONNX model's answer for a batch of N slices.

    Args:
        logits: (N, K) float32.
        probs: (N, K) float32 softmax.
        saliency: (N, S, S) float32 in [0, 1], Grad-CAM++ for each slice's predicted class.
        classes: the K class names in logit order.
    """

    logits: np.ndarray
    probs: np.ndarray
    saliency: np.ndarray
    classes: tuple[str, ...]

    @property
    def predicted(self) -> np.ndarray:
        """(N,) predicted class index per slice."""
        return self.probs.argmax(axis=1)


VERDICT_LABELS = ("accept", "reject", "no_part", "not_inspected")
DEFECT_BITS = (("dirt", "reject_dirt"), ("scratch", "reject_scratch"), ("ec", "reject_ec"),
               ("unknown", "reject_unknown"))


def defect_names(result) -> tuple[str, ...]:
    """The defect classes whose reject_* bit is set on a Verdict (or the PLC's view of one)."""
    return tuple(name for name, attr in DEFECT_BITS if getattr(result, attr))


@dataclass(frozen=True)
class Verdict:
    """The result for one PartId, as written to the PLC (docs/plc-interface.md).

    Exactly one of: accept; one or more reject_* bits; no_part; not_inspected.
    A part that was not fully inspected is never accepted.
    """

    part_id: int
    frame_id: int = 0
    accept: bool = False
    reject_dirt: bool = False
    reject_scratch: bool = False
    reject_ec: bool = False
    reject_unknown: bool = False
    no_part: bool = False
    not_inspected: bool = False
    dirt_area_px: int = 0
    scratch_area_px: int = 0
    score_dirt: float = 0.0
    score_scratch: float = 0.0
    score_ec: float = 0.0
    inspect_ms: float = 0.0
    reason: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        rejected = self.reject_dirt or self.reject_scratch or self.reject_ec or self.reject_unknown
        if self.accept and (rejected or self.no_part or self.not_inspected):
            raise ValueError(f"part {self.part_id}: accept cannot be combined with a reject, no_part or not_inspected")
        if sum([self.accept, rejected, self.no_part, self.not_inspected]) != 1:
            raise ValueError(f"part {self.part_id}: a verdict is exactly one of accept, reject, no_part, not_inspected")

    @property
    def label(self) -> str:
        """accept | reject | no_part | not_inspected (the metrics' verdict label)."""
        if self.accept:
            return "accept"
        if self.no_part:
            return "no_part"
        if self.not_inspected:
            return "not_inspected"
        return "reject"

    @property
    def defects(self) -> tuple[str, ...]:
        return defect_names(self)

    @classmethod
    def make_not_inspected(cls, part_id: int, reason: str, frame_id: int = 0, inspect_ms: float = 0.0) -> Verdict:
        return cls(part_id=part_id, frame_id=frame_id, not_inspected=True, reason=reason, inspect_ms=inspect_ms)

    @classmethod
    def make_no_part(cls, part_id: int, reason: str, frame_id: int = 0, inspect_ms: float = 0.0) -> Verdict:
        return cls(part_id=part_id, frame_id=frame_id, no_part=True, reason=reason, inspect_ms=inspect_ms)
