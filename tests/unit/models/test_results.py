"""``valve-model results``: caching, sections of the doc, mean ± std, the ordering sentence, failures.

The end-to-end tests train and evaluate for real (subprocesses) on the tiny synthetic dataset of
tests/helpers/datasets.py with PROTOCOL patched to input 32, one epoch; table6 and the cache checks
use hand-written run directories (nothing trained).
"""

import json
import math
import os

import pytest

from models.experiments.results import command, protocol, tables
from models.experiments.results import doc as results_doc
from models.experiments.results import runs as results_runs
from models.experiments.results import stats as results_stats
from tests.helpers.datasets import make_folders_dataset


def synth_protocol(data, **over):
    return {**protocol._COMMON, "name": "Synthetic", "data": str(data), "train_format": "folders",
            "test_format": "folders", "input_size": 32, "epochs": 1, **over}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    return make_folders_dataset(tmp_path_factory.mktemp("synth"), classes=("good", "dirt", "scratch"),
                                n_per_class=6, size=32)


# ---------------------------------------------------------------------------------------------
# statistics, formatting, the ordering sentence


def test_mean_std_is_sample_std_and_ignores_missing_values():
    m, s, n = results_stats.mean_std([0.9, 0.95, 1.0, None, float("nan")])
    assert n == 3 and m == pytest.approx(0.95) and s == pytest.approx(0.05)  # ddof 1
    assert results_stats.mean_std([0.8]) == (0.8, None, 1)
    assert results_stats.mean_std([None]) == (None, None, 0)
    assert results_stats.fmt_ms([0.9, 0.95, 1.0]) == "95.0 ± 5.0"
    assert results_stats.fmt_ms([0.9]) == "90.0"
    assert results_stats.fmt_ms([0.9, None, 1.0], expected=3) == "95.0 ± 7.1 (n=2)"
    assert results_stats.fmt_ms([None]) == "-"


def stats(**means_stds):
    return {k.replace("_", "-"): v for k, v in means_stds.items()}


def test_ordering_sentence_agrees_and_flags_noise():
    good = stats(none=(0.90, 0.001), iam_no_spatial=(0.93, 0.001), cbam=(0.94, 0.001), iam=(0.96, 0.001))
    text = results_stats.ordering_sentence(good, tables.PAPER_ABLATION, tables.LABELS)
    assert "IAM 96.0 > CBAM 94.0 > IAM without spatial 93.0 > no attention 90.0" in text
    assert "Paper (accuracy %, their valve data): IAM 97.7 > IAM without spatial 96.2 = CBAM 96.2 > no attention 92.2" in text
    assert "agrees with the paper's on all 5 pairs" in text
    assert "larger than both variants' std" in text

    swapped = stats(none=(0.90, 0.02), iam_no_spatial=(0.93, 0.001), cbam=(0.97, 0.02), iam=(0.96, 0.02))
    text = results_stats.ordering_sentence(swapped, tables.PAPER_ABLATION, tables.LABELS)
    assert text.startswith("Ours (accuracy, mean over seeds, %): CBAM 97.0 > IAM 96.0")
    assert "disagrees with the paper's on 1 of the 5 pairs" in text and "IAM vs CBAM" in text
    assert "**The std over seeds is larger than the difference** for: CBAM vs IAM (difference 1.0" in text

    single = stats(none=(0.90, None), iam_no_spatial=(0.93, None), cbam=(0.94, None), iam=(0.96, None))
    assert "single seed" in results_stats.ordering_sentence(single, tables.PAPER_ABLATION, tables.LABELS)


# ---------------------------------------------------------------------------------------------
# the doc file


def test_replace_section_keeps_text_outside_the_markers(tmp_path):
    text = "# Mine\n\nintro\n<!-- BEGIN table3 -->\nold\n<!-- END table3 -->\ntrailer\n<!-- BEGIN table6 -->\nt6\n<!-- END table6 -->\n"
    new = results_doc.replace_section(text, "table3", "new body")
    assert new == text.replace("\nold\n", "\nnew body\n")
    appended = results_doc.replace_section("# only a title\n", "table4", "t4")
    assert appended == "# only a title\n\n<!-- BEGIN table4 -->\nt4\n<!-- END table4 -->\n"
    with pytest.raises(protocol.ResultsError):
        results_doc.replace_section("<!-- END table3 -->\n<!-- BEGIN table3 -->\n", "table3", "x")
    doc = tmp_path / "d" / "results.md"
    results_doc.write_section(doc, "table6", "## six")
    created = doc.read_text()
    assert created.startswith("# Results") and "valve-model results table3" in created
    assert all(results_doc.marker(t) in created and results_doc.marker(t, end=True) in created for t in protocol.TABLES)
    assert "<!-- BEGIN table6 -->\n## six\n<!-- END table6 -->" in created


# ---------------------------------------------------------------------------------------------
# cache states and table6 from hand-written runs


def fake_run(s, run, acc, macro_f, methods=("gradcam++",)):
    """A run directory that the cache takes as trained and evaluated."""
    rd = s.run_dir(run)
    rd.mkdir(parents=True)
    p = s.proto(run.dataset)
    cfg = {"train": {"preset": p["preset"], "attention": run.attention, "input_size": run.input_size,
                     "batch_size": p["batch_size"], "lr": p["lr"], "val_fraction": p["val_fraction"],
                     "seed": run.seed, "balance": p["balance"], "augment": p["augment"], "epochs": run.epochs,
                     "torch": "x"},
           "data": {"format": p["train_format"], "path": str(s.data_path(run.dataset))}}
    (rd / "config.json").write_text(json.dumps(cfg))
    (rd / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 2.0}) + "\n"
                                          for e in range(1, run.epochs + 1)))
    (rd / "model.safetensors").write_bytes(b"")
    os.utime(rd / "model.safetensors", ns=(1_000_000_000, 1_000_000_000))
    for m in methods:
        rep = results_runs.report_dir(rd, m)
        rep.mkdir()
        (rep / "saliency_grid.png").write_bytes(b"")
        (rep / "metrics.json").write_text(json.dumps({
            "saliency": m, "seconds": 1.0, "data": {"format": p["test_format"]},
            "classification": {"accuracy": acc, "macro": {"f_measure": macro_f}}}))
    return rd


def test_cache_states(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL", {"synth": synth_protocol(tmp_path / "data", epochs=3)})
    s = protocol.ResultsOptions("table3", tmp_path / "runs", tmp_path / "results.md", ["synth"], [0])
    run, p, data = s.run("synth", "iam", 0), s.proto("synth"), s.data_path("synth")
    rd = s.run_dir(run)
    assert rd.name == "iam-s0-e3-i32"
    assert results_runs.train_state(rd, run, p, data)[0] == "new"
    fake_run(s, run, 0.9, 0.8)
    assert results_runs.train_state(rd, run, p, data)[0] == "done"
    assert results_runs.eval_state(rd, "gradcam++", p)[0] == "done"
    assert results_runs.eval_state(rd, "cam", p)[0] == "new"
    os.utime(rd / "model.safetensors")  # weights newer than the report: evaluate again
    assert results_runs.eval_state(rd, "gradcam++", p) == ("new", "weights newer than the report")
    # an interrupted run resumes
    (rd / "log.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 1.0}) + "\n")
    (rd / "train_state.pt").write_bytes(b"")
    (rd / "last.safetensors").write_bytes(b"")
    state, detail = results_runs.train_state(rd, run, p, data)
    assert (state, detail) == ("resume", "at epoch 1 of 3")
    assert "--resume" in results_runs.plan_steps(s, run, ())[0].args
    # other settings: never overwritten
    cfg = json.loads((rd / "config.json").read_text())
    cfg["train"]["balance"] = False
    (rd / "config.json").write_text(json.dumps(cfg))
    state, detail = results_runs.train_state(rd, run, p, data)
    assert state == "conflict" and "balance False (protocol: True)" in detail
    # the --epochs override gives another run directory
    smoke = protocol.ResultsOptions("table3", s.runs, s.doc, ["synth"], [0], epochs=1)
    assert smoke.run_dir(smoke.run("synth", "iam", 0)).name == "iam-s0-e1-i32"


def test_conflicting_run_is_reported_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(protocol, "PROTOCOL", {"synth": synth_protocol(tmp_path / "data")})
    s = protocol.ResultsOptions("table3", tmp_path / "runs", tmp_path / "results.md", ["synth"], [0])
    rd = fake_run(s, s.run("synth", "iam", 0), 0.9, 0.8)
    cfg = json.loads((rd / "config.json").read_text())
    cfg["train"]["preset"] = "paper"
    (rd / "config.json").write_text(json.dumps(cfg))
    rc = command.main(["table3", "--runs", str(s.runs), "--doc", str(s.doc), "--seeds", "0"])
    out = capsys.readouterr().out
    assert rc == 1 and "other settings" in out and "preset 'paper'" in out
    assert not s.doc.exists() and json.loads((rd / "config.json").read_text())["train"]["preset"] == "paper"


def test_table6_from_cached_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(protocol, "PROTOCOL", {"synth": synth_protocol(tmp_path / "data")})
    runs, doc = tmp_path / "runs", tmp_path / "results.md"
    s = protocol.ResultsOptions("table6", runs, doc, ["synth"], [0, 1])
    accs = {"none": (0.80, 0.82), "iam-no-spatial": (0.85, 0.87), "cbam": (0.90, 0.86), "iam": (0.88, 0.90)}
    for att, (a0, a1) in accs.items():
        fake_run(s, s.run("synth", att, 0), a0, a0 - 0.1)
        fake_run(s, s.run("synth", att, 1), a1, a1 - 0.1)
    assert command.main(["table6", "--runs", str(runs), "--doc", str(doc), "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "0 steps to run, 16 cached" in out and "started" not in out
    text = doc.read_text()
    section = text.split(results_doc.marker("table6"))[1].split(results_doc.marker("table6", end=True))[0]
    assert "| IAM (`iam`) | 97.7 | 89.0 ± 1.4 | 79.0 ± 1.4 | 2 |" in section
    assert "| CBAM | 90.0 | 86.0 |" in section  # per-seed accuracies
    assert "Ours (accuracy, mean over seeds, %): IAM 89.0 > CBAM 88.0 > IAM without spatial 86.0 > no attention 81.0" in section
    assert "agrees with the paper's on all 5 pairs" in section
    assert "larger than the difference** for: IAM vs CBAM" in section
    assert "the split is always seed 0" in section
    assert results_doc.marker("table3") in text  # the other sections' markers are there
    numbers = json.loads((runs / "table6.json").read_text())
    iam = numbers["datasets"]["synth"]["variants"]["iam"]["accuracy"]
    assert iam["values"] == [0.88, 0.90] and iam["mean"] == pytest.approx(0.89)
    assert iam["std"] == pytest.approx(math.sqrt(2) * 0.01)


# ---------------------------------------------------------------------------------------------
# end to end: real subprocesses on the synthetic data


def test_table3_trains_once_then_everything_is_cached(synth_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(protocol, "PROTOCOL", {"synth": synth_protocol(synth_data)})
    runs, doc = tmp_path / "runs", tmp_path / "doc" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Mine\n\nintro kept\n\n<!-- BEGIN table3 -->\nold table\n<!-- END table3 -->\n\ntrailer kept\n")
    argv = ["table3", "--runs", str(runs), "--doc", str(doc), "--seeds", "0", "--jobs", "1"]
    assert command.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 steps to run, 0 cached" in out and "SMOKE" not in out
    rd = runs / "synth" / "iam-s0-e1-i32"
    weights, metrics = rd / "model.safetensors", rd / "eval-gradcam++" / "metrics.json"
    assert (rd / "train.log").is_file() and (rd / "eval-gradcam++.log").is_file()
    stamps = (weights.stat().st_mtime_ns, metrics.stat().st_mtime_ns)
    text = doc.read_text()
    assert text.startswith("# Mine\n\nintro kept\n\n<!-- BEGIN table3 -->\n## Table 3")
    assert text.endswith("<!-- END table3 -->\n\ntrailer kept\n") and "old table" not in text
    assert "| macro |" in text and "summed over 1 seed" in text and "99.5 % accuracy" in text
    assert (doc.parent / "results" / "synth-confusion.png").is_file()
    assert (doc.parent / "results" / "synth-pr.png").is_file()
    numbers = json.loads((runs / "table3.json").read_text())
    assert numbers["seeds"] == [0] and numbers["timing"]["ran_train"] == 1
    acc = numbers["datasets"]["synth"]["accuracy"]
    assert len(acc["values"]) == 1 and acc["std"] is None

    assert command.main(argv) == 0  # the second call trains and evaluates nothing
    out = capsys.readouterr().out
    assert "0 steps to run, 2 cached" in out and "started" not in out
    assert (weights.stat().st_mtime_ns, metrics.stat().st_mtime_ns) == stamps
    assert json.loads((runs / "table3.json").read_text())["timing"]["ran_train"] == 0

    # the figures reuse the same run and evaluation
    assert command.main(["figures", *argv[1:]]) == 0
    assert "0 steps to run" in capsys.readouterr().out
    assert (doc.parent / "results" / "synth-correct.png").is_file()
    assert (doc.parent / "results" / "synth-wrong.png").is_file()
    fig = json.loads((runs / "figures.json").read_text())["datasets"]["synth"]
    assert fig["images"] == 18 and len(fig["correct"]) <= tables.FIGURE_CASES


def test_failed_training_exits_nonzero_naming_the_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(protocol, "PROTOCOL", {"synth": synth_protocol(tmp_path / "no-such-data")})
    runs, doc = tmp_path / "runs", tmp_path / "results.md"
    rc = command.main(["table3", "--runs", str(runs), "--doc", str(doc), "--seeds", "0", "--epochs", "2"])
    out = capsys.readouterr().out
    log = runs / "synth" / "iam-s0-e2-i32" / "train.log"
    assert rc == 1 and "SMOKE RUN" in out
    assert f"FAILED: train synth/iam-s0-e2-i32 (exit 2); log: {log}" in out
    assert "not run: evaluate synth/iam-s0-e2-i32 gradcam++" in out
    assert "valve-model train: error" in log.read_text()
    assert not doc.exists() and not (runs / "table3-e2.json").exists()
