"""``valve-model unknown loco`` on a made-up Magnetic-tile layout: the held-out class never reaches the training,
the record holds what the docs read, and a glaringly new class is found by the feature score.

The trainings are tiny (one epoch of 32 draws): this tests the protocol's plumbing and the score's arithmetic,
not the figures of docs/results.md.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from models.experiments import realdata
from models.unknown import build_parser
from models.unknown.frames import UnknownError
from models.unknown.loco import run, without_class


def test_loco_leaves_the_class_out_and_finds_a_glaring_one(mt_like, tiny_protocol, tmp_path):
    runs = tmp_path / "runs"
    argv = ["loco", "--classes", "fray", "--seeds", "0", "--runs", str(runs), "--data-root", str(mt_like.parent),
            "--threads", "1", "--json", str(tmp_path / "loco.json"), "--doc", str(tmp_path / "results.md")]
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    result = run(args)

    # the held-out run never saw a tile of a fray image, and does not know the class
    out = runs / "magnetic-tile-mask-without-fray" / "seed0"
    cfg = json.loads((out / "config.json").read_text())
    assert "fray" not in cfg["model"]["classes"] and len(cfg["model"]["classes"]) == 5
    split = json.loads((out / "split.json").read_text())
    assert split["train"] and not any("fray" in f for f in split["train"] + split["val"])
    full = json.loads((runs / "tiles" / "magnetic-tile-mask" / "train" / "tiles.json").read_text())
    assert any(im["label"] == "fray" for im in full["images"])  # ... while the reference's tiles hold fray images
    ref_cfg = json.loads((runs / "magnetic-tile-mask" / "seed0" / "config.json").read_text())
    assert "fray" in ref_cfg["model"]["classes"]

    rec = result["records"][0]
    assert rec["held_out"] == "fray" and rec["test_images"]["held_out"] > 0 and rec["test_images"]["good"] > 0
    # a saturated white disc is unlike every training tile in the blocks' [GAP, GMP] features, even after one epoch
    assert rec["auroc_vs_good"]["mahalanobis"] >= 0.9
    for k in ("energy", "max_softmax", "defect_logodds"):
        assert 0.0 <= rec["auroc_vs_good"][k] <= 1.0
    # the threshold was calibrated on the good validation images at the stated rate
    t = rec["mahalanobis_threshold"]
    assert t["validation_good_images"] > 0 and t["validation_good_flagged"] <= t["rate"]
    ka = rec["known_accuracy"]
    assert 0.0 <= ka["held_out_run"] <= 1.0 and 0.0 <= ka["reference"] <= 1.0
    assert rec["held_out_not_accepted"]["either"] >= max(rec["held_out_not_accepted"]["as_a_known_defect"],
                                                          rec["flagged"]["held_out"])

    written = json.loads((tmp_path / "loco.json").read_text())
    assert written["summary"]["per_class"]["fray"]["auroc_mahalanobis"]["mean"] == rec["auroc_vs_good"]["mahalanobis"]
    doc = (tmp_path / "results.md").read_text()
    assert "<!-- BEGIN unknown-loco -->" in doc and "| fray |" in doc and "valve-model unknown loco" in doc

    # a second call trains nothing and gives the same record (the cached features and runs)
    again = run(args)
    assert again["records"][0]["auroc_vs_good"] == rec["auroc_vs_good"]
    assert again["records"][0]["train_wall_s"] == 0.0


def test_without_class_drops_every_tile_of_the_class_images(tmp_path):
    src = tmp_path / "src"
    images = []
    for label, tiles in (("good", ["good"]), ("fray", ["good", "fray"]), ("crack", ["crack", "good"])):
        im = {"source": f"{label}.jpg", "label": label, "tiles": []}
        for j, t in enumerate(tiles):
            f = f"{t}/{label}-{j}.png"
            (src / t).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(src / f), np.zeros((4, 4), np.uint8))
            im["tiles"].append({"file": f, "label": t})
        images.append(im)
    (src / "tiles.json").write_text(json.dumps({"format": "valve-inspect/tiles/1", "classes": ["good", "crack", "fray"],
                                                "images": images}))
    m = without_class(src, tmp_path / "dst", "fray")
    assert m["classes"] == ["good", "crack"] and m["left_out"] == "fray"
    kept = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*.png"))
    assert kept == ["crack/crack-0.png", "good/crack-1.png", "good/good-0.png"]  # fray's good tile went too
    assert m["tile_counts"] == {"good": 2, "crack": 1}
    with pytest.raises(UnknownError, match="good class"):
        without_class(src, tmp_path / "x", "good")
    with pytest.raises(UnknownError, match="not in"):
        without_class(src, tmp_path / "x", "dent")


def test_loco_refuses_a_dataset_with_one_defect_class_and_unknown_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(realdata, "make_tiles", lambda *a: None)
    train = realdata.tiles_dir(tmp_path, "kolektorsdd", "mask", "train")
    train.mkdir(parents=True)
    (train / "tiles.json").write_text(json.dumps({"format": "valve-inspect/tiles/1", "classes": ["good", "defect"],
                                                  "images": []}))
    args = build_parser().parse_args(["loco", "--dataset", "kolektorsdd", "--runs", str(tmp_path)])
    args.argv = []
    with pytest.raises(UnknownError, match="at least two"):
        run(args)
    args = build_parser().parse_args(["loco", "--dataset", "nope", "--runs", str(tmp_path)])
    args.argv = []
    with pytest.raises(UnknownError, match="--dataset 'nope'"):
        run(args)


def test_a_held_out_run_with_another_recipe_or_other_tiles_is_refused(tmp_path):
    from models.unknown.loco import check_same_recipe, check_trained_on

    model = {"preset": "compact", "width": 0.125, "head_pool": "gap", "classes": ["good", "a", "b"]}
    train = {"epochs": 20, "batch_size": 16, "epoch_size": 768, "seed": 0, "stem_init": "identity", "head_pool": None}
    ref, held = tmp_path / "ref", tmp_path / "held"
    for d, m, t in ((ref, model, {**train, "head_pool": "gap"}), (held, {**model, "classes": ["good", "a"]}, train)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": m, "train": t}))
    check_same_recipe(held, ref)  # classes differ, and head_pool is given in one train section only: same recipe
    (held / "config.json").write_text(json.dumps({"model": {**model, "width": 0.25}, "train": {**train, "epochs": 10}}))
    with pytest.raises(UnknownError, match=r"train\.epochs, model\.width"):
        check_same_recipe(held, ref)

    folder = tmp_path / "tiles"
    folder.mkdir()
    (folder / "tiles.json").write_text(json.dumps({"format": "valve-inspect/tiles/1", "classes": ["good", "a"],
                                                   "images": [{"label": "good", "tiles": [{"file": "good/x.png"}]},
                                                              {"label": "a", "tiles": [{"file": "a/y.png"}]}]}))
    check_trained_on(held, folder)  # no split yet: nothing trained
    (held / "split.json").write_text(json.dumps({"train": ["good/x.png"], "val": ["a/y.png"]}))
    check_trained_on(held, folder)
    (held / "split.json").write_text(json.dumps({"train": ["good/x.png", "b/z.png"], "val": ["a/y.png"]}))
    with pytest.raises(UnknownError, match="other tiles"):
        check_trained_on(held, folder)


def test_loco_takes_every_recipe_override_of_realdata_and_checks_them_before_cutting_tiles(tiny_protocol, tmp_path,
                                                                                            monkeypatch):
    # the held-out runs must be trained as their reference: every option realdata's recipe has, loco has
    given = {"epochs": "3", "epoch-size": "64", "batch-size": "8", "channels": "4,8,16,32", "head-pool": "mix",
             "brightness": "25", "contrast": "0.25", "ema": "0.99", "bn-draws": "balanced"}
    argv = ["loco", "--runs", str(tmp_path / "runs"), "--rot90"] + [x for k, v in given.items() for x in (f"--{k}", v)]
    assert {k.replace("-", "_") for k in given} | {"rot90"} >= set(realdata.OVERRIDES) - {"width"}

    def stop(*_a, **_k):
        raise RuntimeError("tiles")

    monkeypatch.setattr(realdata, "make_tiles", stop)
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train", dict(realdata.PROTOCOL["magnetic-tile"]["train"]))
    args = build_parser().parse_args(argv)
    with pytest.raises(RuntimeError, match="tiles"):
        run(args)
    train = realdata.PROTOCOL["magnetic-tile"]["train"]
    assert (train["epochs"], train["epoch_size"], train["batch_size"], train["head_pool"]) == (3, 64, 8, "mix")
    assert (train["rot90"], train["brightness"], train["contrast"], train["ema"]) == (True, 25.0, 0.25, 0.99)
    assert train["channels"] == "4,8,16,32" and train["bn_draws"] == "balanced"

    with pytest.raises(SystemExit, match="--width and --channels both set"):
        run(build_parser().parse_args(argv + ["--width", "0.25"]))
    with pytest.raises(SystemExit, match="valve-model unknown loco: --channels"):
        run(build_parser().parse_args(["loco", "--runs", str(tmp_path / "runs"), "--channels", "4,8"]))
