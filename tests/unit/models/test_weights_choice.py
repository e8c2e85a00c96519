"""tools/weights_choice.py: a realdata run's kept and last weights scored on the test images exactly as
``valve-model realdata train`` scores them, without touching the run's cached probabilities."""

from __future__ import annotations

import json

import pytest

from models.experiments import realdata
from tools.weights_choice import main


def test_both_weight_files_are_scored_like_the_run_and_the_cache_is_left_alone(mt_like, tiny_protocol, tmp_path):
    runs = tmp_path / "runs"
    assert realdata.main(["train", "--datasets", "magnetic-tile", "--labels", "mask", "--seeds", "0", "--runs",
                          str(runs), "--data-root", str(mt_like.parent), "--threads", "1"]) == 0
    run = realdata.run_dir(runs, "magnetic-tile", "mask", 0)
    cached = {p.name: p.stat().st_mtime_ns for p in run.glob("tile-probs-*.npz")}
    assert cached  # the run's own evaluation cached its probabilities

    out = tmp_path / "choice.json"
    assert main([str(run), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    metrics = json.loads((run / "image_metrics.json").read_text())
    kept = row["weights"]["model.safetensors"]
    assert kept["ap"] == pytest.approx(metrics["ap"], abs=1e-12)
    assert kept["calibrated_accuracy"] == pytest.approx(metrics["calibrated"]["accuracy"])
    assert kept["threshold_logodds"] == pytest.approx(metrics["calibrated"]["calibration"]["threshold_logodds"])
    assert set(row["weights"]) == {"model.safetensors", "last.safetensors"}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert row["epochs"] == 1 and row["best_epoch"] == realdata.best_epoch(run)
    assert row["val_bal_acc"] == {"best": max(r["val_bal_acc"] for r in log), "last": log[-1]["val_bal_acc"]}
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("tile-probs-*.npz")} == cached

    (run / "last.safetensors").unlink()
    with pytest.raises(SystemExit, match="last.safetensors is missing"):
        main([str(run)])


def test_an_ema_run_compares_the_kept_average_with_the_last_average(tmp_path):
    """A run trained with --ema scored its average at every validation, so its final-epoch weights are
    ema.safetensors, not the raw model in last.safetensors; older runs (no ema key) keep last.safetensors."""
    from tools.weights_choice import weight_files

    (tmp_path / "config.json").write_text(json.dumps({"train": {"ema": 0.995}}))
    assert weight_files(tmp_path) == ("model.safetensors", "ema.safetensors")
    for train in ({"ema": 0.0}, {}):
        (tmp_path / "config.json").write_text(json.dumps({"train": train}))
        assert weight_files(tmp_path) == ("model.safetensors", "last.safetensors")
