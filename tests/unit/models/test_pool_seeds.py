"""tools/pool_seeds.py: the seeds of one recipe from several summary files, pooled into one mean ± std."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.experiments.realdata import mean_std
from tools.pool_seeds import main, pool


def summary(path, seeds, aps, protocol="recipe A", test_images=806):
    mode = {"protocol": protocol, "seeds": seeds, "test_images": test_images,
            "ap": mean_std(aps), "accuracy_calibrated": mean_std([0.7 + a / 10 for a in aps]),
            "defect_iou": mean_std([None] * len(seeds)),
            "best_epochs": [10 + s for s in seeds]}
    path.write_text(json.dumps({"magnetic-tile": {"label_modes": {"mask": mode}}}))
    return path


def test_seeds_from_two_files_pool_into_one_mean_and_sample_std(tmp_path, capsys):
    a = summary(tmp_path / "a.json", [0, 1], [0.52, 0.49])
    b = summary(tmp_path / "b.json", [2], [0.40])
    out = tmp_path / "pooled.json"
    assert main([str(a), str(b), "--dataset", "magnetic-tile", "--json", str(out)]) == 0
    pooled = json.loads(out.read_text())
    assert pooled["seeds"] == [0, 1, 2]
    assert pooled["sources"] == [str(a), str(a), str(b)]
    assert pooled["ap"]["values"] == [0.52, 0.49, 0.40]
    assert pooled["ap"]["mean"] == pytest.approx(np.mean([0.52, 0.49, 0.40]))
    assert pooled["ap"]["std"] == pytest.approx(np.std([0.52, 0.49, 0.40], ddof=1))
    assert pooled["best_epochs"] == [10, 11, 12]
    assert pooled["defect_iou"]["mean"] is None
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| 0, 1, 2 | ")
    assert f"{np.mean([0.52, 0.49, 0.40]):.3f} ± {np.std([0.52, 0.49, 0.40], ddof=1):.3f}" in row


def test_files_of_different_recipes_or_test_sets_or_a_seed_twice_are_refused(tmp_path):
    a = summary(tmp_path / "a.json", [0, 1], [0.52, 0.49])
    with pytest.raises(SystemExit, match="different recipes"):
        pool([a, summary(tmp_path / "b.json", [2], [0.4], protocol="recipe B")], "magnetic-tile", "mask")
    with pytest.raises(SystemExit, match="not the same test set"):
        pool([a, summary(tmp_path / "c.json", [2], [0.4], test_images=800)], "magnetic-tile", "mask")
    with pytest.raises(SystemExit, match="seed 1 is in"):
        pool([a, summary(tmp_path / "d.json", [1], [0.4])], "magnetic-tile", "mask")
    with pytest.raises(SystemExit, match="no 'kolektorsdd' entry"):
        pool([a], "kolektorsdd", "mask")
    with pytest.raises(SystemExit, match="no 'image' labels"):
        pool([a], "magnetic-tile", "image")


OLD = ("192x192 tiles (slice labels from the masks); IRA-CNN compact width 0.125, 100 epochs, cosine lr, "
       "stem init identity, BN recalibration, weights on balanced validation accuracy; trained on cpu")


def test_a_text_from_before_the_augmentation_clause_pools_with_the_default_augmentation_only(tmp_path):
    """Summaries written before realdata named the augmentation trained with the then fixed jitter (flips, +-10,
    +-0.1): they pool with a run that names exactly that, and not with one that trained with another."""
    default = OLD.replace("BN recalibration", "augmentation flips, brightness +-10, contrast +-0.1, BN recalibration")
    a = summary(tmp_path / "a.json", [0, 1], [0.52, 0.49], protocol=OLD)
    b = summary(tmp_path / "b.json", [2], [0.40], protocol=default)
    pooled = pool([a, b], "magnetic-tile", "mask")
    assert pooled["seeds"] == [0, 1, 2] and pooled["protocol"] == default
    assert pooled["augmentation_read_as_legacy"] == [str(a)]
    stronger = default.replace("brightness +-10, contrast +-0.1", "brightness +-25, contrast +-0.25")
    with pytest.raises(SystemExit, match="different recipes"):
        pool([a, summary(tmp_path / "c.json", [2], [0.40], protocol=stronger)], "magnetic-tile", "mask")
    assert "augmentation_read_as_legacy" not in pool([b], "magnetic-tile", "mask")
