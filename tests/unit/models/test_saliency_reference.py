"""CAM, Grad-CAM and Grad-CAM++ against references that share no code with models/saliency.py.

The ONNX graph (models/export.py) and the autograd reference (models.saliency.saliency) both call
``weighted_map`` and ``scale_map``, so comparing them cannot catch a wrong formula. Here:

* worked examples: tiny activations A and gradients g whose maps are computed by hand in the
  comments, from the formulas (Grad-CAM++: Chattopadhay et al., eqs (11)-(13) of the paper);
* ``np_weighted_map`` / ``np_scale_map``: the same formulas written again as plain numpy loops in
  float64, checked against ``weighted_map`` on random tensors, against ``saliency(model, x, method)``
  of a tiny IRA-CNN (g from torch.autograd, the map from the loops), and against the exported
  ONNX graph run by ONNX Runtime.

Formulas, per sample, A_k and g_k (h, w) = activation and d score / d A of channel k:

    Grad-CAM++  alpha_kij = g^2 / (2 g^2 + sum_ab A_kab * g^3)   (0 where the denominator is 0)
                w_k = sum_ij alpha_kij * relu(g_kij);  map = relu(sum_k w_k A_k)
    Grad-CAM    w_k = mean_ij g_kij;                   map = relu(sum_k w_k A_k)
    CAM         map = relu(h*w * sum_k g_k(i,j) A_k(i,j))
    scaling     bilinear (align_corners=False) to the input size, then min-max to [0, 1] per map;
                a flat map becomes zeros.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models.export as export
from models.ira_cnn import build_model, preset_config
from models.saliency import saliency, scale_map, weighted_map

METHODS = ("gradcam++", "gradcam", "cam")


# --------------------------------------------------------------------------- independent reference


def np_weighted_map(method: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, h, w) raw map, element by element in float64 from the formulas above."""
    acts = np.asarray(acts, dtype=np.float64)
    grads = np.asarray(grads, dtype=np.float64)
    b_n, c_n, h, w = acts.shape
    out = np.zeros((b_n, h, w))
    for b in range(b_n):
        weights = [0.0] * c_n
        for k in range(c_n):
            if method == "gradcam++":
                sum_a = 0.0
                for i in range(h):
                    for j in range(w):
                        sum_a += acts[b, k, i, j]
                wk = 0.0
                for i in range(h):
                    for j in range(w):
                        g = grads[b, k, i, j]
                        denom = 2.0 * g * g + sum_a * g * g * g
                        alpha = g * g / denom if denom != 0.0 else 0.0
                        wk += alpha * max(g, 0.0)
                weights[k] = wk
            elif method == "gradcam":
                total = 0.0
                for i in range(h):
                    for j in range(w):
                        total += grads[b, k, i, j]
                weights[k] = total / (h * w)
        for i in range(h):
            for j in range(w):
                s = 0.0
                for k in range(c_n):
                    if method == "cam":
                        s += grads[b, k, i, j] * acts[b, k, i, j]
                    else:
                        s += weights[k] * acts[b, k, i, j]
                if method == "cam":
                    s *= h * w
                out[b, i, j] = max(s, 0.0)
    return out


def _source_index(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
    """align_corners=False: output pixel centre i + 0.5 maps to input coordinate
    (i + 0.5) * n_in / n_out - 0.5, clamped at 0; returns (lower index, upper index, upper weight)."""
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(math.floor(src)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    return lo, hi, src - lo


def np_scale_map(raw: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) -> (B, size, size): bilinear upsampling by loops, then min-max per map (flat -> 0)."""
    raw = np.asarray(raw, dtype=np.float64)
    b_n, h, w = raw.shape
    out = np.zeros((b_n, size, size))
    for b in range(b_n):
        for i in range(size):
            y0, y1, ly = _source_index(i, h, size)
            for j in range(size):
                x0, x1, lx = _source_index(j, w, size)
                top = (1 - lx) * raw[b, y0, x0] + lx * raw[b, y0, x1]
                bottom = (1 - lx) * raw[b, y1, x0] + lx * raw[b, y1, x1]
                out[b, i, j] = (1 - ly) * top + ly * bottom
        lo, hi = out[b].min(), out[b].max()
        out[b] = (out[b] - lo) / (hi - lo) if hi - lo > 1e-7 else 0.0
    return out


def _t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def _autograd_acts_and_grads(model, x: torch.Tensor, class_idx: torch.Tensor | None = None):
    """A = features(x) and g = d logit_c / d A by torch.autograd, c = argmax unless given."""
    with torch.enable_grad():
        acts = model.features(x).detach().requires_grad_(True)
        logits = model.head(acts)
        cls = logits.argmax(dim=1) if class_idx is None else class_idx
        (grads,) = torch.autograd.grad(logits.gather(1, cls.view(-1, 1)).sum(), acts)
    return acts.detach(), grads, logits.detach(), cls


# --------------------------------------------------------------------------- worked examples


def test_gradcam_pp_worked_example():
    """Grad-CAM++ of a 2-channel 2x2 map, by hand: covers alpha's zero-denominator case, a negative
    gradient with a non-zero (negative) alpha that relu(g) must drop, and the final relu."""
    # channel 0: A0 = [[1, 0], [0, 1]], sum A0 = 2
    #   g =  1: alpha = 1 / (2*1 + 2*1)        = 1/4, relu(g) = 1 -> 1/4
    #   g = -1: denominator 2*1 + 2*(-1) = 0   -> alpha = 0      -> 0
    #   g = -2: alpha = 4 / (2*4 + 2*(-8)) = -1/2, relu(g) = 0 -> 0   (without the relu: +1)
    #   g =  0: denominator 0                 -> alpha = 0      -> 0
    #   w0 = 1/4
    # channel 1: A1 = [[2, 1], [-3, 1]], sum A1 = 1; g = 1/2 everywhere
    #   alpha = (1/4) / (2/4 + 1 * 1/8) = (1/4) / (5/8) = 2/5, relu(g) = 1/2 -> 1/5 per position
    #   w1 = 4 * 1/5 = 4/5
    # map = relu(1/4 A0 + 4/5 A1) = relu([[1/4 + 8/5, 4/5], [-12/5, 1/4 + 4/5]])
    #     = [[1.85, 0.8], [0, 1.05]]
    acts = _t([[[[1, 0], [0, 1]], [[2, 1], [-3, 1]]]])
    grads = _t([[[[1, -1], [-2, 0]], [[0.5, 0.5], [0.5, 0.5]]]])
    expected = [[[1.85, 0.8], [0.0, 1.05]]]
    torch.testing.assert_close(weighted_map("gradcam++", acts, grads), _t(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_weighted_map("gradcam++", acts.numpy(), grads.numpy()), expected,
                               rtol=0, atol=1e-12)


def test_gradcam_worked_example():
    """Grad-CAM of a 2-channel 3x3 map, by hand: the weights are the mean (not the sum) of g."""
    # g0 = [[1, 2, 0], [0, 0, 0], [0, 0, 6]]: w0 = 9/9 = 1
    # g1 = [[-3, 0, 0], [0, 0, 0], [0, 0, 0]]: w1 = -3/9 = -1/3
    # A0 = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], A1 = [[6, 9, 3], [3, 3, 3], [0, 0, 0]]
    # A0 - A1/3 = [[1-2, 2-3, 3-1], [4-1, 5-1, 6-1], [7, 8, 9]] = [[-1, -1, 2], [3, 4, 5], [7, 8, 9]]
    # relu -> [[0, 0, 2], [3, 4, 5], [7, 8, 9]]
    acts = _t([[[[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[6, 9, 3], [3, 3, 3], [0, 0, 0]]]])
    grads = _t([[[[1, 2, 0], [0, 0, 0], [0, 0, 6]], [[-3, 0, 0], [0, 0, 0], [0, 0, 0]]]])
    expected = [[[0, 0, 2], [3, 4, 5], [7, 8, 9]]]
    torch.testing.assert_close(weighted_map("gradcam", acts, grads), _t(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_weighted_map("gradcam", acts.numpy(), grads.numpy()), expected,
                               rtol=0, atol=1e-12)


def test_cam_worked_example_and_zhou_for_a_gap_linear_head():
    """CAM = relu(h*w * sum_k g_k A_k), by hand; for a GAP + linear head (g_k = w_ck / (h*w)
    everywhere) it is Zhou et al.'s relu(sum_k w_ck A_k)."""
    # g0 * A0 = [[0.5, -0.5], [1, 0.25]] * [[1, 2], [0, 1]] = [[0.5, -1], [0, 0.25]]
    # g1 * A1 = [[0.25, 0], [-1, 2]] * [[1, 1], [2, 0]]    = [[0.25, 0], [-2, 0]]
    # sum = [[0.75, -1], [-2, 0.25]]; * h*w = 4 -> [[3, -4], [-8, 1]]; relu -> [[3, 0], [0, 1]]
    acts = _t([[[[1, 2], [0, 1]], [[1, 1], [2, 0]]]])
    grads = _t([[[[0.5, -0.5], [1, 0.25]], [[0.25, 0], [-1, 2]]]])
    expected = [[[3, 0], [0, 1]]]
    torch.testing.assert_close(weighted_map("cam", acts, grads), _t(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_weighted_map("cam", acts.numpy(), grads.numpy()), expected,
                               rtol=0, atol=1e-12)
    # GAP + linear: score = w0 mean(A0) + w1 mean(A1), w = (2, -1) -> g0 = 2/4, g1 = -1/4 everywhere.
    # Zhou: relu(2 A0 - A1) = relu([[2-1, 4-1], [0-2, 2-0]]) = [[1, 3], [0, 2]]
    leaf = acts.clone().requires_grad_(True)
    score = 2.0 * leaf[:, 0].mean() - 1.0 * leaf[:, 1].mean()
    (g,) = torch.autograd.grad(score, leaf)
    torch.testing.assert_close(weighted_map("cam", acts, g), _t([[[1, 3], [0, 2]]]), rtol=0, atol=1e-6)


def test_scale_map_worked_example():
    """scale_map of [[0, 4], [8, 0]] to 4x4, by hand: bilinear with align_corners=False, then min-max."""
    # align_corners=False, 2 -> 4: output i samples input coordinate (i + 0.5) / 2 - 0.5, clamped at 0:
    #   i = 0: -0.25 -> 0 (v0);  i = 1: 0.25 (0.75 v0 + 0.25 v1);  i = 2: 0.75 (0.25 v0 + 0.75 v1);
    #   i = 3: 1.25 -> v1 (no input beyond index 1)
    # along x: row 0 [0, 4] -> [0, 1, 3, 4];  row 1 [8, 0] -> [8, 6, 2, 0]
    # along y: r0 = [0, 1, 3, 4]
    #          r1 = 0.75 r0 + 0.25 row1 = [2, 0.75 + 1.5, 2.25 + 0.5, 3]    = [2, 2.25, 2.75, 3]
    #          r2 = 0.25 r0 + 0.75 row1 = [6, 0.25 + 4.5, 0.75 + 1.5, 1]    = [6, 4.75, 2.25, 1]
    #          r3 = [8, 6, 2, 0]
    # min 0, max 8: divide by 8
    up = np.array([[0, 1, 3, 4], [2, 2.25, 2.75, 3], [6, 4.75, 2.25, 1], [8, 6, 2, 0]]) / 8.0
    raw = _t([[[0, 4], [8, 0]]])
    # a second map in the batch: the same shape shifted and scaled (min-max is per map), and a flat one
    batch = torch.cat([raw, 3.0 * raw + 5.0, torch.full((1, 2, 2), 2.5)])
    got = scale_map(batch, 4)
    expected = np.stack([up, up, np.zeros((4, 4))])
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_scale_map(batch.numpy(), 4), expected, rtol=0, atol=1e-12)
    assert scale_map(raw, (4, 4)).shape == (1, 4, 4)


# --------------------------------------------------------------------------- random tensors and a model


@pytest.mark.parametrize("method", METHODS)
def test_weighted_map_matches_loops_on_random_tensors(method):
    """weighted_map equals the loop reference on random (B=2, C=3, 3x4) maps: A >= 0 with zeros
    (as after the network's ReLUs), g of both signs with exact zeros."""
    gen = torch.Generator().manual_seed(7)
    acts = torch.relu(torch.randn(2, 3, 3, 4, generator=gen))
    grads = torch.randn(2, 3, 3, 4, generator=gen)
    grads[0, 1, 0, :2] = 0.0
    ref = np_weighted_map(method, acts.numpy(), grads.numpy())
    if method == "gradcam++":  # a well-conditioned case: no denominator 2 + S g near zero
        s = acts.sum(dim=(2, 3), keepdim=True)
        assert ((2.0 + s * grads).abs()[grads != 0] > 0.05).all()
    assert (ref.reshape(2, -1).max(1) > 0).all()  # not a vacuous comparison of zeros
    np.testing.assert_allclose(weighted_map(method, acts, grads).numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(21)
    return build_model(preset_config("compact", input_size=32)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_saliency_of_a_tiny_model_matches_loops(tiny_model, method):
    """saliency(model, x, method) of a 32-px compact IRA-CNN equals the loop reference fed with
    torch.autograd's gradient, for the argmax and for a given (other) class."""
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for class_idx in (None, torch.tensor([2, 1, 0, 3])):
        acts, grads, ref_logits, cls = _autograd_acts_and_grads(tiny_model, x, class_idx)
        logits, maps = saliency(tiny_model, x, method, class_idx=class_idx)
        torch.testing.assert_close(logits, ref_logits)
        ref = np_scale_map(np_weighted_map(method, acts.numpy(), grads.numpy()), 32)
        # a non-argmax class may have an all-negative map (zeros after the relu); most must not be flat
        assert (ref.reshape(4, -1).max(1) == 1.0).sum() >= 2, "the maps should not be flat"
        np.testing.assert_allclose(maps.numpy(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("head_pool", ["gap", "flatten", "gmp", "mix"])
def test_onnx_graph_matches_loops(tmp_path, head_pool):
    """ONNX Runtime's in-graph Grad-CAM++ (the head's closed-form gradient, the graph's map and
    scaling) equals the loop reference fed with torch.autograd's gradient, within 1e-4."""
    torch.manual_seed(31)
    model = build_model(preset_config("compact", input_size=32, head_pool=head_pool)).eval()
    if head_pool == "mix":
        with torch.no_grad():
            model.classifier.alpha.fill_(0.6)
    path = tmp_path / "model.onnx"
    export.export_onnx(model, path)
    x = torch.cat([torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(4)), export.structured_slices(32)])
    logits, _, sal = export.ort_session(path, threads=1).run(["logits", "probs", "saliency"], {"slices": x.numpy()})
    acts, grads, ref_logits, _ = _autograd_acts_and_grads(model, x, torch.from_numpy(logits.argmax(1)))
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=1e-4)
    ref = np_scale_map(np_weighted_map("gradcam++", acts.numpy(), grads.numpy()), 32)
    assert (ref.reshape(len(x), -1).max(1) == 1.0).sum() >= len(x) - 1, "the maps should not be flat"
    np.testing.assert_allclose(sal, ref, rtol=0, atol=1e-4)


# ----------------------------------------------------------------- pinned by mutation testing (docs/testing.md)


def test_gradcam_pp_alpha_where_the_denominator_is_exactly_1():
    """Grad-CAM++'s alpha is g^2 / denominator also where the denominator is exactly 1 (only 0 gives alpha = 0)."""
    # A = ones (2x2), sum A = 4, g = 1/2: denominator 2/4 + 4/8 = 1, alpha = 1/4, w = 4 * 1/4 * 1/2 = 1/2
    acts, grads = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    torch.testing.assert_close(weighted_map("gradcam++", acts, grads), torch.full((1, 2, 2), 0.5))


def test_unknown_method_is_refused_naming_the_choices():
    """weighted_map refuses an unknown method, listing the three it knows."""
    with pytest.raises(ValueError, match=r"^unknown saliency method 'lime': choose one of gradcam\+\+, gradcam, cam$"):
        weighted_map("lime", torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))


def test_saliency_defaults_to_gradcam_pp(tiny_model):
    """saliency() without a method gives the Grad-CAM++ maps."""
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(saliency(tiny_model, x)[1], saliency(tiny_model, x, method="gradcam++")[1])
