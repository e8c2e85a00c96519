"""``valve-model evaluate``: metrics, report and figures of a trained run; user errors."""

import csv
import json

import numpy as np
import pytest
import torch

from models.checkpoint import load
from models.cli import main as cli_main
from models.data import load_samples
from models.evaluate import EvalError, evaluate
from models.images import read_image, read_mask
from models.metrics import segmentation_scores
from models.saliency import saliency
from models.train import TrainConfig, train
from service.segment import otsu_mask, refined_mask
from tests.helpers.datasets import make_folders_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_folders_dataset(root / "train", n_per_class=12, size=48, seed=0)
    torch.set_num_threads(1)
    train(TrainConfig(data=data, out=root / "run", epochs=3, input_size=48, batch_size=8, threads=1,
                      progress=False))
    return root / "run"


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    # 64x64 images: evaluation resizes them to the model's 48x48 input (masks by nearest neighbour)
    return make_folders_dataset(tmp_path_factory.mktemp("test"), n_per_class=5, size=64, seed=7)


def test_evaluate_cli_writes_report_metrics_and_figures(run, eval_data, tmp_path, capsys):
    """The CLI writes metrics.json, report.md, predictions.csv and three PNGs with consistent numbers."""
    out = tmp_path / "report"
    rc = cli_main(["evaluate", "--run", str(run), "--data", str(eval_data), "--format", "folders",
                   "--saliency", "gradcam++", "--out", str(out), "--threads", "1", "--batch-size", "7"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    m = json.loads((out / "metrics.json").read_text())
    c = m["classification"]
    assert c["classes"] == ["good", "dirt", "scratch", "ec"]
    cm = np.array(c["confusion_matrix"])
    assert cm.sum() == 20 and cm.sum(axis=1).tolist() == [5, 5, 5, 5]
    assert c["accuracy"] == pytest.approx(np.trace(cm) / 20) == pytest.approx(summary["accuracy"])
    for name in c["classes"]:
        r = c["per_class"][name]
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and 0.0 <= r["ap"] <= 1.0
    assert m["saliency"] == "gradcam++" and m["data"]["evaluated"] == 20 and m["seconds"] > 0
    assert m["run"]["epoch"] in ("1", "2", "3") and m["run"]["model"]["input_size"] == 48
    seg = m["segmentation"]
    assert seg["segmented_classes"] == ["dirt", "scratch"] and seg["scored_images"] == 10
    assert seg["per_class"]["all"]["n"] == 10
    for agg in ("mean", "pooled"):
        assert 0.0 <= seg["per_class"]["all"][agg]["iou"] <= 1.0
        assert 0.0 <= seg["per_class"]["all"][agg]["pixel_accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| class | precision | recall | F-measure | AP | support |" in report
    assert "| true \\ predicted | good | dirt | scratch | ec |" in report
    assert "| dirt | 5 |" in report and "IoU pooled" in report
    for name in ("confusion_matrix.png", "pr_curves.png", "saliency_grid.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20


def test_predictions_and_iou_match_a_direct_computation(run, eval_data):
    """Predicted classes and per-image IoU equal model + saliency + the mask method applied by hand (otsu,
    and the default refined)."""
    m = evaluate(run, eval_data, method="gradcam", threads=1, segmentation="otsu")
    refined = evaluate(run, eval_data, method="gradcam", threads=1)
    model = load(run)
    data = load_samples(eval_data)
    imgs = torch.from_numpy(np.stack([read_image(s.path, 48) for s in data.samples])).unsqueeze(1)
    logits, maps = saliency(model, imgs, "gradcam")
    pred = logits.argmax(1).numpy()
    cm = np.zeros((4, 4), int)
    ious, ious_refined = [], []
    for s, p, mp, img in zip(data.samples, pred, maps.numpy(), imgs[:, 0].numpy(), strict=True):
        cm[s.label, p] += 1
        if s.mask is not None:
            mask = otsu_mask(mp) if p in (1, 2) else np.zeros_like(mp, bool)
            ious.append(segmentation_scores(mask, read_mask(s.mask, 48))["iou"])
            mask = refined_mask(img, mp) if p in (1, 2) else np.zeros_like(mp, bool)
            ious_refined.append(segmentation_scores(mask, read_mask(s.mask, 48))["iou"])
    assert m["classification"]["confusion_matrix"] == cm.tolist()
    assert m["segmentation"]["per_class"]["all"]["mean"]["iou"] == pytest.approx(np.mean(ious))
    assert refined["segmentation"]["per_class"]["all"]["mean"]["iou"] == pytest.approx(np.mean(ious_refined))
    assert (m["segmentation"]["method"], refined["segmentation"]["method"]) == ("otsu", "refined")


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_other_saliency_methods_run(run, eval_data, method):
    """CAM and Grad-CAM evaluate too (the Python API, without a report directory)."""
    m = evaluate(run, eval_data, method=method, threads=1, limit=8)
    assert m["saliency"] == method and m["data"]["evaluated"] == 8


def test_limit_takes_images_round_robin_over_classes(run, eval_data):
    """--limit 6 evaluates 6 images spread over the classes in order."""
    m = evaluate(run, eval_data, threads=1, limit=6)
    assert m["data"]["counts"] == {"good": 2, "dirt": 2, "scratch": 1, "ec": 1}


def test_data_with_a_subset_of_classes_is_mapped_by_name(run, tmp_path):
    """Evaluation data with only dirt and good is mapped onto the model's four classes by name."""
    data = make_folders_dataset(tmp_path / "d", classes=("dirt", "good"), n_per_class=3, size=48, masks=False)
    m = evaluate(run, data, threads=1)
    c = m["classification"]
    assert [c["per_class"][k]["support"] for k in c["classes"]] == [3, 3, 0, 0]
    assert m["segmentation"]["scored_images"] == 0 and m["segmentation"]["segmented_images_without_mask"] == 3


def test_unknown_class_in_evaluation_data_is_a_clear_error(run, tmp_path, capsys):
    """A data class the model does not know returns 2 and names the class."""
    data = make_folders_dataset(tmp_path / "d", classes=("good", "rust"), n_per_class=2, size=48)
    rc = cli_main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "'rust'" in err and "does not know" in err and "Traceback" not in err


def test_missing_run_and_bad_options_are_user_errors(eval_data, tmp_path, capsys):
    """A run directory without weights returns 2 with a message; a bad limit raises EvalError."""
    (tmp_path / "norun").mkdir()
    rc = cli_main(["evaluate", "--run", str(tmp_path / "norun"), "--data", str(eval_data), "--out",
                   str(tmp_path / "r")])
    assert rc == 2 and "cannot load the model" in capsys.readouterr().err
    with pytest.raises(EvalError, match="--limit"):
        evaluate(tmp_path / "norun", eval_data, limit=0)


def test_content_box_is_where_the_letterbox_puts_the_image(tmp_path):
    """content_box: the rows/columns of a non-square image inside its letterboxed input; None for a square one,
    so evaluate's Otsu masks leave the padding out and square valve slices are untouched."""
    import cv2
    import numpy as np

    from models.evaluate import content_box
    from models.images import letterbox

    tall = tmp_path / "tall.png"
    cv2.imwrite(str(tall), np.full((100, 40), 200, np.uint8))
    rows, cols = content_box(tall, 32)
    boxed = letterbox(np.full((100, 40), 200, np.uint8), 32)
    inside = np.zeros_like(boxed, dtype=bool)
    inside[rows, cols] = True
    assert (boxed[inside] > 0).all() and (boxed[~inside] == 0).all()
    square = tmp_path / "square.png"
    cv2.imwrite(str(square), np.full((50, 50), 9, np.uint8))
    assert content_box(square, 32) is None
