"""models.tiles: the paper's slicing of whole images into tiles, tile labels, and image verdicts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from models.data import load_samples
from models.errors import DataError
from models.samples import Sample, SampleSet
from models.tiles import (
    TileSpec,
    average_precision,
    calibrate_threshold,
    cut,
    image_metrics,
    image_scores,
    logit,
    origins,
    pad_to,
    tile_logodds,
    validation_manifest,
    write_tiles,
)


def test_origins_cover_the_axis_with_the_last_tile_flush():
    """Every pixel is in some tile; tiles start every stride and the last one ends at the border."""
    for length in (100, 192, 193, 500, 631):
        o = origins(length, 192, 96)
        assert o[0] == 0 and o[-1] == max(0, length - 192)
        covered = np.zeros(max(length, 192), bool)
        for start in o:
            covered[start:start + 192] = True
        assert covered[:length].all()
        assert all(b - a <= 96 for a, b in zip(o, o[1:], strict=False))


def test_small_images_are_reflect_padded_and_masks_zero_padded():
    """A 100 x 150 image becomes 192 x 192 by reflection (no black border); its mask by zeros."""
    img = np.arange(100 * 150, dtype=np.uint32).reshape(100, 150).astype(np.uint8)
    out = pad_to(img, 192)
    assert out.shape == (192, 192) and np.array_equal(out[:100, :150], img)
    assert np.array_equal(out[100, :150], img[98, :150])  # BORDER_REFLECT_101
    m = pad_to(np.ones((100, 150), bool), 192, mask=True)
    assert m.shape == (192, 192) and m[:100, :150].all() and not m[100:].any() and not m[:, 150:].any()
    tiny = pad_to(np.full((10, 10), 7, np.uint8), 192)  # smaller than half the tile: padded repeatedly
    assert tiny.shape == (192, 192) and (tiny == 7).all()


@pytest.fixture
def toy(tmp_path) -> SampleSet:
    """Two parts: a good 300 x 400 image and a defect image with a 20 x 20 defect at (250, 330)."""
    root = tmp_path / "toy"
    for name in ("good", "crack"):
        (root / name).mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = rng.integers(90, 110, (300, 400)).astype(np.uint8)
    bad = good.copy()
    bad[250:270, 330:350] = 10
    mask = np.zeros_like(bad)
    mask[250:270, 330:350] = 255
    cv2.imwrite(str(root / "good" / "p1__a.png"), good)
    cv2.imwrite(str(root / "crack" / "p2__b.png"), bad)
    cv2.imwrite(str(root / "crack" / "p2__b_mask.png"), mask)
    return load_samples(root, "folders")


def test_mask_labels_mark_only_the_tiles_that_hold_the_defect(toy, tmp_path):
    """With mask labels only the defect image's tiles containing the defect are 'crack'; every tile keeps
    its group prefix; the manifest maps tiles back to their image."""
    m = write_tiles(toy, tmp_path / "t", TileSpec(size=192, stride=96, labels="mask"))
    bad = next(im for im in m["images"] if im["label"] == "crack")
    positive = [(t["y"], t["x"]) for t in bad["tiles"] if t["label"] == "crack"]
    # the defect spans y 250..269, x 330..349: tiles at y 96 (96..287) and 108 (108..299), x 208 (208..399)
    assert positive and all(y <= 250 and y + 192 >= 270 and x <= 330 and x + 192 >= 350 for y, x in positive)
    assert len(bad["tiles"]) == len(origins(300, 192, 96)) * len(origins(400, 192, 96))
    tiles = load_samples(tmp_path / "t", "folders")
    assert {s.group for s in tiles.samples} == {"p1", "p2"}
    assert json.loads((tmp_path / "t" / "tiles.json").read_text())["spec"]["labels"] == "mask"
    masks = [s for s in tiles.samples if s.mask is not None]
    assert all(cv2.imread(str(s.mask), 0).any() == (tiles.classes[s.label] == "crack") for s in masks)


def test_image_labels_give_every_tile_its_images_label(toy, tmp_path):
    """With image labels (no masks used) every tile of the defect image is 'crack'."""
    m = write_tiles(toy, tmp_path / "t", TileSpec(labels="image"))
    bad = next(im for im in m["images"] if im["label"] == "crack")
    assert {t["label"] for t in bad["tiles"]} == {"crack"}


def test_scale_halves_the_image_before_tiling(toy, tmp_path):
    """scale 0.5 tiles the 150 x 200 image: one padded tile per image."""
    m = write_tiles(toy, tmp_path / "t", TileSpec(scale=0.5))
    assert all((im["height"], im["width"], len(im["tiles"])) == (150, 200, 2) for im in m["images"])


def test_a_non_empty_output_folder_is_refused(toy, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_tiles(toy, tmp_path / "t", TileSpec())


def test_cut_returns_tiles_at_their_origins():
    img = np.arange(300 * 400).reshape(300, 400) % 251
    tiles = cut(img.astype(np.uint8), TileSpec(size=192, stride=192))
    assert [(y, x) for y, x, _ in tiles] == [(0, 0), (0, 192), (0, 208), (108, 0), (108, 192), (108, 208)]
    y, x, t = tiles[4]
    assert np.array_equal(t, img[108:300, 192:384].astype(np.uint8))


def test_image_verdict_is_the_most_defective_tile():
    """An image is defective when any tile's 1 - p(good) reaches 0.5, of that tile's best defect class;
    its AP score is the largest defect probability."""
    manifest = {"classes": ["good", "crack", "hole"], "images": [
        {"source": "a", "label": "good", "tiles": [{"file": "a1"}, {"file": "a2"}]},
        {"source": "b", "label": "hole", "tiles": [{"file": "b1"}, {"file": "b2"}]},
        {"source": "c", "label": "crack", "tiles": [{"file": "c1"}]}]}
    probs = {"a1": np.array([0.9, 0.05, 0.05]), "a2": np.array([0.6, 0.3, 0.1]),
             "b1": np.array([0.95, 0.05, 0.0]), "b2": np.array([0.2, 0.1, 0.7]),
             "c1": np.array([0.55, 0.4, 0.05])}
    s = image_scores(manifest, probs)
    assert [r["pred"] for r in s["images"]] == [0, 2, 0]
    assert [round(r["defect_score"], 2) for r in s["images"]] == [0.4, 0.8, 0.45]
    m = image_metrics(s)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["recall"]["crack"] == 0.0
    assert m["defect_ap"] == pytest.approx(average_precision([0.4, 0.8, 0.45], [False, True, True]))


def test_average_precision_matches_a_worked_example():
    """Scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AP = 1 * 0.5 + 2/3 * 0.5 = 0.8333."""
    assert average_precision([0.9, 0.8, 0.7, 0.1], [True, False, True, False]) == pytest.approx(5 / 6)
    assert average_precision([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie is one threshold
    assert average_precision([0.3], [False]) is None


def test_kolektorsdd_pairs_stay_in_one_group_on_made_up_data(tmp_path):
    """The tiles of kos01 and kos26 (the same physical part) carry one group, so no split can part them."""
    from models.real_data import kolektor_group

    samples = []
    for folder in ("kos01", "kos26", "kos02"):
        d = tmp_path / folder
        d.mkdir()
        cv2.imwrite(str(d / "Part0.jpg"), np.full((250, 200), 100, np.uint8))
        samples.append(Sample(path=d / "Part0.jpg", label=0, group=kolektor_group(folder)))
    data = SampleSet(root=tmp_path, format="kolektorsdd", classes=("good", "defect"), samples=tuple(samples))
    write_tiles(data, tmp_path / "t", TileSpec())
    groups = {s.path.name.split("__")[0]: s.group for s in load_samples(tmp_path / "t", "folders").samples}
    assert groups["kos01+kos26"] == "kos01+kos26" and len(set(groups.values())) == 2


def test_stitched_masks_score_the_defect_image_against_its_true_mask(toy, tmp_path):
    """A trained-free compact model on the toy tiles: every row of the segmentation table is scored on the
    one defective image, IoUs lie in [0, 1] and eq. 18 is at least half the background IoU."""
    import torch

    from models.checkpoint import save_weights
    from models.ira_cnn import build_model, preset_config
    from models.tiles import SEGMENTATION_ROWS, image_segmentation, read_tiles_manifest

    write_tiles(toy, tmp_path / "t", TileSpec())
    manifest = read_tiles_manifest(tmp_path / "t")
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_weights(run / "model.safetensors", build_model(preset_config("compact", classes=("good", "crack"))))
    # every tile flagged as crack, so each row has masks to score
    probs = {t["file"]: np.array([0.1, 0.9]) for im in manifest["images"] for t in im["tiles"]}
    seg = image_segmentation(run, tmp_path / "t", manifest, probs)
    assert seg["images"] == 1 and set(seg["rows"]) == {f"{s}/{m}" for s, m in SEGMENTATION_ROWS}
    for row in seg["rows"].values():
        assert 0.0 <= row["defect_iou"] <= 1.0 and 0.0 <= row["miou_paper"] <= 1.0
    # a perfect predictor would reach 1: the true mask put back from the tiles is the 20 x 20 square
    from models.images import read_mask
    back = np.zeros((300, 400), bool)
    im = next(im for im in manifest["images"] if im["label"] == "crack")
    for t in im["tiles"]:
        mp = tmp_path / "t" / t["file"].replace(".png", "_mask.png")
        if mp.is_file():
            back[t["y"]:t["y"] + 192, t["x"]:t["x"] + 192] |= read_mask(mp)
    assert back.sum() == 400 and back[250:270, 330:350].all()


def _scored(odds_defect, odds_good):
    images = ([{"true": 1, "defect_logodds": s} for s in odds_defect]
              + [{"true": 0, "defect_logodds": s} for s in odds_good])
    return {"classes": ["good", "defect"], "images": images}


def test_calibrated_threshold_separates_validation_images_worked_example():
    """Good images at log-odds 1-3 (every one flagged by the 0.5 rule, log-odds 0), defective ones at 5-40:
    the best bound lies between 3 and 5, the midpoint 4, and flags all defective and no good image."""
    cal = calibrate_threshold(_scored([5.0, 20.0, 40.0], [1.0, 2.0, 3.0, 3.0]))
    assert cal["threshold_logodds"] == pytest.approx(4.0)
    assert cal["threshold"] == pytest.approx(1 / (1 + np.exp(-4.0)))
    assert cal["balanced_accuracy"] == 1.0 and cal["at_0.5"] == 0.5
    assert (cal["images"], cal["defect_images"]) == (7, 3)
    assert (cal["good_max"], cal["defect_min"]) == (3.0, 5.0)


def test_calibrated_threshold_ties_go_to_the_candidate_nearest_0_5():
    """Perfectly separated at any bound in (-2, 1]: log-odds 0 (p = 0.5) itself is a candidate and stays."""
    assert calibrate_threshold(_scored([1.0, 9.0], [-5.0, -2.0]))["threshold_logodds"] == 0.0
    # one kind of image only: nothing to calibrate against
    assert calibrate_threshold(_scored([], [-1.0, 2.0]))["threshold"] == 0.5


def test_log_odds_keep_confident_tiles_apart_where_1_minus_p_good_saturates():
    """p(good) = 1e-20 and 1e-30: 1 - p(good) is 1.0 for both in float64, the log-odds are 46.05 and 69.08."""
    p = np.array([[1e-20, 1 - 1e-20], [1e-30, 1 - 1e-30], [0.5, 0.5]])
    assert (1 - p[0, 0]) == (1 - p[1, 0]) == 1.0
    assert tile_logodds(p, 0) == pytest.approx([20 * np.log(10), 30 * np.log(10), 0.0])
    assert logit(0.5) == 0.0 and logit(1.0) == np.inf


def test_the_threshold_moves_the_image_verdict():
    manifest = {"classes": ["good", "defect"], "images": [
        {"source": "a", "label": "good", "tiles": [{"file": "a1"}, {"file": "a2"}]}]}
    probs = {"a1": np.array([0.3, 0.7]), "a2": np.array([0.9, 0.1])}
    assert image_scores(manifest, probs)["images"][0]["pred"] == 1
    assert image_scores(manifest, probs, threshold=0.8)["images"][0]["pred"] == 0
    assert image_scores(manifest, probs, threshold_logodds=np.log(0.7 / 0.3) - 1e-9)["images"][0]["pred"] == 1
    assert image_scores(manifest, probs, threshold_logodds=np.log(0.7 / 0.3) + 1e-9)["images"][0]["pred"] == 0


def test_validation_manifest_keeps_only_the_runs_validation_images(toy, tmp_path):
    m = write_tiles(toy, tmp_path / "t", TileSpec(labels="mask"))
    val_image = m["images"][1]
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"val": [t["file"] for t in val_image["tiles"]], "train": []}))
    v = validation_manifest(run, tmp_path / "t")
    assert [im["source"] for im in v["images"]] == [val_image["source"]]
    with pytest.raises(DataError, match="split.json"):
        validation_manifest(tmp_path, tmp_path / "t")


def test_tile_probabilities_are_cached_until_the_weights_change(toy, tmp_path):
    """The second call reads the run's tile-probs file (float64, rows summing to 1); new weights are not
    served from the old file."""
    import os

    import torch

    from models.checkpoint import save_weights
    from models.ira_cnn import build_model, preset_config
    from models.tiles import read_tiles_manifest, tile_probabilities

    write_tiles(toy, tmp_path / "t", TileSpec())
    manifest = read_tiles_manifest(tmp_path / "t")
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_weights(run / "model.safetensors", build_model(preset_config("compact", classes=("good", "crack"))))
    first = tile_probabilities(run, tmp_path / "t", manifest)
    cached = list(run.glob("tile-probs-*.npz"))
    assert len(cached) == 1 and all(v.dtype == np.float64 and abs(v.sum() - 1) < 1e-12 for v in first.values())
    again = tile_probabilities(run, tmp_path / "t", manifest)
    assert all(np.array_equal(first[f], again[f]) for f in first)
    torch.manual_seed(1)
    save_weights(run / "model.safetensors", build_model(preset_config("compact", classes=("good", "crack"))))
    st = (run / "model.safetensors").stat()
    os.utime(run / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime
    fresh = tile_probabilities(run, tmp_path / "t", manifest)
    assert not all(np.allclose(first[f], fresh[f]) for f in first)
    assert all(np.array_equal(fresh[f], tile_probabilities(run, tmp_path / "t", manifest, cache=False)[f])
               for f in fresh)
