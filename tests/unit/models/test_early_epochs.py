"""tools/early_epochs.py: the first epochs of several runs side by side, from their run directories."""

from __future__ import annotations

import json

import pytest

from models.train import TrainConfig, train
from tests.helpers.datasets import make_folders_dataset
from tools.early_epochs import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = make_folders_dataset(tmp_path_factory.mktemp("data"), n_per_class=6, size=32)
    root = tmp_path_factory.mktemp("runs")
    for name, kw in (("plain", {}), ("wide", {"channels": (4, 12, 8, 8)})):
        train(TrainConfig(data=data, out=root / name, epochs=2, input_size=32, seed=5, threads=1, progress=False,
                          precision="fp32", bn_recal=8, **kw))
    return root


def test_rows_come_from_the_logs_and_name_the_channels_each_model_had(runs, tmp_path, capsys):
    out = tmp_path / "early.json"
    assert main([str(runs / "plain"), str(runs / "wide"), "--epochs", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["channels"] for r in rows] == [[4, 8, 16, 32], [4, 12, 8, 8]]
    for r, name in zip(rows, ("plain", "wide"), strict=True):
        log = [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        assert r["train_loss"] == [e["train_loss"] for e in log]
        assert r["val_bal_acc"] == [e["val_bal_acc"] for e in log]
        assert (r["precision"], r["seed"]) == ("fp32", 5)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | channels (stem, blocks) | precision | seed | loss ep 1 | loss ep 2 |")
    assert table[3].startswith("| wide | 4,12,8,8 | fp32 | 5 | ")


def test_a_run_with_fewer_epochs_than_asked_is_refused(runs):
    with pytest.raises(SystemExit, match="logged 2 epochs, fewer than --epochs 3"):
        main([str(runs / "plain"), "--epochs", "3"])
