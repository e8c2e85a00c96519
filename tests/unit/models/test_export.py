"""ONNX export with in-graph Grad-CAM++ against the torch autograd reference (docs/onnx-contract.md)."""

import hashlib
import json
import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import models.export as export
from models.attention import ATTENTION_KINDS
from models.checkpoint import save_weights
from models.ira_cnn import IRACNN, build_model, preset_config, segmented_classes
from models.saliency import saliency

TOL = 1e-4


def _calibrated(cfg, seed: int = 0, passes: int = 2) -> IRACNN:
    """A random-weight model whose BatchNorm running stats come from train-mode passes over uniform
    noise, so activations, logits and Grad-CAM++ maps have realistic, non-trivial scales."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes
    model.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randint(0, 256, (4, 1, cfg.input_size, cfg.input_size), dtype=torch.uint8, generator=g))
    return model.eval()


def _small_cfg(preset: str, attention: str):
    """The flatten head of the paper preset at 1/8 width, or the compact preset (GAP head) as is."""
    if preset == "paper":
        return preset_config("paper", attention, width=0.125, head_width=64)
    return preset_config("compact", attention)


def _run(sess, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(sess.run(["logits", "probs", "saliency"], {"slices": x.numpy()}))


def _assert_matches_reference(model: IRACNN, x: torch.Tensor, logits, probs, sal) -> tuple[float, float]:
    """ORT outputs vs models.saliency.saliency; returns (logits max-abs, saliency max-abs)."""
    ref_logits, ref_sal = saliency(model, x)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(probs, torch.softmax(ref_logits, 1).numpy(), rtol=0, atol=TOL)
    cls = logits.argmax(1)
    # a class may only flip on a near-tie the logits tolerance explains; the map is then compared
    # with the reference for the graph's class
    top2 = torch.topk(ref_logits, 2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]).numpy() > 2 * TOL
    assert (cls == ref_logits.argmax(1).numpy())[clear].all()
    _, ref_own = saliency(model, x, class_idx=torch.from_numpy(cls))
    np.testing.assert_allclose(sal, ref_own.numpy(), rtol=0, atol=TOL)
    return float(np.abs(logits - ref_logits.numpy()).max()), float(np.abs(sal - ref_own.numpy()).max())


@pytest.fixture(scope="module")
def compact_onnx(tmp_path_factory):
    """The compact IAM model and its exported graph, shared by the contract tests."""
    model = _calibrated(preset_config("compact", "iam"))
    path = tmp_path_factory.mktemp("compact") / "model.onnx"
    export.export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as 'valve-model train' and 'evaluate' leave it: weights, config.json, metrics."""
    root = tmp_path_factory.mktemp("run")
    model = _calibrated(preset_config("compact", "cbam"), seed=5)
    save_weights(root / "model.safetensors", model)
    data = {"format": "folders", "path": "/data/valves", "counts": {"good": 900, "dirt": 120, "scratch": 80, "ec": 40},
            "seeds": {"split": 7, "train": 1}}
    train = {"epochs": 30, "lr": 0.001, "batch_size": 32}
    (root / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": train, "data": data}))
    (root / "report").mkdir()
    metrics = {"accuracy": 0.97, "per_class": {"dirt": {"f1": 0.95}}, "segmentation": {"dirt": {"iou": 0.61}},
               "pr_curves": {"dirt": {"precision": [1.0, 0.5], "recall": [0.5, 1.0]}}}
    (root / "report" / "metrics.json").write_text(json.dumps(metrics))
    return root, model, data, train, metrics


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("preset", ["paper", "compact"])
def test_onnx_matches_autograd_reference(tmp_path, preset, attention):
    """ORT CPU logits and in-graph Grad-CAM++ match the autograd reference within 1e-4 max-abs for both
    heads (flatten, GAP) and every attention variant, on random and structured uint8 slices."""
    model = _calibrated(_small_cfg(preset, attention), seed=11)
    path = tmp_path / "model.onnx"
    result = export.export_onnx(model, path)
    assert result.opset == 17
    x = export.check_slices(4, 192, seed=3)
    logits, probs, sal = _run(export.ort_session(path), x)
    assert logits.shape == (8, 4) and sal.shape == (8, 192, 192) and sal.dtype == np.float32
    assert sal.min() >= 0.0 and sal.max() <= 1.0
    assert (sal.reshape(8, -1).max(1) == 1.0).sum() >= 7, "the maps should not be degenerate"
    dl, ds = _assert_matches_reference(model, x, logits, probs, sal)
    print(f"{preset}/{attention}: logits max-abs {dl:.3g}, saliency max-abs {ds:.3g}")


@pytest.mark.parametrize("head_pool", ["gmp", "mix"])
def test_onnx_max_pool_heads_match_autograd_reference(tmp_path, head_pool):
    """The GMP and alpha-mixed GAP/GMP heads export too: ORT logits and in-graph Grad-CAM++ (the head's
    explicit backprop, one-hot at each channel's argmax) match the autograd reference within 1e-4."""
    model = _calibrated(preset_config("compact", "iam", head_pool=head_pool), seed=13)
    if head_pool == "mix":
        with torch.no_grad():
            model.classifier.alpha.fill_(0.6)
    path = tmp_path / "model.onnx"
    export.export_onnx(model, path)
    x = export.check_slices(2, 192, seed=5)
    logits, probs, sal = _run(export.ort_session(path), x)
    _assert_matches_reference(model, x, logits, probs, sal)


def test_torch_graph_module_equals_autograd_reference():
    """SaliencyGraph in torch (explicit head backprop) equals the autograd reference to float rounding."""
    model = _calibrated(_small_cfg("paper", "iam"), seed=2)
    x = export.check_slices(2, 192, seed=4)
    with torch.no_grad():
        logits, probs, sal = export.SaliencyGraph(model)(x)
    ref_logits, ref_sal = saliency(model, x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(probs, torch.softmax(ref_logits, 1))
    torch.testing.assert_close(sal, ref_sal, rtol=0, atol=1e-5)


def test_dynamic_batch_one_file_runs_b1_and_b8(compact_onnx):
    """One exported file accepts B=1 and B=8, declares only the batch axis dynamic, and the single
    slice's outputs equal its row in the batch of eight."""
    model, path = compact_onnx
    sess = export.ort_session(path)
    shapes = {v.name: v.shape for v in [*sess.get_inputs(), *sess.get_outputs()]}
    assert shapes == {"slices": ["batch", 1, 192, 192], "logits": ["batch", 4], "probs": ["batch", 4],
                      "saliency": ["batch", 192, 192]}
    x = export.check_slices(4, 192, seed=9)  # 8 slices
    lo8, pr8, sa8 = _run(sess, x)
    lo1, pr1, sa1 = _run(sess, x[5:6])
    assert lo1.shape == (1, 4) and sa1.shape == (1, 192, 192) and lo8.shape == (8, 4)
    np.testing.assert_allclose(lo1, lo8[5:6], rtol=0, atol=1e-5)
    np.testing.assert_allclose(sa1, sa8[5:6], rtol=0, atol=1e-5)
    _assert_matches_reference(model, x, lo8, pr8, sa8)
    _assert_matches_reference(model, x[5:6], lo1, pr1, sa1)


def test_input_must_be_uint8(compact_onnx):
    """The graph's input is uint8: float32 slices are refused by ONNX Runtime, not silently cast."""
    _, path = compact_onnx
    sess = export.ort_session(path)
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    with pytest.raises(Exception, match="uint8"):
        sess.run(None, {"slices": np.zeros((1, 1, 192, 192), dtype=np.float32)})


def test_graph_has_no_autograd_and_splits_spatial_means(compact_onnx):
    """The graph is plain forward ops at opset 17, and every global average pool is a mean over W then H."""
    _, path = compact_onnx
    m = onnx.load(str(path))
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17
    ops = {n.op_type for n in m.graph.node}
    assert {"ArgMax", "Gather", "Resize", "ReduceMin", "ReduceMax", "Softmax"} <= ops
    for n in m.graph.node:
        if n.op_type == "ReduceMean":
            axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
            assert axes is not None and len(axes) == 1, (n.name, axes)


def test_cli_writes_model_json_with_contract_fields_and_sha256(run_dir, tmp_path, capsys):
    """'valve-model export' on a run directory exits 0, prints the parity figures without torch.onnx
    warnings, and writes model.json whose fields, sha256 and embedded run metadata are right."""
    root, model, data, train, metrics = run_dir
    out = tmp_path / "deploy" / "valve.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = export.main(["--run", str(root), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "logits   max-abs" in printed.out and "class agreement  12/12" in printed.out and "PASS" in printed.out
    leaked = [w for w in caught if "onnx" in str(w.filename) or issubclass(w.category, torch.jit.TracerWarning)
              or "TorchScript" in str(w.message)]
    assert not leaked, [str(w.message) for w in leaked]
    assert "Warning" not in printed.err

    meta = json.loads((tmp_path / "deploy" / "valve.json").read_text())
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["size_bytes"] == out.stat().st_size and meta["model_file"] == "valve.onnx"
    cfg = model.config
    assert meta["classes"] == list(cfg.classes) == ["good", "dirt", "scratch", "ec"]
    assert meta["segmented_classes"] == list(segmented_classes(cfg.classes)) == ["dirt", "scratch"]
    assert meta["segmented_mask"] == [False, True, True, False]
    assert meta["input"]["name"] == "slices" and meta["input"]["dtype"] == "uint8"
    assert meta["input"]["shape"] == ["batch", 1, 192, 192]
    assert [(o["name"], o["dtype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "float32", ["batch", 4]), ("probs", "float32", ["batch", 4]),
        ("saliency", "float32", ["batch", 192, 192])]
    assert meta["preset"] == "compact" and meta["attention"] == "cbam"
    assert meta["model_config"] == cfg.to_dict()
    assert meta["opset"] == 17 and meta["exporter"] == "torchscript"
    assert meta["training"] == {"data": data, "train": train}
    assert meta["evaluation"]["metrics"] == {k: v for k, v in metrics.items() if k != "pr_curves"}
    assert "pr_curves" not in meta["evaluation"]["metrics"]  # point lists stay in the report, not model.json
    assert meta["evaluation"]["path"].endswith("report/metrics.json")
    p = meta["parity"]
    assert p["passed"] and p["logits_max_abs"] <= TOL and p["saliency_max_abs"] <= TOL
    assert p["class_agreement"] == p["class_total"] == 12 and p["batch_sizes"] == [12, 1, 3]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["onnx"] == onnx.__version__
    assert time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ")
    assert sorted(q.name for q in out.parent.iterdir()) == ["valve.json", "valve.onnx"]  # no temp files left


def test_cli_missing_run_dir_exits_2_with_a_message(tmp_path, capsys):
    """A run path that does not exist exits 2, names the path and what to pass, and writes nothing."""
    missing = tmp_path / "runs" / "nope"
    rc = export.main(["--run", str(missing), "--out", str(tmp_path / "model.onnx")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "run directory" in err and "safetensors" in err
    assert list(tmp_path.iterdir()) == []


def test_untrained_bare_safetensors_exports_without_run_metadata(tmp_path):
    """An untrained model saved with save_weights (no config.json, no metrics) exports; model.json
    then has null training and evaluation."""
    model = build_model(preset_config("compact", "iam-no-spatial"))  # untouched BatchNorm statistics
    weights = save_weights(tmp_path / "untrained.safetensors", model)
    out = tmp_path / "out" / "model.onnx"
    assert export.main(["--run", str(weights), "--out", str(out), "--batch-check", "2"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"] is None and meta["evaluation"] is None
    assert meta["source"]["weights"] == str(weights.resolve())
    assert meta["parity"]["inputs"]["random_uint8"] == 2 and meta["parity"]["passed"]


def test_failed_parity_exits_1_and_leaves_the_deployed_model_alone(run_dir, tmp_path, monkeypatch, capsys):
    """When ORT and the reference differ beyond the tolerance, export exits 1 with the figures, and an
    existing model.onnx/model.json pair is left as it was."""
    root = run_dir[0]
    out = tmp_path / "model.onnx"
    out.write_bytes(b"deployed")
    out.with_suffix(".json").write_text("{}")
    monkeypatch.setattr(export, "TOLERANCE", 1e-12)
    assert export.main(["--run", str(root), "--out", str(out), "--batch-check", "1"]) == 1
    captured = capsys.readouterr()
    assert "parity check failed" in captured.err and "was not written" in captured.err
    assert "FAIL" in captured.out
    assert out.read_bytes() == b"deployed" and out.with_suffix(".json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]


def test_bad_options_are_refused_before_loading(tmp_path, capsys):
    """An opset below 17, dynamo at opset 17, a wrong suffix or a missing --metrics file exit 2 naming the fix."""
    base = ["--run", str(tmp_path), "--out", str(tmp_path / "m.onnx")]
    assert export.main([*base, "--opset", "16"]) == 2
    assert "17 or newer" in capsys.readouterr().err
    assert export.main([*base, "--exporter", "dynamo"]) == 2
    assert "--opset 18" in capsys.readouterr().err
    assert export.main(["--run", str(tmp_path), "--out", str(tmp_path / "m.pb")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert export.main([*base, "--metrics", str(tmp_path / "none.json")]) == 2
    assert "--metrics" in capsys.readouterr().err


@pytest.mark.slow
def test_full_paper_preset_exports_and_passes_parity(tmp_path):
    """The full paper preset (155 M parameters, ~620 MB graph) exports and passes the 1e-4 parity check
    (on 4 random + 4 structured slices to keep CI fast; the CLI's default check uses 8 + 4)."""
    model = _calibrated(preset_config("paper", "iam"), passes=1)
    path = tmp_path / "paper.onnx"
    export.export_onnx(model, path)
    assert path.stat().st_size > 600e6
    figures = export.parity_check(model, path, n_random=4)
    print(export.format_parity(figures))
    assert figures["passed"], export.format_parity(figures)


def test_a_resumed_runs_commands_reach_model_json(run_dir, tmp_path):
    """A run continued with --resume records it in config.json; model.json carries that record beside the
    first command, so the shipped model says how it was trained."""
    import shutil

    root, _, data, train, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(root, run)
    cfg = json.loads((run / "config.json").read_text())
    resumed = [{"from_epoch": 40, "epochs": 100, "command": ["valve-model", "train", "--resume", "--epochs", "100"]}]
    (run / "config.json").write_text(json.dumps({**cfg, "resumed": resumed}))
    out = tmp_path / "out" / "model.onnx"
    assert export.main(["--run", str(run), "--out", str(out), "--batch-check", "2"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"] == {"data": data, "train": train, "resumed": resumed}


def test_a_config_describing_other_channels_than_the_weights_is_named_key_by_key(run_dir, tmp_path, capsys):
    """config.json says channels the weights do not have (a key only one side carries): the error names it."""
    import shutil

    root, *_ = run_dir
    run = tmp_path / "run"
    shutil.copytree(root, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["channels"] = [4, 12, 8, 8]
    (run / "config.json").write_text(json.dumps(cfg))
    assert export.main(["--run", str(run), "--out", str(tmp_path / "out" / "model.onnx")]) != 0
    err = capsys.readouterr().err
    assert "describes a different model" in err and "'channels': ([4, 12, 8, 8], None)" in err, err
    assert not (tmp_path / "out" / "model.onnx").exists()
