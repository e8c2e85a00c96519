"""``models.experiments.realdata.ap_limits``: which test images hold the image-level AP down, per seed.

docs/results.md reads the KolektorSDD shortfall from it (one defective image that every seed ranks below
dozens of good ones), so it must find the image that does it and compute its leave-one-out AP exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.experiments.realdata import ap_limits
from models.metrics import average_precision


def records(scores: dict[str, tuple[int, float]], key: str = "defect_logodds") -> list[dict]:
    return [{"source": name, "true": true, key: score} for name, (true, score) in scores.items()]


def seed_scores(rng: np.random.Generator, low_defect: float, high_good: float) -> dict[str, tuple[int, float]]:
    """20 good images around -5, 6 defective around +8; one defective ("d-hard") and one good ("g-hard")
    placed by the caller."""
    out = {f"g{i:02d}": (0, float(rng.normal(-5, 1))) for i in range(20)}
    out |= {f"d{i:02d}": (1, float(rng.normal(8, 1))) for i in range(6)}
    out["d-hard"] = (1, low_defect)
    out["g-hard"] = (0, high_good)
    return out


def test_the_image_every_seed_ranks_wrong_comes_first_with_its_exact_leave_one_out_ap():
    rng = np.random.default_rng(0)
    seeds = [records(seed_scores(rng, low_defect=-6.5 + s, high_good=6.5 - s)) for s in range(3)]
    found = ap_limits(seeds, good=0, top=2)
    assert [r["image"] for r in found] == ["d-hard", "g-hard"]
    hard = found[0]
    assert hard["defective"] is True
    for rows, full, without, beyond in zip(seeds, hard["ap"], hard["ap_without"], hard["beyond"], strict=True):
        y = np.array([r["true"] == 1 for r in rows])
        s = np.array([r["defect_logodds"] for r in rows])
        keep = np.array([r["source"] != "d-hard" for r in rows])
        assert full == pytest.approx(average_precision(y, s))
        assert without == pytest.approx(average_precision(y[keep], s[keep]))
        assert without > full
        assert beyond == int((s[~y] > s[~keep][0]).sum())  # good images scoring above it
    assert hard["ap_gain"] == pytest.approx(np.mean(np.subtract(hard["ap_without"], hard["ap"])))
    assert found[1]["defective"] is False
    assert found[1]["beyond"][0] == int(sum(1 for r in seeds[0] if r["true"] == 1 and r["defect_logodds"] < 6.5))


def test_a_perfect_ranking_has_no_image_that_raises_the_ap():
    rows = records({"g0": (0, -3.0), "g1": (0, -2.0), "d0": (1, 2.0), "d1": (1, 4.0)})
    found = ap_limits([rows, rows], good=0, top=4)
    assert all(r["ap_gain"] == pytest.approx(0.0) for r in found)
    assert all(r["beyond"] == [0, 0] for r in found)


def test_runs_scored_before_the_log_odds_fall_back_to_the_defect_score_and_a_multiclass_good_index():
    # classes (crack, free, blowhole): good is index 1; both defect classes count as defective
    rows = records({"a": (0, 0.9), "b": (1, 0.95), "c": (2, 0.8), "d": (1, 0.1)}, key="defect_score")
    found = ap_limits([rows], good=1, top=1)
    assert found[0]["image"] == "b" and found[0]["defective"] is False
    assert found[0]["ap_without"] == [pytest.approx(1.0)]


def test_without_both_classes_there_is_nothing_to_rank():
    assert ap_limits([records({"g0": (0, -1.0), "g1": (0, 1.0)})], good=0) == []
    assert ap_limits([], good=0) == []


def test_a_seed_with_one_defective_image_gives_none_not_nan_and_ties_are_counted():
    # seed A: one defective image; leaving it out leaves nothing to rank there
    a = records({"d0": (1, 1.0), "g0": (0, 2.0), "g1": (0, -1.0)})
    b = records({"d0": (1, 3.0), "g0": (0, 2.0), "g1": (0, -1.0), "d1": (1, 5.0)})
    found = ap_limits([a, b], good=0, top=3)
    d0 = next(r for r in found if r["image"] == "d0")
    assert d0["ap_without"][0] is None and d0["ap_without"][1] == pytest.approx(1.0)
    assert d0["ap_gain"] == pytest.approx(1.0 - average_precision(
        np.array([1, 0, 0, 1], bool), np.array([3.0, 2.0, -1.0, 5.0])))
    assert all(np.isfinite(r["ap_gain"]) for r in found)
    assert found[0]["image"] == "g0"  # above d0 in both seeds
    # two good images that score alike everywhere tie
    c = records({"d0": (1, 4.0), "g0": (0, 5.0), "g1": (0, 5.0), "g2": (0, -3.0)})
    tied = ap_limits([c], good=0, top=2)
    assert [r["image"] for r in tied] == ["g0", "g1"] and [r["ties"] for r in tied] == [1, 1]
