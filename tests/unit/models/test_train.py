"""``valve-model train``: run directory, log, config, exact resume, user errors, and that it learns.

The runs use the compact preset at 48x48 (``--input-size 48``) on the synthetic dataset of
tests/helpers/datasets.py so that the whole module takes seconds on one CPU thread.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load, load_train_state, read_metadata
from models.cli import main as cli_main
from models.train import TrainConfig, TrainError, best_logged_epoch, chance_loss, improves, train
from tests.helpers.datasets import make_folders_dataset

FAST = ["--preset", "compact", "--input-size", "48", "--threads", "1", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folders_dataset(tmp_path_factory.mktemp("data"), n_per_class=12, size=48)


def run_train(data, out, *extra):
    return cli_main(["train", "--data", str(data), "--out", str(out), *FAST, *extra])


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_train_writes_run_directory_log_and_config(data, tmp_path, capsys):
    """Two epochs write weights, train state, one log line per epoch and the full config."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "2", "--seed", "3") == 0
    names = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "last.safetensors", "train_state.pt", "log.jsonl", "config.json",
            "split.json", "curves.png"} <= names
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert set(r) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "lr", "seconds"}
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["val_bal_acc"] <= 1.0
    assert [r["lr"] for r in log] == [pytest.approx(1e-3), pytest.approx(1e-5)]  # cosine from lr to lr / 100
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg) == {"model", "train", "data", "bn_check"}
    assert cfg["train"]["schedule"] == "cosine" and cfg["train"]["balance"] is True and cfg["train"]["bn_recal"]
    assert cfg["bn_check"]["images"] == 40 and cfg["bn_check"]["weights"] == "model.safetensors"
    assert cfg["model"]["classes"] == ["good", "dirt", "scratch", "ec"] and cfg["model"]["input_size"] == 48
    t = cfg["train"]
    assert (t["optimizer"], t["loss"], t["lr"], t["betas"], t["seed"], t["epochs"]) == (
        "adam", "cross_entropy", 1e-3, [0.9, 0.999], 3, 2)
    assert t["torch"] == torch.__version__ and t["command"][:2] == ["valve-model", "train"]
    assert cfg["data"]["format"] == "folders" and cfg["data"]["split_seed"] == 3
    assert cfg["data"]["counts"]["val"] == {"good": 2, "dirt": 2, "scratch": 2, "ec": 2}  # --val-fraction 0.2
    assert cfg["data"]["counts"]["train"] == {"good": 10, "dirt": 10, "scratch": 10, "ec": 10}
    state = load_train_state(run / "train_state.pt")
    assert state["epoch"] == 2 and "optimizer" in state and "rng" in state
    model = load(run)
    assert model.config.input_size == 48 and not model.training
    assert read_metadata(run / "last.safetensors")["epoch"] == "2"
    err = capsys.readouterr().err  # not a TTY: one plain line per epoch, no progress bar
    assert "epoch 1/2" in err and "epoch 2/2" in err and "\r" not in err


def test_resume_continues_and_matches_an_uninterrupted_run(data, tmp_path):
    """1 epoch + --resume to 3 gives bit-identical weights and log to 3 epochs in one go."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_train(data, full, "--epochs", "3") == 0
    assert run_train(data, split, "--epochs", "1") == 0
    # --resume needs no other option: the saved configuration is used
    assert cli_main(["train", "--out", str(split), "--resume", "--epochs", "3", "--threads", "1"]) == 0
    assert [r["epoch"] for r in read_log(split)] == [1, 2, 3]
    for name in ("last.safetensors", "model.safetensors"):
        assert same_tensors(full / name, split / name), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(full)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(split)]
    cfg = json.loads((split / "config.json").read_text())
    assert cfg["train"]["epochs"] == 3 and cfg["resumed"][0]["from_epoch"] == 1
    # resuming a run already at --epochs trains nothing and records nothing
    assert cli_main(["train", "--out", str(split), "--resume", "--epochs", "3", "--threads", "1"]) == 0
    assert json.loads((split / "config.json").read_text()) == cfg


def test_worker_processes_do_not_change_the_result(data, tmp_path):
    """Augmentation and shuffling are seeded per epoch and image, so --workers 2 trains the same weights."""
    assert run_train(data, tmp_path / "w0", "--epochs", "1") == 0
    assert run_train(data, tmp_path / "w2", "--epochs", "1", "--workers", "2") == 0
    assert same_tensors(tmp_path / "w0" / "last.safetensors", tmp_path / "w2" / "last.safetensors")


def test_no_validation_set_keeps_the_last_weights(data, tmp_path):
    """With --val-fraction 0 model.safetensors is the last epoch's weights and val_* are null."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1", "--val-fraction", "0", "--no-augment") == 0
    assert same_tensors(run / "model.safetensors", run / "last.safetensors")
    assert read_log(run)[0]["val_acc"] is None


def test_refuses_non_empty_run_dir_without_resume_or_force(data, tmp_path, capsys):
    """A non-empty --out is refused with a message naming --resume and --force; --force overwrites."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "something.txt").write_text("keep me")
    assert run_train(data, run, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and "--force" in err and "Traceback" not in err
    assert run_train(data, run, "--epochs", "1", "--force") == 0
    assert (run / "something.txt").read_text() == "keep me"  # --force removes only run files
    assert (run / "model.safetensors").is_file()


def test_resume_with_a_different_option_is_refused(data, tmp_path, capsys):
    """--resume with a changed locked option (here --lr) names the option and returns 2."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1") == 0
    assert run_train(data, run, "--epochs", "2", "--resume", "--lr", "0.01") == 2
    assert "lr 0.01 (the run used 0.001)" in capsys.readouterr().err


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    """--resume on a directory with no run explains there is nothing to resume."""
    assert cli_main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_missing_data_folder_is_a_user_error(tmp_path, capsys):
    """A --data path that does not exist returns 2 with a message, no traceback."""
    assert run_train(tmp_path / "nope", tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_unreadable_image_is_named_and_the_old_run_is_kept(tmp_path, capsys):
    """A corrupt image stops training before it starts, naming the file; --force has not deleted anything yet."""
    data = make_folders_dataset(tmp_path / "d", n_per_class=3, size=48)
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1") == 0
    (data / "dirt" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    assert run_train(data, run, "--epochs", "1", "--force") == 2
    assert "corrupt.png" in capsys.readouterr().err
    assert (run / "model.safetensors").is_file() and (run / "train_state.pt").is_file()


def test_invalid_model_options_are_user_errors(data, tmp_path, capsys):
    """An input size that is not a multiple of 8 is reported, not raised."""
    assert run_train(data, tmp_path / "run", "--epochs", "1", "--input-size", "50") == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_python_api_returns_run_result(data, tmp_path):
    """train(TrainConfig) runs without the CLI and reports the run it wrote."""
    res = train(TrainConfig(data=data, out=tmp_path / "api", epochs=1, input_size=48, batch_size=16, threads=1,
                            progress=False))
    assert res.weights.is_file() and res.epochs == 1 and len(res.history) == 1
    assert res.model_config.classes == ("good", "dirt", "scratch", "ec")
    with pytest.raises(TrainError, match="not empty"):
        train(TrainConfig(data=data, out=tmp_path / "api", epochs=1, input_size=48, threads=1))


def test_learns_an_easy_dataset_well_above_chance(tmp_path):
    """On a separable 4-class synthetic set, 15 epochs reach > 0.6 validation accuracy (chance 0.25)."""
    data = make_folders_dataset(tmp_path / "d", n_per_class=16, size=48, seed=11)
    res = train(TrainConfig(data=data, out=tmp_path / "run", epochs=15, input_size=48, batch_size=8,
                            val_fraction=0.25, seed=0, threads=1, progress=False))
    assert res.best_val_acc is not None and res.best_val_acc > 0.6, res.history
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_balanced_weights_draw_every_class_equally_often():
    """--balance: per-sample weights 1/count(class), so each class has the same total weight."""
    import torch

    from models.train import balanced_weights

    w = balanced_weights([0, 0, 0, 1, 2, 2])
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5], dtype=torch.double))
    draws = torch.multinomial(w, 30_000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(torch.tensor([0, 0, 0, 1, 2, 2])[draws], minlength=3).double() / 30_000
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.02)


def test_balanced_draws_draw_every_class_equally_often_and_extend_their_prefix():
    """--bn-draws balanced: the BN images drawn as the training sampler draws (a class uniformly, then an image
    of it), seeded; the first k of n draws are the k draws, so the check's images extend the recalibration's."""
    from models.train import balanced_draws

    labels = [0] * 90 + [1] * 3 + [2] * 7
    draws = balanced_draws(labels, 30_000, seed=0)
    share = np.bincount(np.asarray(labels)[draws], minlength=3) / 30_000
    assert np.allclose(share, 1 / 3, atol=0.02), share
    assert set(draws) == set(range(100))
    assert balanced_draws(labels, 256, seed=0) == draws[:256]
    assert balanced_draws(labels, 256, seed=1) != draws[:256]


def test_bn_draws_is_recorded_locked_on_resume_and_needs_balanced_sampling(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1", "--bn-draws", "balanced", "--bn-recal", "8") == 0
    t = json.loads((run / "config.json").read_text())["train"]
    assert t["bn_draws"] == "balanced" and "drawn class-balanced" in t["bn_recalibration"]
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "3", "--bn-draws", "natural"]) == 2
    assert "bn_draws" in capsys.readouterr().err
    assert run_train(data, tmp_path / "b", "--bn-draws", "balanced", "--no-balance") == 2
    assert "--no-balance" in capsys.readouterr().err
    default = tmp_path / "c"
    assert run_train(data, default, "--epochs", "1") == 0
    assert json.loads((default / "config.json").read_text())["train"]["bn_draws"] == "natural"


def test_cosine_schedule_runs_from_lr_to_a_hundredth():
    """--schedule cosine: lr at the first epoch, lr/100 at the last, the midpoint halfway; constant stays."""
    from models.train import TrainConfig, lr_at

    c = TrainConfig(data="", out="", epochs=5, lr=1e-3)
    assert [round(lr_at(c, e), 8) for e in (1, 3, 5)] == [1e-3, round(1e-3 * (0.01 + 0.99 * 0.5), 8), 1e-5]
    flat = TrainConfig(data="", out="", epochs=5, lr=1e-3, schedule="constant")
    assert {lr_at(flat, e) for e in range(1, 6)} == {1e-3}


def test_bn_recalibration_makes_eval_mode_match_batch_statistics():
    """Running statistics left wrong (as a lagging average would) are recomputed over the data: afterwards
    eval-mode logits equal the batch-statistics logits of the same batch (one batch = the whole data), and
    bn_check reports no gap; before, it does."""
    from models.ira_cnn import build_model, preset_config
    from models.train import _bn_layers, bn_check, recalibrate_bn

    torch.manual_seed(0)
    model = build_model(preset_config("compact", input_size=48))
    x = torch.randint(0, 256, (24, 1, 48, 48), dtype=torch.uint8)
    y = torch.randint(0, 4, (24,))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return x[i], int(y[i])

    def logits(batch_stats: bool) -> torch.Tensor:
        model.eval()
        if batch_stats:
            for m in _bn_layers(model):
                m.train()
                m.momentum = 0.0
        with torch.no_grad():
            out = model(x)
        for m in _bn_layers(model):
            m.momentum = 0.1
        model.eval()
        return out

    for m in _bn_layers(model):
        m.running_mean.fill_(3.0)
        m.running_var.fill_(0.01)
    assert not torch.allclose(logits(False), logits(True), rtol=0.05, atol=0.05)  # the lag the fix removes
    recalibrate_bn(model, DS(), torch.device("cpu"), 24, range(24))
    # batch statistics normalise with the biased variance, running statistics store the unbiased one
    assert torch.allclose(logits(False), logits(True), rtol=0.05, atol=0.05)
    after = bn_check(model, DS(), torch.device("cpu"), 24, range(24))
    assert after["within_1_point"] and after["gap_points"] == 0.0, after


def test_a_group_counts_for_its_rarest_class():
    """A part with one defect slice among seven good ones is a defect group: held out with the defects."""
    from models.data import stratified_split

    labels = [0] * 7 + [1] + [0] * 8 + [0] * 7 + [1] + [0] * 8
    groups = ["a"] * 8 + ["b"] * 8 + ["c"] * 8 + ["d"] * 8
    keep, held = stratified_split(labels, 0.5, seed=0, groups=groups)
    held_groups = {groups[i] for i in held}
    assert len(held_groups & {"a", "c"}) == 1 and len(held_groups & {"b", "d"}) == 1, held_groups


def test_precision_auto_follows_the_cpu_and_bf16_without_it_is_refused(monkeypatch):
    """auto is bf16 only where the CPU runs it natively; asking for bf16 elsewhere names the fix."""
    import models.train as tr

    cpu = torch.device("cpu")
    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: True)
    assert tr.resolve_precision("auto", cpu) == "bf16" and tr.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: False)
    assert tr.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(tr.TrainError, match="--precision fp32 or auto"):
        tr.resolve_precision("bf16", cpu)


def test_the_selection_rule_replayed_from_the_log_finds_the_epoch_whose_weights_were_kept(data, tmp_path):
    """realdata's summary replays the rule for runs killed before their final record (best_logged_epoch)."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "4", "--seed", "1") == 0
    kept = int(read_metadata(run / "model.safetensors")["epoch"])
    assert best_logged_epoch(read_log(run)) == kept


def test_the_selection_rule_prefers_balanced_accuracy_then_lower_loss_then_the_earlier_epoch():
    rows = [{"epoch": 1, "val_bal_acc": 0.5, "val_loss": 0.9}, {"epoch": 2, "val_bal_acc": 0.7, "val_loss": 1.2},
            {"epoch": 3, "val_bal_acc": 0.7, "val_loss": 0.8}, {"epoch": 4, "val_bal_acc": 0.7, "val_loss": 0.8},
            {"epoch": 5, "val_bal_acc": 0.6, "val_loss": 0.1}]
    assert best_logged_epoch(rows) == 3
    assert improves({"val_bal_acc": None, "val_loss": None}, {"epoch": 3, "val_bal_acc": 0.7, "val_loss": 0.8})
    assert improves({"val_bal_acc": 0.9, "val_loss": 2.0}, {"val_acc": 0.8, "val_loss": 0.1})  # an old run's best
    assert best_logged_epoch([]) is None


def test_channels_option_reaches_the_model_is_recorded_and_locked_on_resume(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1", "--channels", "4,12,8,8") == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["channels"] == [4, 12, 8, 8] and cfg["train"]["channels"] == [4, 12, 8, 8]
    assert load(run).block1.proj[0].out_channels == 12
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0  # taken from the run
    assert load(run).block1.proj[0].out_channels == 12
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "3", "--channels", "4,8,8,8"]) == 2
    assert "channels [4, 8, 8, 8] (the run used [4, 12, 8, 8])" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_train(data, tmp_path / "bad", "--channels", "4,16")
    assert "not four positive whole numbers" in capsys.readouterr().err


def test_a_run_written_before_channels_existed_resumes(data, tmp_path):
    """config.json without "channels" (runs from before the option) resumes as a width-built model."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1") == 0
    cfg = json.loads((run / "config.json").read_text())
    del cfg["train"]["channels"]
    assert "channels" not in cfg["model"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    assert load(run).block1.proj[0].out_channels == 8


def test_width_and_channels_together_are_refused(data, tmp_path, capsys):
    assert run_train(data, tmp_path / "run", "--width", "0.25", "--channels", "4,16,16,32") == 2
    assert "--width and --channels both set the model's channels" in capsys.readouterr().err


def test_a_training_loss_still_at_chance_after_three_epochs_is_reported(data, tmp_path, capsys):
    """A learning rate too small to move the weights keeps the loss at ln 4 (balanced draws): warned once."""
    assert run_train(data, tmp_path / "stalled", "--epochs", "4", "--lr", "1e-9", "--epoch-size", "512") == 0
    err = capsys.readouterr().err
    assert err.count("still at the chance level (1.386") == 1
    assert run_train(data, tmp_path / "learns", "--epochs", "4", "--lr", "3e-3") == 0
    log = read_log(tmp_path / "learns")
    assert (log[2]["train_loss"] < 0.95 * math.log(4)) == ("chance level" not in capsys.readouterr().err)


def test_chance_loss_is_ln_k_for_balanced_draws_and_the_prior_entropy_otherwise():
    assert chance_loss({"a": 10, "b": 30}, balanced=True) == pytest.approx(math.log(2))
    assert chance_loss({"a": 10, "b": 30}, balanced=False) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert chance_loss({"a": 10, "b": 0, "c": 10}, balanced=True) == pytest.approx(math.log(2))


def test_the_final_bn_check_reads_more_images_than_the_recalibration(data, tmp_path, monkeypatch):
    """--bn-recal 8 recalibrates on 8 images; the check reads BN_CHECK_IMAGES of the training side (set to 30
    here, of more than 30), and keeps the gap's sign."""
    import models.train as T

    monkeypatch.setattr(T, "BN_CHECK_IMAGES", 30)
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1", "--bn-recal", "8") == 0
    check = json.loads((run / "config.json").read_text())["bn_check"]
    train_images = len(json.loads((run / "split.json").read_text())["train"])
    assert train_images > 30 and check["images"] == 30
    signed = 100.0 * (check["running_stats_acc"] - check["batch_stats_acc"])
    assert check["running_minus_batch_points"] == pytest.approx(signed, abs=0.006)
    assert check["gap_points"] == pytest.approx(abs(signed), abs=0.006)


def test_bn_check_batches_mix_the_classes_whatever_the_order_of_the_indices():
    """Indices in class order (as datasets list them) must not give one-class batches: the check batches a
    fixed shuffle, so class-sorted and reversed indices give the same figures, and batches hold both classes."""
    from models.ira_cnn import build_model, preset_config
    from models.train import bn_check

    torch.manual_seed(0)
    model = build_model(preset_config("compact", classes=("good", "defect"), input_size=48))
    y = torch.tensor([0] * 32 + [1] * 32)  # class-sorted, as a folder dataset lists its images
    x = torch.randint(0, 256, (64, 1, 48, 48), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(64, dtype=torch.uint8)  # each image's id in its corner pixel
    seen: list[set[int]] = []

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return x[i], int(y[i])

    forward = model.forward

    def spy(batch):
        seen.append({int(v) for v in batch[:, 0, 0, 0]})  # which images went through together
        return forward(batch)

    model.forward = spy
    a = bn_check(model, DS(), torch.device("cpu"), 16, range(64))
    b = bn_check(model, DS(), torch.device("cpu"), 16, list(reversed(range(64))))
    assert a == b
    mixed = [len({int(y[i]) for i in s}) == 2 for s in seen]
    assert sum(mixed) >= len(mixed) // 2, mixed


def test_bn_recalibration_batches_mix_the_classes_whatever_the_order_of_the_indices():
    """The running variance is the mean of the batches' variances: one-class batches (indices in class order, as
    a folder dataset lists them) would leave out the variance between the classes. The recalibration batches a
    fixed shuffle, so class-sorted and reversed indices give the same statistics, batches hold both classes, and
    the first BN layer's running variance is at least as large as over one-class batches."""
    from models.ira_cnn import build_model, preset_config
    from models.train import _bn_layers, recalibrate_bn

    torch.manual_seed(0)
    model = build_model(preset_config("compact", classes=("good", "defect"), input_size=48))
    y = torch.tensor([0] * 32 + [1] * 32)
    x = torch.randint(0, 64, (64, 1, 48, 48), dtype=torch.uint8)
    x[32:] += 160  # the defect class much brighter: most of the variance lies between the classes
    x[:, 0, 0, 0] = torch.arange(64, dtype=torch.uint8)
    seen: list[set[int]] = []

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return x[i], int(y[i])

    forward = model.forward

    def spy(batch):
        seen.append({int(v) for v in batch[:, 0, 0, 0]})
        return forward(batch)

    def stats() -> list[torch.Tensor]:
        return [t.clone() for m in _bn_layers(model) for t in (m.running_mean, m.running_var)]

    model.forward = spy
    recalibrate_bn(model, DS(), torch.device("cpu"), 16, range(64))
    a = stats()
    mixed = [len({int(y[i]) for i in s}) == 2 for s in seen]
    assert sum(mixed) >= len(mixed) // 2, mixed
    recalibrate_bn(model, DS(), torch.device("cpu"), 16, list(reversed(range(64))))
    assert all(torch.equal(u, v) for u, v in zip(a, stats(), strict=True))
    # one-class batches, as the recalibration batched class-sorted indices before 2026-12-02
    bns = _bn_layers(model)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            forward(x[i:i + 16])
    model.eval()
    assert float(a[1].mean()) > 1.2 * float(bns[0].running_var.mean()), (a[1].mean(), bns[0].running_var.mean())


def test_the_stem_starts_as_the_identity_by_default_recorded_and_locked_on_resume(data, tmp_path, capsys):
    """By default the stem's second 1x1 conv starts as the identity (after a short run it is still close to it,
    a drawn one is not); config.json records the choice, a resume keeps it and refuses another, and a run
    written before the option resumes as "drawn"."""
    ident, drawn = tmp_path / "ident", tmp_path / "drawn"
    assert run_train(data, ident, "--epochs", "1") == 0
    assert run_train(data, drawn, "--epochs", "1", "--stem-init", "drawn") == 0
    eye = torch.eye(4)
    w_ident = load(ident).stem[1][0].weight.detach()[:, :, 0, 0]
    w_drawn = load(drawn).stem[1][0].weight.detach()[:, :, 0, 0]
    assert w_ident.shape == (4, 4) and (w_ident - eye).abs().max() < 0.05
    assert (w_drawn - eye).abs().max() > 0.3
    assert json.loads((ident / "config.json").read_text())["train"]["stem_init"] == "identity"
    assert json.loads((drawn / "config.json").read_text())["train"]["stem_init"] == "drawn"
    assert cli_main(["train", "--out", str(drawn), "--resume", "--epochs", "2"]) == 0
    assert cli_main(["train", "--out", str(drawn), "--resume", "--epochs", "3", "--stem-init", "identity"]) == 2
    assert "stem_init 'identity' (the run used 'drawn')" in capsys.readouterr().err
    cfg = json.loads((ident / "config.json").read_text())
    del cfg["train"]["stem_init"]  # a run from before the option
    (ident / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["train", "--out", str(ident), "--resume", "--epochs", "2", "--stem-init", "identity"]) == 2
    assert "stem_init 'identity' (the run used 'drawn')" in capsys.readouterr().err


def test_augmentation_options_are_recorded_locked_on_resume_and_checked(data, tmp_path, capsys):
    """--rot90, --brightness and --contrast reach the recorded augmentation, a resume keeps them, a resume that
    changes one is refused, and values out of range or beside --no-augment are refused with the reason."""
    run = tmp_path / "run"
    assert run_train(data, run, "--epochs", "1", "--rot90", "--brightness", "25", "--contrast", "0.25") == 0
    t = json.loads((run / "config.json").read_text())["train"]
    assert t["augmentation"] == {"hflip": True, "vflip": True, "brightness": 25.0, "contrast": 0.25, "rot90": True}
    assert (t["rot90"], t["brightness"], t["contrast"]) == (True, 25.0, 0.25)
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-rot90"]) == 2
    assert "rot90 False (the run used True)" in capsys.readouterr().err
    assert run_train(data, tmp_path / "b", "--contrast", "1.5") == 2
    assert "--contrast is the jitter's relative range" in capsys.readouterr().err
    assert run_train(data, tmp_path / "d", "--brightness", "inf") == 2
    assert "--brightness is the jitter's range in gray levels, 0 to 255" in capsys.readouterr().err
    assert run_train(data, tmp_path / "c", "--no-augment", "--rot90") == 2
    assert "--no-augment" in capsys.readouterr().err


def test_ema_decay_warms_up_and_the_update_is_a_weighted_mean():
    """The average's decay starts low ((1 + n) / (10 + n)) and reaches --ema; an update moves each parameter
    by (1 - decay) of its distance to the model's and copies the buffers."""
    from models.train import EMA_WARMUP, ema_decay, ema_update

    assert ema_decay(0.99, 0) == pytest.approx(1 / EMA_WARMUP)
    assert ema_decay(0.99, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.99, 10_000) == 0.99
    avg, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        avg.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
    ema_update(avg, model, 0.75)
    assert torch.allclose(avg.weight, torch.full((3,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.equal(avg.running_mean, model.running_mean) and torch.equal(model.weight, torch.full((3,), 3.0))


def test_ema_leaves_the_training_alone_and_keeps_the_average(data, tmp_path):
    """--ema trains the same model (last.safetensors, training losses) as a run without it, and keeps the
    recalibrated average (model.safetensors = ema.safetensors where the last epoch is kept) instead."""
    plain, avg, no_val = tmp_path / "plain", tmp_path / "ema", tmp_path / "no-val"
    assert run_train(data, plain, "--epochs", "3") == 0
    assert run_train(data, avg, "--epochs", "3", "--ema", "0.9") == 0
    assert same_tensors(plain / "last.safetensors", avg / "last.safetensors")
    assert [r["train_loss"] for r in read_log(plain)] == [r["train_loss"] for r in read_log(avg)]
    assert [r["val_loss"] for r in read_log(plain)] != [r["val_loss"] for r in read_log(avg)]  # the average's
    t = json.loads((avg / "config.json").read_text())["train"]
    assert t["ema"] == 0.9 and "exponential average" in t["weights_kept"]
    assert json.loads((plain / "config.json").read_text())["train"]["ema"] == 0.0
    assert load_train_state(avg / "train_state.pt")["ema_updates"] == 3 * math.ceil(40 / 16)
    assert run_train(data, no_val, "--epochs", "2", "--val-fraction", "0", "--ema", "0.9") == 0  # keeps the last
    assert same_tensors(no_val / "model.safetensors", no_val / "ema.safetensors")
    assert not same_tensors(no_val / "model.safetensors", no_val / "last.safetensors")
    assert "bn_check" in json.loads((no_val / "config.json").read_text())
    # the average's BatchNorm statistics are its own: recomputing them over the training images (all 48 here,
    # fewer than --bn-recal's 256) leaves them as saved
    from models.data import ImageDataset, load_samples, split_samples
    from models.train import recalibrate_bn

    model = load(no_val)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_s, _ = split_samples(load_samples(data), 0.0, 0)
    recalibrate_bn(model, ImageDataset(train_s, 48), torch.device("cpu"), 16, range(len(train_s)))
    assert saved and all(torch.allclose(model.state_dict()[k], v, rtol=1e-3, atol=1e-3) for k, v in saved.items())


def test_ema_resumes_exactly_and_is_locked(data, tmp_path, capsys):
    """1 epoch + --resume to 3 with --ema gives the same average, kept weights and log as 3 in one go; a resume
    that changes --ema, or finds the average's file missing, is refused; bad values are refused with the fix."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_train(data, full, "--epochs", "3", "--ema", "0.8") == 0
    assert run_train(data, split, "--epochs", "1", "--ema", "0.8") == 0
    assert cli_main(["train", "--out", str(split), "--resume", "--epochs", "3", "--threads", "1"]) == 0
    for name in ("last.safetensors", "model.safetensors", "ema.safetensors"):
        assert same_tensors(full / name, split / name), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(full)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(split)]
    capsys.readouterr()
    assert cli_main(["train", "--out", str(split), "--resume", "--epochs", "4", "--ema", "0.9"]) == 2
    assert "ema 0.9 (the run used 0.8)" in capsys.readouterr().err
    (split / "ema.safetensors").unlink()
    assert cli_main(["train", "--out", str(split), "--resume", "--epochs", "4", "--threads", "1"]) == 2
    assert "ema.safetensors" in capsys.readouterr().err
    assert run_train(data, tmp_path / "a", "--ema", "1") == 2
    assert "--ema is the weight average's decay per step, in [0, 1)" in capsys.readouterr().err
    assert run_train(data, tmp_path / "b", "--ema", "0.9", "--bn-recal", "0") == 2
    assert "keep --bn-recal above 0" in capsys.readouterr().err
