"""``valve-model realdata``'s training step (``train_run``, shared with ``valve-model unknown loco``): which
command it starts for a run folder, by what the folder holds (the training itself is replaced by a recorder)."""

from __future__ import annotations

import json

import pytest

from models.experiments import realdata


def test_train_run_starts_resumes_or_skips_a_run_by_what_it_holds(tmp_path, monkeypatch):
    """realdata.train_run (shared by realdata train and unknown loco): a new run gets the protocol's recipe,
    a stopped one is resumed to the protocol's epochs, a complete one (all epochs and its bn_check) is left."""
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train",
                        {"preset": "compact", "epochs": 3, "batch_size": 8, "epoch_size": 64})
    calls = []

    def fake_call(cmd, **kwargs):
        calls.append(cmd)
        assert kwargs["env"]["OMP_NUM_THREADS"] == "1"
        return 0

    monkeypatch.setattr(realdata.subprocess, "call", fake_call)
    out = tmp_path / "mt" / "seed4"
    realdata.train_run(tmp_path / "tiles", out, 4, "magnetic-tile", 1, "cpu")
    cmd = calls[-1]
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "tiles") and cmd[cmd.index("--seed") + 1] == "4"
    assert [cmd[cmd.index(f"--{k}") + 1] for k in ("preset", "epochs", "batch-size", "epoch-size")] == \
        ["compact", "3", "8", "64"]
    assert (tmp_path / "mt" / "seed4.log").read_text().startswith("$ ")
    realdata.train_run(tmp_path / "tiles", tmp_path / "mt" / "seed5", 5, "magnetic-tile", 1, "cpu",
                       changes={"rot90": True, "brightness": 25.0})
    assert "--rot90" in calls[-1] and calls[-1][calls[-1].index("--brightness") + 1] == "25.0"
    realdata.train_run(tmp_path / "tiles", tmp_path / "mt" / "seed6", 6, "magnetic-tile", 1, "cpu",
                       changes={"rot90": False})
    assert "--no-rot90" in calls[-1] and "False" not in calls[-1]
    realdata.train_run(tmp_path / "tiles", tmp_path / "mt" / "seed7", 7, "magnetic-tile", 1, "cpu",
                       changes={"ema": 0.99})
    assert calls[-1][calls[-1].index("--ema") + 1] == "0.99"

    out.mkdir(parents=True)
    (out / "train_state.pt").write_bytes(b"")
    (out / "config.json").write_text(json.dumps({"train": {}}))
    (out / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    realdata.train_run(tmp_path / "tiles", out, 4, "magnetic-tile", 1, "cpu")
    assert "--resume" in calls[-1] and calls[-1][calls[-1].index("--epochs") + 1] == "3"
    assert "--data" not in calls[-1]

    (out / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    realdata.train_run(tmp_path / "tiles", out, 4, "magnetic-tile", 1, "cpu")
    assert "--resume" in calls[-1] and len(calls) == 6  # all epochs but no bn_check yet: resumed (it writes it)
    (out / "config.json").write_text(json.dumps({"train": {}, "bn_check": {"gap_points": 0.0}}))
    assert realdata.train_run(tmp_path / "tiles", out, 4, "magnetic-tile", 1, "cpu") == 0.0
    assert len(calls) == 6  # complete: nothing started

    monkeypatch.setattr(realdata.subprocess, "call", lambda cmd, **kw: 2)
    with pytest.raises(SystemExit, match="failed"):
        realdata.train_run(tmp_path / "tiles", tmp_path / "other" / "seed0", 0, "magnetic-tile", 1, "cpu")


def test_a_recorded_command_repeats_the_options_the_call_was_given():
    """The generated section's command names the datasets, labels, seeds and recipe overrides it was called
    with (and nothing that is the default), so running it again reads the same runs the same way."""
    parse = realdata.build_parser().parse_args
    assert realdata.given_options(parse(["summary"])) == ""
    args = parse(["summary", "--datasets", "magnetic-tile", "--labels", "mask", "--seeds", "0,1,2", "--epochs", "100",
                  "--rot90", "--contrast", "0.25"])
    assert realdata.given_options(args) == (" --datasets magnetic-tile --labels mask --epochs 100 --rot90 "
                                            "--contrast 0.25")
    assert realdata.given_options(parse(["summary", "--seeds", "0,1", "--no-rot90"])) == " --seeds 0,1 --no-rot90"
    assert realdata.given_options(parse(["train", "--ema", "0.99"])) == " --ema 0.99"


def test_the_protocol_text_names_the_augmentation_the_run_recorded():
    plain = {"augment": True, "augmentation": {"hflip": True, "vflip": True, "brightness": 10.0, "contrast": 0.1}}
    assert realdata.augmentation_text(plain) == "augmentation flips, brightness +-10, contrast +-0.1, "
    strong = {"augmentation": {"brightness": 25.0, "contrast": 0.25, "rot90": True}}
    assert "flips and transposes (8 symmetries), brightness +-25, contrast +-0.25" in realdata.augmentation_text(strong)
    assert realdata.augmentation_text({"augment": False, "augmentation": None}) == "no augmentation, "
    text = realdata.protocol_text("magnetic-tile", "mask", {"train": strong, "model": {}})
    assert "transposes" in text and "weight average" not in text
    assert "an exponential weight average (decay 0.99), " in realdata.protocol_text(
        "magnetic-tile", "mask", {"train": {**strong, "ema": 0.99}, "model": {}})


def test_the_ablation_refuses_before_training_a_call_whose_augmentation_differs_from_the_runs(tmp_path, monkeypatch):
    """planned_differences (checked before the ablation trains the next variant): a run trained with --rot90 and
    --brightness 25 against a call without them, and the other way round; an older run without the keys reads
    as the defaults; matching calls find nothing."""
    from models.experiments.realdata_ablation import planned_differences

    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train", {"preset": "compact", "epochs": 3})
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"epochs": 3, "rot90": True, "brightness": 25.0,
                                                           "contrast": 0.1}}))
    assert planned_differences(run, "magnetic-tile") == ["--no-rot90 (the run: --rot90)",
                                                         "--brightness 10.0 (the run: --brightness 25.0)"]
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train",
                        {"preset": "compact", "epochs": 3, "rot90": True, "brightness": 25})
    assert planned_differences(run, "magnetic-tile") == []
    (run / "config.json").write_text(json.dumps({"train": {"epochs": 3}}))  # from before the options
    assert planned_differences(run, "magnetic-tile")[0] == "--rot90 (the run: --no-rot90)"
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"], "train", {"preset": "compact", "epochs": 3, "ema": 0.99})
    assert "--ema 0.99 (the run: --ema 0.0)" in planned_differences(run, "magnetic-tile")


def test_a_recorded_option_with_a_space_is_quoted():
    args = realdata.build_parser().parse_args(["summary", "--seeds", "0, 1"])
    assert realdata.given_options(args) == " --seeds '0, 1'"


def test_the_summary_holds_only_the_datasets_and_label_modes_its_command_names(tmp_path):
    """`realdata summary --datasets magnetic-tile --labels mask` summarises those runs only, though others lie
    under the same --runs (it used to read every dataset and label mode there)."""
    per_image = [{"source": "g", "true": 0, "defect_logodds": -2.0}, {"source": "d", "true": 1, "defect_logodds": 3.0}]
    metrics = {"accuracy": 1.0, "balanced_accuracy": 1.0, "ap": 1.0, "defect_vs_good_accuracy": 1.0, "images": 2,
               "per_image": per_image}
    for dataset, classes in (("kolektorsdd", ["good", "defect"]), ("magnetic-tile", ["good", "blowhole"])):
        for labels in realdata.LABEL_MODES:
            run = realdata.run_dir(tmp_path, dataset, labels, 0)
            run.mkdir(parents=True)
            (run / "image_metrics.json").write_text(json.dumps(metrics))
            (run / "config.json").write_text(json.dumps({"model": {"classes": classes}, "train": {}}))
    everything = realdata.summarise(tmp_path, [0])
    assert set(everything) == {"kolektorsdd", "magnetic-tile"}
    assert all(set(v["label_modes"]) == set(realdata.LABEL_MODES) for v in everything.values())
    named = realdata.summarise(tmp_path, [0], ["magnetic-tile"], ["mask"])
    assert set(named) == {"magnetic-tile"} and set(named["magnetic-tile"]["label_modes"]) == {"mask"}
    assert named["magnetic-tile"]["label_modes"]["mask"] == everything["magnetic-tile"]["label_modes"]["mask"]
    image_only = realdata.summarise(tmp_path, [0], None, ["image"])
    assert set(image_only) == {"kolektorsdd", "magnetic-tile"}
    assert all(set(v["label_modes"]) == {"image"} for v in image_only.values())
    mil_only = realdata.summarise(tmp_path, [0], ["kolektorsdd"], ["mil"])  # a summary of mil runs alone
    assert set(mil_only["kolektorsdd"]["label_modes"]) == {"mil"} and mil_only["kolektorsdd"]["ap"]["mean"] == 1.0


def test_unknown_dataset_or_label_names_and_an_empty_summary_are_refused(tmp_path):
    """A misspelt --datasets/--labels name stops the command naming the choices (it used to summarise nothing and
    overwrite the docs section with it); a summary without one scored run writes nothing."""
    doc = tmp_path / "results.md"
    doc.write_text("kept\n")
    base = ["summary", "--runs", str(tmp_path / "runs"), "--summary", str(tmp_path / "s.json"), "--doc", str(doc)]
    for option, value in (("--datasets", "magnetic_tile"), ("--labels", "masks"), ("--datasets", " , ")):
        with pytest.raises(SystemExit, match=rf"{option} .*give one or more of"):
            realdata.main([*base, option, value])
    with pytest.raises(SystemExit, match="no scored runs under .* nothing written"):
        realdata.main([*base, "--datasets", " magnetic-tile", "--labels", "mask "])
    assert doc.read_text() == "kept\n" and not (tmp_path / "s.json").exists()


def test_the_mil_label_mode_trains_on_the_image_tiles_with_the_selection(tmp_path, monkeypatch):
    """--labels mil reads the image-labelled tiles (no second copy) and trains them with --mil and its warm-up;
    the protocol text says so."""
    assert realdata.tiles_dir(tmp_path, "kolektorsdd", "mil", "train") == \
        realdata.tiles_dir(tmp_path, "kolektorsdd", "image", "train")
    assert realdata.run_dir(tmp_path, "kolektorsdd", "mil", 0) != realdata.run_dir(tmp_path, "kolektorsdd", "image", 0)
    for labels in realdata.LABEL_MODES:  # what the diagnostic tools read beside a run folder
        run = realdata.run_dir(tmp_path, "magnetic-tile", labels, 3)
        assert realdata.run_tiles(run, "test") == realdata.tiles_dir(tmp_path, "magnetic-tile", labels, "test")
    assert "mil" not in realdata.build_parser().parse_args(["train"]).labels  # on request only
    calls = []

    def fake_call(cmd, **kwargs):  # the training, replaced: its run folder is all it leaves
        calls.append(cmd)
        (tmp_path / cmd[cmd.index("--out") + 1]).mkdir(parents=True, exist_ok=True)
        return 0

    monkeypatch.setattr(realdata.subprocess, "call", fake_call)
    import models.tiles

    monkeypatch.setattr(models.tiles, "evaluate_images", lambda *a, **k: {"accuracy": 1.0})
    for dataset in ("kolektorsdd", "magnetic-tile"):
        realdata.train_one(dataset, "mil", 0, tmp_path, 1, "cpu")
        cmd = calls[-1]
        assert cmd[cmd.index("--data") + 1] == str(realdata.tiles_dir(tmp_path, dataset, "image", "train"))
        assert cmd[cmd.index("--mil") + 1] == str(realdata.MIL_TOP[dataset])
        assert cmd[cmd.index("--mil-warmup") + 1] == str(realdata.MIL_WARMUP)
    realdata.train_one("kolektorsdd", "image", 0, tmp_path, 1, "cpu")
    assert "--mil" not in calls[-1]
    text = realdata.protocol_text("kolektorsdd", "mil", {"train": {"mil": 2}, "model": {}})
    assert "multiple-instance training" in text and "(2 a defective image)" in text
