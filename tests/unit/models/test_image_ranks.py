"""tools/image_ranks.py: named test images' ranks in scored realdata runs."""

from __future__ import annotations

import json

import pytest

from models.metrics import average_precision
from tools.image_ranks import main


def write_run(path, scores, classes=("good", "defect")):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": {"classes": list(classes)}}))
    per_image = [{"source": name, "true": true, "defect_logodds": s} for name, (true, s) in scores.items()]
    (path / "image_metrics.json").write_text(json.dumps({"per_image": per_image}))


def test_ranks_count_the_other_side_beyond_each_named_image(tmp_path):
    scores = {"g1": (0, -2.0), "g2": (0, 1.0), "g3": (0, 6.0), "d-low": (1, 0.5), "d-high": (1, 8.0)}
    write_run(tmp_path / "run", scores)
    out = tmp_path / "ranks.json"
    assert main([str(tmp_path / "run"), "--images", "d-low,g3", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["ap"] == pytest.approx(average_precision([0, 0, 0, 1, 1], [-2.0, 1.0, 6.0, 0.5, 8.0]))
    low, g3 = run["images"]["d-low"], run["images"]["g3"]
    assert low == {"logodds": 0.5, "defective": True, "beyond": 2,               # g2 and g3 score above it
                   "ap_without": pytest.approx(1.0)}
    assert g3["defective"] is False and g3["beyond"] == 1                       # d-low scores below it
    assert g3["ap_without"] == pytest.approx(average_precision([0, 0, 1, 1], [-2.0, 1.0, 0.5, 8.0]))


def test_an_image_outside_the_summarys_top_three_is_ranked(tmp_path):
    # eight images; the named one ("g-quiet", well below every defect) moves the AP less than three others
    scores = {"g1": (0, 5.0), "g2": (0, 4.5), "g3": (0, -1.0), "g-quiet": (0, -2.0),
              "d1": (1, 4.0), "d2": (1, 6.0), "d3": (1, 7.0), "d4": (1, 3.0)}
    write_run(tmp_path / "run", scores)
    out = tmp_path / "ranks.json"
    assert main([str(tmp_path / "run"), "--images", "g-quiet", "--json", str(out)]) == 0
    quiet = json.loads(out.read_text())["runs"][0]["images"]["g-quiet"]
    assert quiet["defective"] is False and quiet["beyond"] == 0 and quiet["ap_without"] is not None


def test_the_good_class_is_found_by_name_and_unknown_images_are_refused(tmp_path, capsys):
    # the good class need not come first: here it is index 1 ("free"); every other class is defective
    scores = {"ok": (1, -1.0), "ok2": (1, -5.0), "crack": (3, 2.0), "fray": (0, -3.0)}
    write_run(tmp_path / "mt", scores, classes=("blowhole", "free", "break", "crack", "fray", "uneven"))
    out = tmp_path / "ranks.json"
    assert main([str(tmp_path / "mt"), "--images", "fray,ok", "--json", str(out)]) == 0
    images = json.loads(out.read_text())["runs"][0]["images"]
    assert images["fray"]["defective"] is True and images["fray"]["beyond"] == 1   # "ok" scores above it
    assert images["ok"]["defective"] is False and images["ok"]["beyond"] == 1     # "fray" scores below it
    # a run with one defective image: leaving it out leaves nothing to rank, printed as "-", not a crash
    write_run(tmp_path / "one", {"g": (0, 0.0), "d": (1, 1.0)})
    assert main([str(tmp_path / "one"), "--images", "d"]) == 0
    assert "d (not ranked): log-odds 1.00, - beyond, AP without -" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no test image nope"):
        main([str(tmp_path / "mt"), "--images", "nope"])
    with pytest.raises(SystemExit, match="no image_metrics.json"):
        main([str(tmp_path / "empty"), "--images", "free"])
