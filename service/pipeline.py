"""One frame through the inspection stages: ROI -> 8 slices -> ONNX -> masks -> decide -> Verdict.

The daemon's workers (service.app) and the offline part-level evaluation (models.demo_model) both call
:func:`inspect_frame`, so the line and the evaluation cannot drift apart. Each stage is timed.
"""

from __future__ import annotations

import time

from service.errors import NoPartError
from service.logs import get_logger
from service.records import Frame, Verdict

log = get_logger(__name__)


def inspect_frame(frame: Frame, part_id: int, roi_params, model, thresholds: dict[str, float],
                  observe=None, unknown_threshold: float | None = None,
                  unknown_rule: str = "unexplained") -> tuple[Verdict, dict | None]:
    """The inspection pipeline for one frame: ROI -> 8 slices -> ONNX -> Otsu -> decide.

    ``observe(stage, seconds)`` receives the roi / infer / segment times. A frame without an
    inspectable valve gives NoPart (no extras); otherwise the extras carry the slice batch, the
    prediction, the masks and the stage timings (what the archive draws). ``unknown_threshold`` is the
    unknown-score threshold (service.decide rule 7; None = off), ``unknown_rule`` which anomalous slices count.
    """
    from service.decide import decide
    from service.roi import extract
    from service.segment import masks_for

    def note(stage: str, seconds: float) -> None:
        if observe is not None:
            observe(stage, seconds)

    t0 = time.monotonic()
    try:
        batch = extract(frame.image, roi_params)
    except NoPartError as exc:
        note("roi", time.monotonic() - t0)
        log.info("no_part", part_id=part_id, frame_id=frame.frame_id, reason=exc.reason, detail=str(exc))
        ms = (time.monotonic() - frame.arrival) * 1000.0
        return Verdict.make_no_part(part_id, exc.reason, frame_id=frame.frame_id, inspect_ms=ms), None
    t1 = time.monotonic()
    note("roi", t1 - t0)
    pred = model.run(batch.slices)
    t2 = time.monotonic()
    note("infer", t2 - t1)
    masks = masks_for(pred.saliency, pred.predicted, model.segmented, slices=batch.slices)
    t3 = time.monotonic()
    note("segment", t3 - t2)
    verdict = decide(part_id, frame.frame_id, pred, masks, thresholds, model.segmented,
                     inspect_ms=(t3 - frame.arrival) * 1000.0, unknown_threshold=unknown_threshold,
                     unknown_rule=unknown_rule)
    timings = {"roi_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3, "segment_ms": (t3 - t2) * 1e3}
    return verdict, {"batch": batch, "pred": pred, "masks": masks, "timings": timings}
