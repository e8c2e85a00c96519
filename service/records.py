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
        unknown: (N,) float32, the unknown-defect score per slice (models.unknown: Mahalanobis distance of the
            pooled block features to the nearest known class), or None when the model has no such output.
    """

    logits: np.ndarray
    probs: np.ndarray
    saliency: np.ndarray
    classes: tuple[str, ...]
    unknown: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """(N,) predicted class index per slice."""
        return self.probs.argmax(axis=1)


#: The exclusive outcomes of a part, in the order of their bits (accept, any reject_*, no_part, not_inspected).
VERDICT_LABELS = ("accept", "reject", "no_part", "not_inspected")


@dataclass(frozen=True)
class Defect:
    """One defect class the runtime reports, and the Verdict fields that carry it.

    Args:
        name: the class name (as in model.json), and the metrics' ``defect`` label.
        reject: the Verdict field of its reject bit (RejectDirt ... in the PLC's DB).
        score: the Verdict field of its highest slice probability, None when not reported.
        area: the Verdict field of its segmented pixels, None when not reported.
    """

    name: str
    reject: str
    score: str | None = None
    area: str | None = None


#: The defect table: every other module derives its defect names and fields from it.
DEFECTS_TABLE: tuple[Defect, ...] = (
    Defect("dirt", "reject_dirt", "score_dirt", "dirt_area_px"),
    Defect("scratch", "reject_scratch", "score_scratch", "scratch_area_px"),
    Defect("ec", "reject_ec", "score_ec"),
    Defect("unknown", "reject_unknown"),  # a slice unlike the known classes, or another non-good class (decide)
)
#: The reject bucket of a defect class the table does not name.
UNKNOWN_DEFECT = DEFECTS_TABLE[-1]
#: The defect names, in table order (the metrics' ``defect`` label values).
DEFECTS = tuple(d.name for d in DEFECTS_TABLE)


def defect_names(result) -> tuple[str, ...]:
    """The defect classes whose reject_* bit is set on a Verdict (or the PLC's view of one)."""
    return tuple(d.name for d in DEFECTS_TABLE if getattr(result, d.reject))


def outcome_consistent(result) -> bool:
    """Exactly one of accept / reject(s) / no_part / not_inspected is set (a Verdict, or the PLC's view of one)."""
    return sum([bool(result.accept), bool(defect_names(result)), bool(result.no_part),
                bool(result.not_inspected)]) == 1


def outcome_label(result) -> str:
    """accept | reject | no_part | not_inspected from a result's bits (for a consistent result, its one outcome)."""
    if result.accept:
        return "accept"
    if result.no_part:
        return "no_part"
    if result.not_inspected:
        return "not_inspected"
    return "reject"


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
        if self.accept and (self.defects or self.no_part or self.not_inspected):
            raise ValueError(f"part {self.part_id}: accept cannot be combined with a reject, no_part or not_inspected")
        if not outcome_consistent(self):
            raise ValueError(f"part {self.part_id}: a verdict is exactly one of accept, reject, no_part, not_inspected")

    @property
    def label(self) -> str:
        """accept | reject | no_part | not_inspected (the metrics' verdict label)."""
        return outcome_label(self)

    @property
    def defects(self) -> tuple[str, ...]:
        return defect_names(self)

    @property
    def unknown_slices(self) -> list[int]:
        """The slices service.decide found unknown (rule 7); [] without an unknown score."""
        u = self.extra.get("unknown") if isinstance(self.extra, dict) else None
        return list(u.get("slices") or []) if u else []

    @property
    def unknown_ratio(self) -> float | None:
        """The part's highest slice unknown score / the threshold in use (>= 1: anomalous); None without a
        score or a threshold (service.decide writes both into extra["unknown"])."""
        u = self.extra.get("unknown") if isinstance(self.extra, dict) else None
        if not u or not u.get("threshold") or not u.get("scores"):
            return None
        return max(u["scores"]) / u["threshold"]

    @classmethod
    def make_not_inspected(cls, part_id: int, reason: str, frame_id: int = 0, inspect_ms: float = 0.0) -> Verdict:
        return cls(part_id=part_id, frame_id=frame_id, not_inspected=True, reason=reason, inspect_ms=inspect_ms)

    @classmethod
    def make_no_part(cls, part_id: int, reason: str, frame_id: int = 0, inspect_ms: float = 0.0) -> Verdict:
        return cls(part_id=part_id, frame_id=frame_id, no_part=True, reason=reason, inspect_ms=inspect_ms)
