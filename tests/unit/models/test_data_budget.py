"""tools/data_budget.py: images and tiles per class on each side of a run's split, from its manifests."""

from __future__ import annotations

import json

import pytest

from tools.data_budget import budget, main


def manifest(images):
    return {"classes": ["good", "crack"], "spec": {"labels": "mask"}, "images": images}


def image(source, label, tiles):
    return {"source": source, "label": label, "tiles": [{"file": f, "label": t} for f, t in tiles]}


@pytest.fixture
def run(tmp_path):
    runs = tmp_path / "runs"
    train = runs / "tiles" / "mt-mask" / "train"
    test = runs / "tiles" / "mt-mask" / "test"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    (train / "tiles.json").write_text(json.dumps(manifest([
        image("a", "crack", [("a0", "crack"), ("a1", "good")]),
        image("b", "good", [("b0", "good")]),
        image("c", "crack", [("c0", "crack"), ("c1", "crack")]),
    ])))
    (test / "tiles.json").write_text(json.dumps(manifest([image("d", "good", [("d0", "good"), ("d1", "good")])])))
    out = runs / "mt-mask" / "seed0"
    out.mkdir(parents=True)
    (out / "split.json").write_text(json.dumps({"train": ["a0", "a1", "b0"], "val": ["c0", "c1"]}))
    return out


def test_counts_images_and_tiles_per_class_and_side(run, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main([str(run), "--json", str(out)]) == 0
    rows = {r["class"]: r for r in json.loads(out.read_text())["rows"]}
    assert (rows["crack"]["train_images"], rows["crack"]["train_tiles"]) == (1, 1)
    assert (rows["good"]["train_images"], rows["good"]["train_tiles"]) == (1, 2)  # b, and a's clean tile
    assert (rows["crack"]["val_images"], rows["crack"]["val_tiles"]) == (1, 2)
    assert (rows["good"]["test_images"], rows["good"]["test_tiles"]) == (1, 2)
    assert "| crack | 1 (1) | 1 (2) | 0 (0) |" in capsys.readouterr().out


def test_a_split_that_is_not_grouped_or_a_run_without_its_tiles_is_refused(run, tmp_path):
    (run / "split.json").write_text(json.dumps({"train": ["a0", "b0", "c0"], "val": ["a1", "c1"]}))
    with pytest.raises(SystemExit, match="both sides of the split"):
        budget(run)
    with pytest.raises(SystemExit, match="tiles.json not found"):
        budget(tmp_path / "elsewhere" / "mt-mask" / "seed0")
