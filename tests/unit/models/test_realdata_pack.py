"""``valve-model realdata pack``: a smaller copy of a dataset that cuts the same tiles, on made-up data.

The GPU runs of docs/results.md trained from such a copy (the raw KolektorSDD is larger than what travels
to the lent machine), so the copy must give the tiles of the originals exactly, pixel for pixel.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from models.data import load_samples
from models.errors import DataError
from models.experiments import realdata
from models.recipe import TrainConfig, model_config_for
from models.tiles import TileSpec, write_tiles


@pytest.fixture
def kolektor_like(tmp_path):
    """A KolektorSDD layout: kos01..kos03, two parts each, odd sizes (the 0.5 resize rounds), one crack."""
    root = tmp_path / "data" / "kolektorsdd"
    rng = np.random.default_rng(4)
    for k in (1, 2, 3):
        d = root / f"kos{k:02d}"
        d.mkdir(parents=True)
        for part in (0, 1):
            h, w = 401 + 2 * k, 257 + k
            img = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (5, 5), 0)
            mask = np.zeros((h, w), np.uint8)
            if k == 2 and part == 1:
                img[150:260, 120:125] = 20  # a thin crack, 5 px wide at native resolution
                mask[150:260, 120:125] = 255
            cv2.imwrite(str(d / f"Part{part}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            cv2.imwrite(str(d / f"Part{part}_label.png"), mask)
    return root


def _tiles(folder):
    m = json.loads((folder / "tiles.json").read_text())
    return m, {t["file"]: (t["label"], cv2.imread(str(folder / t["file"]), cv2.IMREAD_UNCHANGED))
               for im in m["images"] for t in im["tiles"]}


def test_a_packed_copy_cuts_the_same_tiles_as_the_originals(kolektor_like, tmp_path, monkeypatch):
    monkeypatch.setitem(realdata.PROTOCOL["kolektorsdd"], "tiles", {"size": 96, "stride": 48, "scale": 0.5})
    realdata.pack(kolektor_like.parent, tmp_path / "packed", ["kolektorsdd"])
    packed = tmp_path / "packed" / "kolektorsdd"
    assert realdata.packed_scale(packed) == 0.5 and realdata.packed_scale(kolektor_like) == 1.0
    assert sorted(p.name for p in (packed / "kos02").iterdir()) == [
        "Part0.png", "Part0_label.png", "Part1.png", "Part1_label.png"]
    assert cv2.imread(str(packed / "kos01" / "Part0.png"), 0).shape == (202, 129)  # round(403/2), round(258/2)
    spec = TileSpec(size=96, stride=48, scale=0.5, labels="mask", min_defect_px=4)
    write_tiles(load_samples(kolektor_like, "kolektorsdd"), tmp_path / "a", spec)
    write_tiles(load_samples(packed, "kolektorsdd"), tmp_path / "b", spec, source_scale=0.5)
    a, ta = _tiles(tmp_path / "a")
    b, tb = _tiles(tmp_path / "b")
    assert ta.keys() == tb.keys() and len(ta) > 12
    assert all(ta[f][0] == tb[f][0] and np.array_equal(ta[f][1], tb[f][1]) for f in ta)
    assert {label for label, _ in ta.values()} == {"good", "defect"}
    assert a["tile_counts"] == b["tile_counts"] and a["spec"] == b["spec"] and b["source_scale"] == 0.5
    # the masks beside the defect tiles too
    for f in ta:
        mf = f.replace(".png", "_mask.png")
        if (tmp_path / "a" / mf).is_file():
            assert np.array_equal(cv2.imread(str(tmp_path / "a" / mf), 0), cv2.imread(str(tmp_path / "b" / mf), 0))


def test_a_copy_at_another_scale_is_resized_by_the_ratio(kolektor_like, tmp_path):
    realdata.pack(kolektor_like.parent, tmp_path / "packed", ["kolektorsdd"])
    m = write_tiles(load_samples(tmp_path / "packed" / "kolektorsdd", "kolektorsdd"), tmp_path / "t",
                    TileSpec(size=48, stride=48, scale=0.25), source_scale=0.5)
    assert (m["images"][0]["height"], m["images"][0]["width"]) == (101, 64)  # 202 x 129 halved once more


def test_a_source_scale_outside_0_1_is_refused(kolektor_like, tmp_path):
    with pytest.raises(DataError, match="source_scale"):
        write_tiles(load_samples(kolektor_like, "kolektorsdd"), tmp_path / "t", TileSpec(), source_scale=2.0)


def test_pack_refuses_to_write_into_an_existing_copy(kolektor_like, tmp_path):
    (tmp_path / "packed" / "kolektorsdd").mkdir(parents=True)
    with pytest.raises(SystemExit, match="exists"):
        realdata.pack(kolektor_like.parent, tmp_path / "packed", ["kolektorsdd"])


def test_head_pool_option_reaches_the_model_and_the_protocol_text():
    cfg = model_config_for(TrainConfig(data="d", out="o", head_pool="mix", width=0.25), ("good", "defect"))
    assert (cfg.head_pool, cfg.width) == ("mix", 0.25)
    assert model_config_for(TrainConfig(data="d", out="o"), ("good", "defect")).head_pool == "gap"
    assert "head_pool" in TrainConfig.LOCKED
    text = realdata.protocol_text("kolektorsdd", "mask", {
        "model": {"preset": "compact", "width": 0.25, "attention": "iam", "head_pool": "mix"},
        "train": {"epochs": 60, "epoch_size": 1024, "batch_size": 32, "schedule": "cosine", "device": "cuda",
                  "device_name": "NVIDIA H200"}})
    assert "width 0.25 (iam, mix head), 60 epochs of 1024" in text and "batch 32" in text
    assert "trained on cuda (NVIDIA H200)" in text and "slice labels from the masks" in text
