"""``valve-model realdata ablation`` on a made-up Magnetic-tile layout: one training per attention variant on the
same tiles, seed and recipe; the summary and the docs section order the variants; runs that do not belong are
refused with the fix.

The trainings are tiny (one epoch of 32 draws): this tests the protocol's plumbing, not the figures of
docs/results.md.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from models.experiments import realdata
from models.experiments.realdata_ablation import AblationError, run_path
from models.experiments.results.protocol import ABLATION


def ablation(tmp_path, data_root, *extra):
    argv = ["ablation", "--datasets", "magnetic-tile", "--seeds", "0", "--runs", str(tmp_path / "runs"),
            "--data-root", str(data_root), "--threads", "1", "--summary", str(tmp_path / "ablation.json"),
            "--doc", str(tmp_path / "results.md"), *extra]
    assert realdata.main(argv) == 0
    return json.loads((tmp_path / "ablation.json").read_text())


def test_each_variant_trains_on_the_same_tiles_and_is_ordered(mt_like, tiny_protocol, tmp_path):
    summary = ablation(tmp_path, mt_like.parent)
    runs = tmp_path / "runs"
    splits = []
    for a in ABLATION:
        out = run_path(runs, a, "magnetic-tile", 0)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model"]["attention"] == a
        assert cfg["data"]["path"] == str(runs / "tiles" / "magnetic-tile-mask" / "train")
        splits.append(json.loads((out / "split.json").read_text()))
        m = json.loads((out / "ablation_metrics.json").read_text())
        assert 0.0 <= m["ap"] <= 1.0 and "accuracy_calibrated" in m
    # the same seed on the same tiles: the same grouped split for every variant
    assert all(s == splits[0] for s in splits[1:])

    e = summary["magnetic-tile"]
    assert set(e["variants"]) == set(ABLATION)
    params = {a: e["variants"][a]["parameters"] for a in ABLATION}
    assert params["none"] < params["iam-no-spatial"] < params["iam"]  # the attention adds parameters
    for a in ABLATION:
        v = e["variants"][a]
        assert v["seeds"] == [0] and v["ap"]["n"] == 1 and v["epochs_run"] == [1]
        m = json.loads((run_path(runs, a, "magnetic-tile", 0) / "ablation_metrics.json").read_text())
        assert v["ap"]["values"] == [m["ap"]]
    assert "the variant's attention" in e["protocol"]
    # one seed: the sentence says the spread is unknown instead of ordering by noise
    assert all("single seed" in e["ordering"][k] for k in ("ap", "accuracy_calibrated"))
    doc = (tmp_path / "results.md").read_text()
    assert "<!-- BEGIN realdata-ablation -->" in doc and "| IAM (`iam`," in doc and "| CBAM (`cbam`," in doc
    # the recorded command repeats the runs' own recipe (the tiny protocol's, read from config.json) and the doc
    assert ("valve-model realdata ablation --datasets magnetic-tile --seeds 0 --epochs 1 --epoch-size 32 "
            "--batch-size 8 --runs ") in doc and f"--doc {os.path.relpath(tmp_path / 'results.md', realdata.REPO)}" in doc
    assert "1 torch thread(s) per training" in doc

    # a second call trains nothing and writes the same summary
    stamps = {a: (run_path(runs, a, "magnetic-tile", 0) / "model.safetensors").stat().st_mtime_ns for a in ABLATION}
    again = ablation(tmp_path, mt_like.parent)
    assert stamps == {a: (run_path(runs, a, "magnetic-tile", 0) / "model.safetensors").stat().st_mtime_ns
                      for a in ABLATION}
    assert again == summary


def test_attentions_split_the_work_and_no_train_reads_what_is_there(mt_like, tiny_protocol, tmp_path):
    with pytest.raises(AblationError, match="no ablation runs under"):
        ablation(tmp_path, mt_like.parent, "--no-train")
    assert not (tmp_path / "ablation.json").exists()
    summary = ablation(tmp_path, mt_like.parent, "--attentions", "none")
    runs = tmp_path / "runs"
    assert (run_path(runs, "none", "magnetic-tile", 0) / "ablation_metrics.json").is_file()
    assert not run_path(runs, "iam", "magnetic-tile", 0).exists()
    assert realdata.PROTOCOL["magnetic-tile"]["train"]["attention"] == "iam"  # the variant's attention is undone
    e = summary["magnetic-tile"]
    assert e["variants"]["none"]["seeds"] == [0] and e["variants"]["iam"]["seeds"] == []
    assert "Fewer than two variants" in e["ordering"]["ap"]
    assert "| IAM (`iam`) | 97.7 | - |" in (tmp_path / "results.md").read_text()
    # --no-train writes the summary without training the missing variants, and names no seed it was not given
    (tmp_path / "ablation.json").unlink()
    again = ablation(tmp_path, mt_like.parent, "--no-train", "--datasets", "kolektorsdd", "--seeds", "5")
    assert again == summary and not run_path(runs, "iam", "magnetic-tile", 0).exists()
    with pytest.raises(AblationError, match="unknown attention 'se'"):
        ablation(tmp_path, mt_like.parent, "--attentions", "se")


def test_figures_older_than_the_weights_are_left_out_and_scored_again(mt_like, tiny_protocol, tmp_path):
    ablation(tmp_path, mt_like.parent, "--attentions", "none")
    none = run_path(tmp_path / "runs", "none", "magnetic-tile", 0)
    m = json.loads((none / "ablation_metrics.json").read_text())
    (none / "ablation_metrics.json").write_text(json.dumps({**m, "epochs_run": 0, "ap": -1.0}))  # scored before
    summary = ablation(tmp_path, mt_like.parent, "--no-train")
    assert summary["magnetic-tile"]["variants"]["none"]["seeds"] == []
    assert summary["magnetic-tile"]["not_scored"] == [str(none)]
    assert "Not in the figures" in (tmp_path / "results.md").read_text()
    stamp = (none / "model.safetensors").stat().st_mtime_ns
    summary = ablation(tmp_path, mt_like.parent, "--attentions", "none")
    assert (none / "model.safetensors").stat().st_mtime_ns == stamp  # scored again, not retrained
    assert summary["magnetic-tile"]["variants"]["none"]["ap"]["values"] == [m["ap"]]


def test_a_run_that_does_not_belong_is_refused(mt_like, tiny_protocol, tmp_path, monkeypatch):
    ablation(tmp_path, mt_like.parent, "--attentions", "none")
    runs = tmp_path / "runs"
    none = run_path(runs, "none", "magnetic-tile", 0)

    # a run of another attention in the variant's folder
    cbam = run_path(runs, "cbam", "magnetic-tile", 0)
    cbam.parent.mkdir(parents=True)
    cbam.symlink_to(none, target_is_directory=True)
    with pytest.raises(AblationError, match=r"attention 'none', not 'cbam'.*remove"):
        ablation(tmp_path, mt_like.parent, "--attentions", "cbam")
    cbam.unlink()

    # a call that would train another recipe than the runs there are: refused before it trains
    with pytest.raises(AblationError, match=r"other settings than .*--epochs 2 \(the run: --epochs 1\)"):
        ablation(tmp_path, mt_like.parent, "--attentions", "cbam", "--epochs", "2")
    assert not cbam.exists()
    # a run trained with another recipe than the others (here: two epochs, trained outside the command)
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"]["train"], "epochs", 2)
    realdata.train_run(realdata.tiles_dir(runs, "magnetic-tile", "mask", "train"), cbam, 0, "magnetic-tile", 1, "cpu")
    monkeypatch.setitem(realdata.PROTOCOL["magnetic-tile"]["train"], "epochs", 1)
    with pytest.raises(AblationError, match=rf"other settings than {none}: {cbam} \(train.epochs\).*same overrides"):
        ablation(tmp_path, mt_like.parent, "--no-train")
    shutil.rmtree(cbam)

    # a run trained on other tiles than the folder lists now
    split = json.loads((none / "split.json").read_text())
    split["train"] = split["train"][1:]
    (none / "split.json").write_text(json.dumps(split))
    with pytest.raises(AblationError, match="other tiles"):
        ablation(tmp_path, mt_like.parent, "--attentions", "none")
