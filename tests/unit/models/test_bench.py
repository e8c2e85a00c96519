"""valve-model bench: eager + autograd Grad-CAM++ vs ONNX Runtime in-graph Grad-CAM++ (tiny iteration counts)."""

import json
import sys

import numpy as np
import pytest
import torch

import models.experiments.saliency_bench as bench
from models.checkpoint import save_weights
from models.cli import main as cli_main


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_cli_benchmarks_the_compact_preset_and_writes_json(tmp_path, capsys):
    """`valve-model bench --presets compact` times both sides, checks they agree and writes the figures."""
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--presets", "compact", "--iterations", "2", "--warmup", "1", "--threads", "1",
                   "--json", str(out), "--profile"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "(a) eager + full backward" in text and "(b) ONNX Runtime" in text and "PASS" in text
    r = json.loads(out.read_text())
    assert r["passed"] and r["batch"] == 8 and r["threads"] == 1 and list(r["models"]) == ["compact"]
    m = r["models"]["compact"]
    assert m["model_config"]["input_size"] == 192
    for side in ("eager_full", "eager", "onnx"):
        assert m[side]["iterations"] == 2 and m[side]["median_ms"] > 0
        assert m[side]["slices_per_s"] == pytest.approx(8 * 2 / (m[side]["mean_ms"] * 2 / 1e3))
    assert m["ratio_b_over_a"] == pytest.approx(m["onnx"]["median_ms"] / m["eager_full"]["median_ms"])
    assert m["ratio_b_over_a_lean"] == pytest.approx(m["onnx"]["median_ms"] / m["eager"]["median_ms"])
    for c in (m["check"], m["check_full"]):  # the full-backward baseline computes the same maps
        assert c["classes_agree"] == c["slices"] == 8 * bench.N_FRAMES
        assert c["saliency_max_abs"] <= 1e-4 and c["logits_max_abs"] <= 1e-4
    assert m["export"]["seconds"] > 0 and r["command"][:2] == ["valve-model", "bench"]
    # --profile: torch's forward alone, and ONNX Runtime's profiler by op type and block (Conv dominates)
    assert m["eager_forward"]["median_ms"] > 0 and "profile: torch forward alone" in text
    prof = m["onnx_profile"]
    assert prof["kernel_ms_per_frame"] > 0 and "Conv" in prof["by_op_percent"]
    assert "block1" in prof["by_block_percent"] and sum(prof["by_op_percent"].values()) <= 100.5


def test_flatten_head_path_agrees():
    """A paper-style flatten head (reduced width) gives the same classes and maps on both sides."""
    model = bench.calibrated_model("paper", seed=1, width=0.125, head_width=32)
    assert model.config.head_pool == "flatten"
    r = bench.bench_model(model, iterations=1, warmup=0, threads=1, log=lambda s: None)
    assert r["check"]["passed"] and r["check_full"]["passed"], (r["check"], r["check_full"])
    assert r["check"]["saliency_max_abs"] <= 1e-4


def test_run_option_benchmarks_trained_weights_at_their_input_size(tmp_path):
    """--run loads a checkpoint and benches it at its own input size."""
    model = bench.calibrated_model("compact", seed=2, size=64)
    save_weights(tmp_path / "model.safetensors", model)
    r = bench.run_bench(run=tmp_path, iterations=1, warmup=0, threads=1, log=lambda s: None)
    assert list(r["models"]) == ["run:compact"] and r["passed"]
    assert r["models"]["run:compact"]["model_config"]["input_size"] == 64


@pytest.mark.parametrize("argv, message", [
    (["--presets", "big"], "unknown preset(s) big"),
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--presets", "compact", "--run", "somewhere"], "--run and --presets exclude each other"),
    (["--run", "/nonexistent/run"], "cannot load --run"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    """Bad options stop before any work with exit code 2 and a message naming the problem."""
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_torchcam_missing_is_a_clear_error(capsys, monkeypatch):
    """--torchcam without the package says how to get it (no torchvision needed); the package is hidden from the
    import system (sys.modules entry None), so this runs whether torchcam is installed or not."""
    monkeypatch.setitem(sys.modules, "torchcam", None)
    assert bench.main(["--presets", "compact", "--torchcam"]) == 2
    assert "pip install --no-deps torchcam" in capsys.readouterr().err


def test_compare_flags_class_flips_and_map_differences():
    """The check fails on a flipped class or a saliency difference above 1e-4, and counts mask pixels."""
    logits = np.array([[2.0, 1.0], [0.0, 1.0]], np.float32)
    maps = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), bool)
    ref = [(logits, None, maps, masks)]
    assert bench.compare(ref, [(logits.copy(), None, maps + 5e-5, masks)])["passed"]
    off = bench.compare(ref, [(logits, None, maps + 2e-4, masks | (maps + 2e-4 > 0))])
    assert not off["passed"] and off["mask_pixels_differ"] == 32
    flipped = bench.compare(ref, [(logits[:, ::-1].copy(), None, maps, masks)])
    assert not flipped["passed"] and flipped["classes_agree"] == 0


def test_torchcam_side_is_timed_and_compared_when_installed():
    """With torchcam importable, --torchcam adds its timing and its distance to the reference (not a gate)."""
    import torchcam  # noqa: F401  (in the dev extra: CI has it; a missing package fails here, it does not skip)

    r = bench.run_bench(["compact"], iterations=1, warmup=0, threads=1, use_torchcam=True, log=lambda s: None)
    m = r["models"]["compact"]
    assert m["torchcam"]["iterations"] == 1 and m["torchcam_vs_eager"]["slices"] == 8 * bench.N_FRAMES
    assert r["passed"]  # the gate is (a) vs (b) only
