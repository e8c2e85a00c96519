"""Classification and segmentation metrics against hand-computed cases (paper eqs 14-18)."""

import math

import numpy as np
import pytest

from models.metrics import (
    accuracy,
    aggregate_segmentation,
    average_precision,
    classification_metrics,
    confusion_matrix,
    pixel_counts,
    pr_curve,
    pr_curves,
    precision_recall_f,
    segmentation_scores,
)


def test_confusion_matrix_rows_are_true_columns_predicted():
    """cm[i, j] counts true class i predicted as j."""
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_matrix_rejects_out_of_range_labels():
    """A label outside [0, K) is an error, not a silently wrong matrix."""
    with pytest.raises(ValueError, match="labels must lie"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_precision_recall_f_match_hand_computation():
    """Per-class P = TP/(TP+FP), R = TP/(TP+FN), F = 2PR/(P+R) on a worked example."""
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    p, r, f = precision_recall_f(cm)
    np.testing.assert_allclose(p, [1 / 2, 1 / 2, 1.0])
    np.testing.assert_allclose(r, [1 / 2, 1.0, 2 / 3])
    np.testing.assert_allclose(f, [1 / 2, 2 / 3, 0.8])
    assert accuracy(cm) == pytest.approx(4 / 6)


def test_zero_over_zero_is_zero_for_classification():
    """A class never predicted and never present gets precision, recall and F of 0, not NaN."""
    cm = confusion_matrix([0, 0, 1], [0, 0, 1], 3)
    p, r, f = precision_recall_f(cm)
    assert (p[2], r[2], f[2]) == (0.0, 0.0, 0.0)
    assert accuracy(np.zeros((3, 3))) == 0.0


def test_macro_average_uses_classes_present_in_the_data():
    """Macro P/R/F average only the classes with support, so an absent class does not drag them down."""
    m = classification_metrics([0, 0, 1, 1], [0, 0, 1, 0], ["good", "dirt", "scratch"])
    assert m["per_class"]["scratch"]["support"] == 0
    assert m["macro"]["recall"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["macro"]["precision"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_average_precision_matches_sklearn_documented_example():
    """AP of y=[0,0,1,1], s=[.1,.4,.35,.8] is 0.8333 (sklearn's documented value)."""
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333)


def test_pr_curve_has_one_point_per_distinct_threshold():
    """Tied scores form one point of the curve (step-wise, no interpolation)."""
    p, r, t = pr_curve([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.1])
    np.testing.assert_allclose(t, [0.5, 0.1])
    np.testing.assert_allclose(p, [2 / 3, 1 / 2])
    np.testing.assert_allclose(r, [1.0, 1.0])
    assert average_precision([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.1]) == pytest.approx(2 / 3)


def test_average_precision_edge_cases():
    """Perfect ranking gives AP 1, no positives gives NaN, and a NaN class is left out of mean AP."""
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert math.isnan(average_precision([0, 0], [0.3, 0.2]))
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    curves = pr_curves([0, 1, 0], scores, ["a", "b", "c"])
    assert math.isnan(curves["per_class"]["c"]["ap"])
    assert curves["mean_ap"] == pytest.approx(1.0)


def test_segmentation_scores_match_hand_computation():
    """PA, IoU, precision, recall, F of a 4x4 case with TP=2, FP=1, FN=1, TN=12."""
    true = np.zeros((4, 4), bool)
    true[0, 0:3] = True
    pred = np.zeros((4, 4), bool)
    pred[0, 1:4] = True
    assert pixel_counts(pred, true).tolist() == [2, 1, 1, 12]
    s = segmentation_scores(pred, true)
    assert s["pixel_accuracy"] == pytest.approx(14 / 16)
    assert s["iou"] == pytest.approx(2 / 4)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f_score"] == pytest.approx(2 / 3)


def test_segmentation_empty_masks_both_sides_is_perfect():
    """Empty prediction and empty truth agree perfectly: every score is 1."""
    z = np.zeros((5, 5), bool)
    assert segmentation_scores(z, z) == {"pixel_accuracy": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                                         "f_score": 1.0, "background_iou": 1.0, "miou_paper": 1.0}


def test_paper_miou_is_the_mean_of_defect_and_background_iou():
    """Eq. 18 averages the defect and the background IoU: an all-background guess on a 4-pixel defect in
    100 pixels scores defect IoU 0 but mIoU 0.48 (hence defect-only IoU beside it)."""
    true = np.zeros((10, 10), bool)
    true[0, :4] = True
    s = segmentation_scores(np.zeros_like(true), true)
    assert s["iou"] == 0.0 and s["background_iou"] == pytest.approx(96 / 100)
    assert s["miou_paper"] == pytest.approx(0.48)
    pred = true.copy()
    pred[1, :4] = True  # 4 TP, 4 FP, 92 TN
    s = segmentation_scores(pred, true)
    assert s["iou"] == pytest.approx(0.5) and s["background_iou"] == pytest.approx(92 / 96)
    assert s["miou_paper"] == pytest.approx((0.5 + 92 / 96) / 2)


def test_segmentation_one_side_empty_scores_zero():
    """An empty prediction of a real defect (or a false one on a clean image) has IoU, P, R and F of 0."""
    z = np.zeros((4, 4), bool)
    t = z.copy()
    t[1, 1] = True
    for pred, true in ((z, t), (t, z)):
        s = segmentation_scores(pred, true)
        assert (s["iou"], s["precision"], s["recall"], s["f_score"]) == (0.0, 0.0, 0.0, 0.0)
        assert s["pixel_accuracy"] == pytest.approx(15 / 16)


def test_segmentation_rejects_shape_mismatch():
    """Masks of different shapes are an error."""
    with pytest.raises(ValueError, match="mask shapes differ"):
        pixel_counts(np.zeros((2, 2), bool), np.zeros((3, 3), bool))


def test_mean_and_pooled_aggregates_differ_as_defined():
    """mean averages per-image IoU; pooled divides summed counts (a large defect weighs more)."""
    big_t = np.zeros((10, 10), bool)
    big_t[:, :5] = True  # 50 px, predicted exactly
    small_t = np.zeros((10, 10), bool)
    small_t[0, 0] = True  # 1 px, missed
    counts = [pixel_counts(big_t, big_t), pixel_counts(np.zeros((10, 10), bool), small_t)]
    agg = aggregate_segmentation(counts)
    assert agg["n"] == 2
    assert agg["mean"]["iou"] == pytest.approx((1.0 + 0.0) / 2)
    assert agg["pooled"]["iou"] == pytest.approx(50 / 51)
    assert agg["pooled"]["pixel_accuracy"] == pytest.approx(199 / 200)


def test_aggregate_of_no_images_is_empty_not_an_error():
    """Aggregating zero images reports n = 0 and None scores."""
    agg = aggregate_segmentation([])
    assert agg["n"] == 0 and agg["mean"]["iou"] is None and agg["pooled"]["iou"] is None
