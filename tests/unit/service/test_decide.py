"""service.decide: the per-part verdict rules, threshold edges and the never-accept-uninspected guarantee."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.decide import decide, validate_thresholds
from service.errors import ConfigError
from service.records import Prediction

CLASSES = ("good", "dirt", "scratch", "ec")
SEG = np.array([False, True, True, False])
TH = {"dirt": 0.6, "scratch": 0.7, "ec": 0.8}
S = 16  # mask/saliency size; decide does not care


def pred_from(rows, classes=CLASSES) -> Prediction:
    """Prediction whose probs are the given rows (the rest of each row goes to 'good' unless a full row is given)."""
    probs = np.asarray(rows, dtype=np.float32)
    n = probs.shape[0]
    return Prediction(logits=np.log(np.clip(probs, 1e-9, None)), probs=probs,
                      saliency=np.zeros((n, S, S), np.float32), classes=tuple(classes))


def row(cls: str, p: float, classes=CLASSES) -> list[float]:
    """A probability row: ``p`` on ``cls``, the rest spread over the other classes (so ``cls`` is the argmax)."""
    k = len(classes)
    r = [(1.0 - p) / (k - 1)] * k
    r[classes.index(cls)] = p
    return r


def good8():
    return [row("good", 0.9) for _ in range(8)]


def run(rows, masks=None, thresholds=TH, classes=CLASSES, seg=SEG, n=8):
    return decide(101, 7, pred_from(rows, classes), masks, thresholds, seg, inspect_ms=12.5, n_expected_slices=n)


def test_all_good_is_accept_with_scores():
    """Eight confidently good slices accept, with scores = the highest per-class probability."""
    rows = good8()
    rows[3] = [0.7, 0.2, 0.05, 0.05]
    v = run(rows)
    assert v.accept and v.label == "accept" and not v.defects
    assert v.part_id == 101 and v.frame_id == 7 and v.inspect_ms == 12.5
    assert v.score_dirt == pytest.approx(0.2) and v.score_scratch == pytest.approx(0.05)
    assert v.score_ec == pytest.approx(0.05)
    assert v.dirt_area_px == 0 and v.scratch_area_px == 0


@pytest.mark.parametrize("cls, flag", [("dirt", "reject_dirt"), ("scratch", "reject_scratch"), ("ec", "reject_ec")])
def test_one_defect_slice_rejects_its_class(cls, flag):
    """One slice predicted a defect class at or above its threshold rejects for exactly that class."""
    rows = good8()
    rows[5] = row(cls, 0.95)
    v = run(rows)
    assert v.label == "reject" and getattr(v, flag) and v.defects == (cls,)
    assert v.extra["rejecting"] == {cls: [5]}
    assert cls in v.reason and "[5]" in v.reason


def test_probability_equal_to_threshold_rejects():
    """p == threshold rejects (>=), a hair below does not."""
    p = np.float32(0.6)
    rows = good8()
    rows[0] = [0.2, float(p), 0.1, 0.1]
    assert pred_from(rows).probs[0, 1] == np.float32(0.6)
    assert run(rows, thresholds={"dirt": float(np.float32(0.6)), "scratch": 0.7, "ec": 0.8}).reject_dirt
    rows[0] = [0.2, float(np.nextafter(p, np.float32(0))), 0.1, 0.1 + 1e-7]
    v = run(rows, thresholds={"dirt": float(p), "scratch": 0.7, "ec": 0.8})
    assert v.accept


def test_below_threshold_defect_slice_counts_as_good():
    """A slice predicted dirt below the dirt threshold does not reject; it is reported as below threshold."""
    rows = good8()
    rows[2] = [0.3, 0.5, 0.1, 0.1]  # predicted dirt, 0.5 < 0.6
    v = run(rows)
    assert v.accept
    assert v.extra["below_threshold"] == {"dirt": [2]}
    assert "below threshold" in v.reason and "counted good" in v.reason
    assert v.score_dirt == pytest.approx(0.5)


def test_high_defect_probability_on_a_slice_predicted_otherwise_does_not_reject():
    """Only the predicted class counts: ec at 0.45 on a slice whose argmax is scratch (0.55 < 0.7) rejects nothing."""
    rows = good8()
    rows[1] = [0.0, 0.0, 0.55, 0.45]
    v = run(rows, thresholds={"dirt": 0.6, "scratch": 0.7, "ec": 0.4})
    assert v.accept and v.score_ec == pytest.approx(0.45)


def test_several_defect_classes_reject_at_once():
    """Dirt on one slice, scratch on two and ec on another set all three reject bits."""
    rows = good8()
    rows[0], rows[4], rows[6], rows[7] = row("dirt", 0.9), row("scratch", 0.75), row("scratch", 0.99), row("ec", 0.8)
    v = run(rows)
    assert v.reject_dirt and v.reject_scratch and v.reject_ec and not v.reject_unknown
    assert v.defects == ("dirt", "scratch", "ec")
    assert v.extra["rejecting"] == {"dirt": [0], "scratch": [4, 6], "ec": [7]}
    assert v.score_scratch == pytest.approx(0.99)


def test_areas_sum_masks_of_slices_rejecting_for_dirt_or_scratch():
    """DirtAreaPx/ScratchAreaPx sum the mask pixels of the slices that reject for dirt/scratch only."""
    rows = good8()
    rows[0], rows[1], rows[2], rows[3] = row("dirt", 0.9), row("dirt", 0.55), row("scratch", 0.8), row("ec", 0.9)
    masks = np.zeros((8, S, S), bool)
    masks[0, :2, :5] = True   # 10 px dirt (rejecting slice)
    masks[1, :1, :3] = True   # 3 px dirt (below threshold: counted good, its mask does not count)
    masks[2, :4, :4] = True   # 16 px scratch
    masks[3, :, :] = True     # ec is not segmented; ignored
    masks[4, :, :] = True     # a good slice's mask is ignored
    v = run(rows, masks=masks)
    assert v.dirt_area_px == 10 and v.scratch_area_px == 16
    assert run(rows, masks=None).dirt_area_px == 0
    no_seg = run(rows, masks=masks, seg=["scratch"])
    assert no_seg.dirt_area_px == 0 and no_seg.scratch_area_px == 16


def test_unknown_class_maps_to_reject_unknown():
    """A class outside good/dirt/scratch/ec, predicted at or above its threshold, sets RejectUnknown."""
    classes = CLASSES + ("rust",)
    rows = [row("good", 0.9, classes) for _ in range(8)]
    rows[3] = row("rust", 0.9, classes)
    v = run(rows, thresholds={**TH, "rust": 0.5}, classes=classes, seg=["dirt", "scratch"])
    assert v.reject_unknown and v.defects == ("unknown",) and "rust" in v.reason
    rows[3] = row("rust", 0.4, classes)
    assert run(rows, thresholds={**TH, "rust": 0.5}, classes=classes, seg=["dirt", "scratch"]).accept


def test_nan_probability_is_not_inspected():
    """A NaN anywhere in the probabilities makes the part NotInspected with the slice named."""
    rows = good8()
    rows[4] = [math.nan, 0.1, 0.1, 0.1]
    v = run(rows)
    assert v.not_inspected and not v.accept and "slice(s) [4]" in v.reason


def test_seven_slices_is_not_inspected():
    """Seven slices of a part expected to have eight is NotInspected, even if all are good."""
    v = run(good8()[:7])
    assert v.not_inspected and v.reason == "7 of 8 slices inspected"
    assert run(good8() + good8()[:1]).reason == "9 of 8 slices inspected"


@pytest.mark.parametrize("rows, reason", [
    ([[0.5, 0.5, 0.5, 0.5]] * 8, "sum to 1"),
    ([[1.5, -0.5, 0.0, 0.0]] * 8, "outside [0, 1]"),
    ([[0.5, 0.5, 0.0]] * 8, "3 classes, model has 4"),
])
def test_inconsistent_probabilities_are_not_inspected(rows, reason):
    """Probabilities that are no softmax, or of the wrong width, give NotInspected with the reason."""
    v = run(rows)
    assert v.not_inspected and reason in v.reason


def test_bad_masks_segmented_or_thresholds_are_not_inspected():
    """Masks of the wrong slice count, segmented flags of the wrong length or a missing threshold never accept."""
    assert "masks" in run(good8(), masks=np.zeros((7, S, S), bool)).reason
    assert run(good8(), seg=np.array([True, False])).not_inspected
    v = run(good8(), thresholds={"dirt": 0.6, "scratch": 0.7})
    assert v.not_inspected and "'ec'" in v.reason
    assert run(good8(), thresholds={**TH, "ec": math.nan}).not_inspected


def test_validate_thresholds():
    """Thresholds must cover each defect class with a probability in (0, 1], and name only model classes."""
    assert validate_thresholds({"dirt": 0.5, "scratch": 1, "ec": 0.01}, CLASSES) == {"dirt": 0.5, "scratch": 1.0,
                                                                                     "ec": 0.01}
    with pytest.raises(ConfigError, match="no threshold for the model's class\\(es\\) ec"):
        validate_thresholds({"dirt": 0.5, "scratch": 0.5}, CLASSES)
    with pytest.raises(ConfigError, match="thresholds.scrach: the model has no class"):
        validate_thresholds({"dirt": 0.5, "scrach": 0.5, "ec": 0.5}, CLASSES)
    with pytest.raises(ConfigError, match=r"thresholds.ec = 1.5: must be a probability in \(0, 1\]"):
        validate_thresholds({"dirt": 0.5, "scratch": 0.5, "ec": 1.5}, CLASSES)
    with pytest.raises(ConfigError, match=r"thresholds.ec = 0: must be a probability"):
        validate_thresholds({"dirt": 0.5, "scratch": 0.5, "ec": 0}, CLASSES)
    with pytest.raises(ConfigError, match="'good' takes no threshold"):
        validate_thresholds({"good": 0.5, "dirt": 0.5, "scratch": 0.5, "ec": 0.5}, CLASSES)
    with pytest.raises(ConfigError, match="must be a probability"):
        validate_thresholds({"dirt": True, "scratch": 0.5, "ec": 0.5}, CLASSES)


prob_value = st.one_of(st.floats(0, 1, width=32), st.just(math.nan), st.just(math.inf), st.just(-0.1))


@st.composite
def predictions(draw):
    n = draw(st.integers(0, 10))
    raw = draw(st.lists(st.lists(prob_value, min_size=4, max_size=4), min_size=n, max_size=n))
    normalise = draw(st.booleans())
    probs = np.asarray(raw, dtype=np.float32).reshape(n, 4)
    if normalise:
        with np.errstate(invalid="ignore", divide="ignore"):
            probs = probs / probs.sum(axis=1, keepdims=True)
    return probs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(probs=predictions(), th=st.floats(0, 1, exclude_min=True), expected=st.sampled_from([8, 8, 8, 4]))
def test_never_accept_unless_fully_and_consistently_inspected(probs, th, expected):
    """Whatever the probabilities, Accept implies: exactly the expected slices, all finite, and none rejecting."""
    thresholds = {"dirt": th, "scratch": th, "ec": th}
    p = Prediction(logits=np.zeros_like(probs), probs=probs, saliency=np.zeros((len(probs), S, S), np.float32),
                   classes=CLASSES)
    v = decide(1, 1, p, None, thresholds, SEG, 0.0, n_expected_slices=expected)
    if len(probs) != expected or not np.isfinite(probs).all():
        assert v.not_inspected and not v.accept
    if v.accept:
        assert len(probs) == expected and np.isfinite(probs).all()
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
        pred = probs.argmax(axis=1)
        for i, c in enumerate(pred):
            assert c == 0 or probs[i, c] < th
    if v.label == "reject":
        pred = probs.argmax(axis=1)
        assert any(c != 0 and probs[i, c] >= th for i, c in enumerate(pred))


# ------------------------------------------------------------------ rule 7: unknown defects

def run_unknown(rows, scores, threshold=2.0, rule="unexplained"):
    p = pred_from(rows)
    p = Prediction(logits=p.logits, probs=p.probs, saliency=p.saliency, classes=p.classes,
                   unknown=None if scores is None else np.asarray(scores, np.float32))
    return decide(101, 7, p, None, TH, SEG, inspect_ms=1.0, n_expected_slices=8, unknown_threshold=threshold,
                  unknown_rule=rule)


def test_an_unknown_slice_predicted_good_rejects_the_part_as_unknown():
    """A slice the classifier calls good but whose unknown score reaches the threshold: RejectUnknown, never Accept."""
    scores = [0.5] * 8
    scores[2] = 2.0  # equality counts, as for the class thresholds
    v = run_unknown(good8(), scores)
    assert not v.accept and v.reject_unknown and v.defects == ("unknown",) and v.label == "reject"
    assert v.extra["unknown"]["slices"] == [2] and v.extra["slices"][2]["unknown"] is True
    assert "unknown on slice(s) [2]" in v.reason


def test_below_the_unknown_threshold_the_part_is_accepted_and_the_scores_are_kept():
    """Scores under the threshold change nothing; the verdict still carries them for the archive and metrics."""
    v = run_unknown(good8(), [1.99] * 8)
    assert v.accept and not v.reject_unknown
    assert v.extra["unknown"]["scores"] == [1.99] * 8 and v.extra["unknown"]["threshold"] == 2.0


def test_a_known_defect_keeps_its_own_bit_beside_reject_unknown():
    """A scratch slice and an unknown slice on one part: RejectScratch and RejectUnknown both set."""
    rows = good8()
    rows[4] = row("scratch", 0.95)
    scores = [0.1] * 8
    scores[6] = 9.0
    v = run_unknown(rows, scores)
    assert v.reject_scratch and v.reject_unknown and set(v.defects) == {"scratch", "unknown"}


@pytest.mark.parametrize("rule, unknown", [("unexplained", False), ("any", True)])
def test_an_anomalous_slice_a_known_class_rejects_is_unknown_only_under_rule_any(rule, unknown):
    """The dirt slice is also the anomalous one: "unexplained" leaves it dirt (RejectDirt alone), "any" adds
    RejectUnknown; a below-threshold dirt slice counts as unexplained under both."""
    rows = good8()
    rows[3] = row("dirt", 0.95)
    scores = [0.1] * 8
    scores[3] = 5.0
    v = run_unknown(rows, scores, rule=rule)
    assert v.reject_dirt and v.reject_unknown == unknown and v.extra["unknown"]["anomalous"] == [3]
    assert v.extra["unknown"]["rule"] == rule
    rows[3] = row("dirt", 0.55)  # below the 0.6 threshold: counted good, so nothing explains the anomaly
    v = run_unknown(rows, scores, rule=rule)
    assert v.reject_unknown and not v.reject_dirt and v.extra["unknown"]["slices"] == [3]


def test_an_unknown_rule_that_does_not_exist_is_not_inspected():
    """A misspelt rule cannot silently switch the check off: NotInspected naming the rules."""
    v = run_unknown(good8(), [0.1] * 8, rule="anything")
    assert v.not_inspected and "unexplained, any" in v.reason


def test_no_threshold_switches_the_unknown_rule_off():
    """unknown_threshold=None (a model without the score): the scores are ignored."""
    v = run_unknown(good8(), [100.0] * 8, threshold=None)
    assert v.accept and not v.reject_unknown


@pytest.mark.parametrize("scores, reason", [
    ([0.1] * 7 + [float("nan")], "invalid unknown score"),
    ([0.1] * 7 + [-1.0], "invalid unknown score"),
    ([0.1] * 7, "inconsistent unknown scores"),
])
def test_a_broken_unknown_score_is_not_inspected(scores, reason):
    """NaN, negative or missing scores make the part NotInspected with the reason, never Accept."""
    v = run_unknown(good8(), scores)
    assert v.not_inspected and not v.accept and reason in v.reason


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf"), True])
def test_an_invalid_unknown_threshold_is_not_inspected(threshold):
    """A threshold that is not a finite number > 0 cannot silently switch the rule off: NotInspected."""
    v = run_unknown(good8(), [0.1] * 8, threshold=threshold)
    assert v.not_inspected and "invalid unknown threshold" in v.reason


class _Model:
    def __init__(self, has, threshold):
        self.has_unknown, self.unknown_threshold, self.path = has, threshold, "m.onnx"


def test_resolve_unknown_threshold_prefers_the_config_and_refuses_it_without_a_score():
    """[model] unknown_threshold overrides model.json's; set for a model without the score it is a ConfigError."""
    from service.decide import resolve_unknown_threshold

    assert resolve_unknown_threshold(None, _Model(True, 1.5)) == 1.5
    assert resolve_unknown_threshold(3.0, _Model(True, 1.5)) == 3.0
    assert resolve_unknown_threshold(None, _Model(False, None)) is None
    assert resolve_unknown_threshold(0.0, _Model(True, 1.5)) == 1.5  # the config's default: the model's own
    assert resolve_unknown_threshold(0.0, _Model(False, None)) is None
    with pytest.raises(ConfigError, match="has no unknown-defect score"):
        resolve_unknown_threshold(2.0, _Model(False, None))
    with pytest.raises(ConfigError, match="finite number > 0"):
        resolve_unknown_threshold(float("nan"), _Model(True, 1.5))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=8),
       t=st.floats(0.01, 10, allow_nan=False))
def test_accept_implies_every_unknown_score_below_the_threshold(scores, t):
    """Whatever the scores (all slices good): Accept only when all are < t; RejectUnknown exactly when one is >= t."""
    v = run_unknown(good8(), scores, threshold=t)
    unknown = [bool(np.float32(s) >= np.float32(t)) for s in scores]  # decide compares in float32
    assert v.accept == (not any(unknown))
    assert v.reject_unknown == any(unknown)
    assert not (v.accept and v.reject_unknown)


# ----------------------------------------------------------------- pinned by mutation testing (docs/testing.md)


def test_a_not_inspected_or_rejected_part_keeps_its_frame_id_and_inspect_time():
    """Every verdict, NotInspected and Reject alike, carries the part's frame id and inspection time to the PLC."""
    for v in (run(good8()[:7]), run([row("dirt", 0.9)] + good8()[1:])):
        assert (v.part_id, v.frame_id, v.inspect_ms) == (101, 7, 12.5)


def test_one_expected_slice_is_inspected_and_zero_is_refused():
    """n_expected_slices = 1 inspects a one-slice part; 0 is NotInspected with the reason."""
    assert run([row("good", 0.9)], n=1).accept
    v = run([row("good", 0.9)], n=0)
    assert v.not_inspected and "n_expected_slices = 0, must be >= 1" in v.reason


def test_probabilities_not_a_2d_array_are_not_inspected_naming_the_shape():
    """A 1-D probability vector is NotInspected (never raises), and the reason names its shape."""
    pred = pred_from(good8())
    object.__setattr__(pred, "probs", np.full(4, 0.25, np.float32))
    v = decide(101, 7, pred, None, TH, SEG, inspect_ms=1.0)
    assert v.not_inspected and "probs of shape (4,), expected (N, K)" in v.reason


@pytest.mark.parametrize("bad", [[1.00002, -0.000009, 0.0, 0.0], [-0.00002, 1.000009, 0.0, 0.0]])
def test_one_probability_just_outside_0_1_is_not_inspected(bad):
    """A probability above 1 + 1e-5 or below -1e-5 is refused even when its row sums to 1 and the other end holds."""
    v = run([bad] + good8()[1:])
    assert v.not_inspected and v.reason == "probabilities outside [0, 1]"


def test_one_hot_rows_and_sums_within_1e_3_are_inspected():
    """A probability of exactly 1 is valid, and a row sum within 1e-3 of 1 (e.g. 1.0005) is accepted as rounding."""
    assert run([[1.0, 0.0, 0.0, 0.0]] * 8).accept
    assert run([[0.9005, 0.05, 0.05, 0.0]] * 8).accept


def test_a_row_sum_off_by_more_than_1e_3_is_named_in_the_reason():
    """The NotInspected reason lists the row sums, rounded to 4 decimals."""
    v = run([[0.75, 0.25, 0.25, 0.0]] + good8()[1:])
    assert v.not_inspected and "row sums [1.25, 1.0," in v.reason


def test_masks_of_the_wrong_dimension_are_not_inspected_naming_the_shape():
    """2-D masks with one row per slice are refused, not summed: the reason names their shape."""
    v = run(good8(), masks=np.zeros((8, S), bool))
    assert v.not_inspected and f"inconsistent masks: shape (8, {S}) for 8 slices" in v.reason


def test_unknown_scores_name_their_shape_and_exactly_the_bad_slices():
    """An unknown score of the wrong shape names it; otherwise only the negative or non-finite slices are listed."""
    v = run_unknown(good8(), [0.0] * 7, 1.0)
    assert v.not_inspected and "shape (7,) for 8 slices" in v.reason
    scores = [0.0, 0.5, -1.0, 0.3, 0.3, math.nan, 0.3, 0.3]
    v = run_unknown(good8(), scores, 1.0)
    assert v.not_inspected and v.reason.endswith("on slice(s) [2, 5]")


def test_segmented_names_outside_the_classes_are_not_inspected_with_the_reason():
    """Segmented flags of the wrong length or names the model lacks make the part NotInspected, saying why."""
    v = run(good8(), seg=np.array([True, False, True]))
    assert v.not_inspected and v.reason == "inconsistent segmented classes: segmented has 3 flags for 4 classes"
    v = run(good8(), seg=["dirt", "rust"])
    assert v.not_inspected and "segmented names ['rust'] not in classes ['good', 'dirt'," in v.reason


def test_thresholds_that_are_not_a_table_are_not_inspected():
    """decide never raises on thresholds that are not a mapping: the part is NotInspected."""
    v = run(good8(), thresholds=None)
    assert v.not_inspected and "no valid threshold for class 'dirt'" in v.reason


def test_a_model_without_a_score_class_reports_that_score_as_zero():
    """ScoreEC is 0 for a model with no 'ec' class, while the classes it has report their maxima."""
    classes = ("good", "dirt", "scratch")
    v = run([row("dirt", 0.9, classes)] + [row("good", 0.9, classes)] * 7, thresholds={"dirt": 0.6, "scratch": 0.7},
            classes=classes, seg=np.array([False, True, True]))
    assert v.reject_dirt and v.score_ec == 0.0 and v.score_dirt == pytest.approx(0.9)


def test_extra_lists_each_slice_with_its_class_rounded_probability_and_decision():
    """extra['slices'] (read by the live view) and extra['thresholds'] hold the per-slice decision."""
    v = run([row("scratch", 0.123456789 + 0.7)] + good8()[1:])
    assert v.extra["slices"][0] == {"class": "scratch", "p": round(float(np.float32(0.823456789)), 6),
                                    "rejects": True}
    assert v.extra["slices"][0]["p"] == 0.823457
    assert v.extra["slices"][1] == {"class": "good", "p": 0.9, "rejects": False}
    assert v.extra["thresholds"] == TH


def test_reasons_list_each_rejecting_class_and_the_below_threshold_slices():
    """The reason names every rejecting class with its max p and threshold, then the slices counted good."""
    rows = [row("scratch", 0.9), row("ec", 0.85), row("dirt", 0.55)] + good8()[3:]
    assert run(rows).reason == ("reject: scratch on slice(s) [0] (max p 0.900 >= 0.700); ec on slice(s) [1] "
                                "(max p 0.850 >= 0.800); dirt below threshold on slice(s) [2] (counted good)")
    assert run([row("scratch", 0.9)] + good8()[1:]).reason == "reject: scratch on slice(s) [0] (max p 0.900 >= 0.700)"
    assert run(good8()).reason == "all 8 slices good"
    assert run([row("dirt", 0.55), row("scratch", 0.6)] + good8()[2:]).reason == (
        "all 8 slices good; dirt below threshold on slice(s) [0] (counted good); "
        "scratch below threshold on slice(s) [1] (counted good)")


def test_without_a_threshold_the_unknown_scores_are_kept_with_no_unknown_slices():
    """A model's unknown scores are reported (rounded to 4 decimals) with an empty slice list when the rule is off."""
    scores = [0.123456, 5.0, 0, 0, 0, 0, 0, 0]
    v = run_unknown(good8(), scores, None)
    assert v.accept and v.extra["unknown"] == {"scores": [0.1235, 5.0] + [0.0] * 6, "slices": [], "anomalous": [],
                                               "rule": "unexplained", "threshold": None}


def test_validate_thresholds_messages_name_the_fix():
    """Each refused thresholds table says what is wrong and the fix, listing the model's classes or the missing ones."""
    with pytest.raises(ConfigError, match=r"^thresholds must be a table of class = probability, got \[0\.5\]$"):
        validate_thresholds([0.5], CLASSES)
    with pytest.raises(ConfigError, match=r"^thresholds\.good: 'good' takes no threshold \(a slice is good unless a "
                                          r"defect class rejects it\)\. Fix: remove it\.$"):
        validate_thresholds({"good": 0.5}, CLASSES)
    with pytest.raises(ConfigError, match=r"\(its classes: good, dirt, scratch, ec\)"):
        validate_thresholds({"rust": 0.5}, CLASSES)
    with pytest.raises(ConfigError, match=r"^no threshold for the model's class\(es\) scratch, ec\. Fix: add e\.g\. "
                                          r"scratch = 0\.5, ec = 0\.5 to the thresholds table\.$"):
        validate_thresholds({"dirt": 0.5}, CLASSES)


def test_resolve_unknown_threshold_edges():
    """A model object without has_unknown has no score; thresholds in (0, 1) are valid, negatives are refused."""
    from types import SimpleNamespace

    from service.decide import resolve_unknown_threshold

    assert resolve_unknown_threshold(None, SimpleNamespace(unknown_threshold=2.0)) is None
    assert resolve_unknown_threshold(None, _Model(False, 2.0)) is None
    assert resolve_unknown_threshold(0.5, _Model(True, 1.5)) == 0.5
    with pytest.raises(ConfigError, match="finite number > 0"):
        resolve_unknown_threshold(-1.0, _Model(True, 1.5))
    with pytest.raises(ConfigError, match="the model m.onnx has no unknown-defect score"):
        resolve_unknown_threshold(2.0, _Model(False, None))


def test_plain_lists_instead_of_arrays_are_not_inspected():
    """Probabilities, masks or unknown scores passed as lists (no .shape) give NotInspected naming shape None."""
    pred = pred_from(good8())
    object.__setattr__(pred, "probs", good8())
    assert "probs of shape None" in decide(101, 7, pred, None, TH, SEG, inspect_ms=1.0).reason
    assert "inconsistent masks: shape None" in run(good8(), masks=[[0] * S] * 8).reason
    pred = pred_from(good8())
    object.__setattr__(pred, "unknown", [0.0] * 8)
    v = decide(101, 7, pred, None, TH, SEG, inspect_ms=1.0, unknown_threshold=1.0)
    assert v.not_inspected and "inconsistent unknown scores: shape None" in v.reason


def test_the_verdict_reads_its_unknown_slices_and_ratio_back():
    """Verdict.unknown_slices / unknown_ratio (what the archive and the metrics read) come from decide's extra;
    without a score or a threshold there are none."""
    scores = [0.5] * 8
    scores[6] = 3.0
    v = run_unknown(good8(), scores, threshold=2.0)
    assert v.unknown_slices == [6] and v.unknown_ratio == pytest.approx(1.5)
    below = run_unknown(good8(), [1.0] * 8, threshold=2.0)
    assert below.unknown_slices == [] and below.unknown_ratio == pytest.approx(0.5)
    off = run_unknown(good8(), [9.0] * 8, threshold=None)
    assert off.unknown_slices == [] and off.unknown_ratio is None
    assert run_unknown(good8(), None).unknown_ratio is None
