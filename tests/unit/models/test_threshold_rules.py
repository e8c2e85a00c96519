"""tools/threshold_rules.py: the four bounds inside the validation gap, scored on a run's test images."""

from __future__ import annotations

import json

import pytest

from tools.threshold_rules import main


def write_run(path, per_image, calibration):
    path.mkdir()
    (path / "image_metrics.json").write_text(json.dumps({"per_image": per_image,
                                                         "calibrated": {"calibration": calibration}}))


def test_each_bound_scores_the_test_images_and_names_the_escapes(tmp_path):
    images = ([{"source": f"g{i}", "true": 0, "defect_logodds": s} for i, s in enumerate((-3.0, 1.0, 4.0, 6.0))]
              + [{"source": "d-low", "true": 1, "defect_logodds": 2.0},
                 {"source": "d-mid", "true": 1, "defect_logodds": 5.0},
                 {"source": "d-high", "true": 1, "defect_logodds": 9.0}])
    cal = {"good_max": 3.0, "defect_min": 7.0, "threshold_logodds": 5.0, "images": 10, "defect_images": 2}
    write_run(tmp_path / "run", images, cal)
    out = tmp_path / "rules.json"
    assert main([str(tmp_path / "run"), "--json", str(out)]) == 0
    rules = json.loads(out.read_text())["rows"][0]["rules"]
    # daemon (0): g0 kept; every defect found
    assert rules["daemon"]["good_recall"] == 0.25 and rules["daemon"]["defect_recall"] == 1.0
    # just above good_max (3): g0, g1 kept; d-low escapes
    assert rules["good_max"]["good_recall"] == 0.5 and rules["good_max"]["escaped"] == ["d-low"]
    # midpoint (5): a score equal to the bound is defective, as in the daemon's rule
    assert rules["midpoint"]["good_recall"] == 0.75 and rules["midpoint"]["escaped"] == ["d-low"]
    # defect_min (7): every good kept; d-low and d-mid escape
    assert rules["defect_min"]["good_recall"] == 1.0 and rules["defect_min"]["escaped"] == ["d-low", "d-mid"]
    assert rules["defect_min"]["accuracy"] == pytest.approx(5 / 7)
    # hindsight: the best accuracy any bound reaches on these images (5/7 at 2, 5 and 9: the lowest, 2, is kept)
    row = json.loads(out.read_text())["rows"][0]
    assert row["bounds"]["hindsight"] == 2.0 and rules["hindsight"]["escaped"] == []
    assert rules["hindsight"]["accuracy"] == pytest.approx(5 / 7)
    assert all(rules["hindsight"]["accuracy"] >= r["accuracy"] for r in rules.values())


def test_hindsight_may_call_nothing_defective(tmp_path):
    # two good images above the only defective one: the best accuracy (2/3) calls nothing defective
    images = [{"source": "g1", "true": 0, "defect_logodds": 1.0}, {"source": "g2", "true": 0, "defect_logodds": 2.0},
              {"source": "d", "true": 1, "defect_logodds": 0.0}]
    write_run(tmp_path / "run", images, {"good_max": 0.5, "defect_min": 0.7, "threshold_logodds": 0.6,
                                         "images": 4, "defect_images": 1})
    out = tmp_path / "rules.json"
    assert main([str(tmp_path / "run"), "--json", str(out)]) == 0
    text = out.read_text()
    assert "Infinity" not in text
    row = json.loads(text)["rows"][0]
    assert row["bounds"]["hindsight"] is None
    assert row["rules"]["hindsight"]["accuracy"] == pytest.approx(2 / 3)
    assert row["rules"]["hindsight"]["escaped"] == ["d"]


def test_a_run_without_calibration_or_with_more_classes_is_refused(tmp_path):
    write_run(tmp_path / "a", [{"source": "x", "true": 0, "defect_logodds": 0.0}], {})
    with pytest.raises(SystemExit, match="realdata calibrate"):
        main([str(tmp_path / "a")])
    cal = {"good_max": 1.0, "defect_min": 2.0, "threshold_logodds": 1.5, "images": 3, "defect_images": 2}
    write_run(tmp_path / "b", [{"source": s, "true": t, "defect_logodds": 0.0} for s, t in (("x", 0), ("y", 1), ("z", 2))],
              cal)
    with pytest.raises(SystemExit, match="good-vs-defective"):
        main([str(tmp_path / "b")])
