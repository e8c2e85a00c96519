"""models.unknown: the Mahalanobis unknown score in the graph, against references that share no code with it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from models import export
from models import unknown as U
from models.ira_cnn import build_model, preset_config
from service.infer import InferenceModel
from service.sim.synth import write_dataset

CLASSES = ("good", "dirt", "scratch", "ec")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(preset_config("compact", "iam"))
    m.train()
    with torch.no_grad():  # realistic BN statistics (as tests/models/test_export.py does)
        for _ in range(2):
            m(torch.randint(0, 256, (4, 1, 192, 192), dtype=torch.uint8))
    return m.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random compact IAM model, its ONNX export and a model.json as the exporter writes one (minimal)."""
    model = _model()
    path = tmp_path_factory.mktemp("unknown") / "model.onnx"
    export.export_onnx(model, path)
    meta = {"format": "valve-inspect/model/1", "model_file": "model.onnx", "sha256": "0" * 64,
            "classes": list(CLASSES), "segmented_classes": ["dirt", "scratch"],
            "input": {"name": "slices", "dtype": "uint8", "shape": ["batch", 1, 192, 192]},
            "outputs": [{"name": n} for n in ("logits", "probs", "saliency")],
            "preset": "compact", "attention": "iam", "opset": 17}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model, path


def torch_pooled(model, x: np.ndarray) -> list[np.ndarray]:
    """[GAP, GMP] of each IRA-Block's output by forward hooks on the torch model (not the graph)."""
    got = []
    hooks = [getattr(model, f"block{i}").pool.register_forward_hook(lambda _m, _i, o: got.append(o))
             for i in (1, 2, 3)]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return [torch.cat([a.double().mean(dim=(2, 3)), a.double().amax(dim=(2, 3))], dim=1).numpy() for a in got]


def mahalanobis_reference(f: np.ndarray, means: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """min_k (f - mu_k)^T cov^-1 (f - mu_k) / D by an explicit inverse (no whitening, no Cholesky)."""
    inv = np.linalg.inv(cov)
    d = f[:, None, :] - means[None]
    return np.einsum("nkd,de,nke->nk", d, inv, d).min(axis=1) / f.shape[1]


def test_the_graph_score_matches_torch_features_and_an_explicit_inverse(exported):
    """ONNX Runtime's ``unknown`` on new slices equals the reference computed from torch's own block outputs
    with an explicit covariance inverse, within 1e-4 relative (blocks 1-3, fitted on other slices)."""
    model, path = exported
    rng = np.random.default_rng(0)
    fit_x = rng.integers(0, 256, (24, 1, 192, 192), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 6)
    feats = torch_pooled(model, fit_x)
    g = U.fit_gaussians(feats, labels, CLASSES, (1, 2, 3))
    proto = onnx.load(str(path))
    work, names = U._features_graph(proto, (1, 2, 3))
    U.add_score(work, names, g)
    x = rng.integers(0, 256, (5, 1, 192, 192), dtype=np.uint8)
    sess = U._session(work)
    (got,) = sess.run([U.UNKNOWN_OUTPUT], {"slices": x})
    ref = np.zeros(5)
    for f_fit, f in zip(feats, torch_pooled(model, x), strict=True):
        mu = np.stack([f_fit[labels == c].mean(axis=0) for c in range(4)])
        c = (f_fit - mu[labels]).T @ (f_fit - mu[labels]) / (len(f_fit) - 1)
        c = c + U.SHRINKAGE * np.trace(c) / c.shape[0] * np.eye(c.shape[0]) + 1e-9 * np.eye(c.shape[0])
        ref += mahalanobis_reference(f, mu, c) / 3
    assert got.shape == (5,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert (got > 0).all()


def test_whitening_makes_the_covariance_the_identity_and_the_class_mean_scores_zero():
    """W S W^T = I for the shrunk covariance, and a class mean has distance 0."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    f = rng.normal(size=(400, 6)) @ a + np.repeat(np.eye(6)[:4] * 5, 100, axis=0)
    labels = np.repeat(np.arange(4), 100)
    g = U.fit_gaussians([f], labels, CLASSES, (3,), shrinkage=0.0)
    centred = f - g.means[0][labels]
    s = centred.T @ centred / (len(f) - 1)
    np.testing.assert_allclose(g.whiteners[0] @ s @ g.whiteners[0].T, np.eye(6), atol=1e-6)
    np.testing.assert_allclose(g.score([g.means[0]]), 0.0, atol=1e-12)
    far = g.means[0][:1] + 50 * a[:1]
    assert g.score([far])[0] > 10 * g.score([f[:50]]).mean()


def test_fitting_refuses_a_class_without_slices():
    """Every class the model knows needs slices in the fit data: the message names the class and the fix."""
    with pytest.raises(U.UnknownError, match=r"\['ec'\]"):
        U.fit_gaussians([np.zeros((6, 2))], np.array([0, 0, 1, 1, 2, 2]), CLASSES, (3,))


@pytest.mark.parametrize("n, rate", [(200, 0.01), (200, 0.005), (37, 0.1), (1000, 0.0)])
def test_calibrate_flags_at_most_the_rate_and_no_lower_threshold_would(n, rate):
    """The threshold flags <= rate * n parts, and the next lower score would flag more than that."""
    s = np.random.default_rng(n).normal(size=n)
    t = U.calibrate(s, rate)
    flagged = int((s >= t).sum())
    assert flagged <= rate * n
    below = s[s < t]
    if len(below):
        assert int((s >= below.max()).sum()) > rate * n


def test_auroc_matches_the_pairwise_definition():
    """AUROC = P(positive > negative) + P(tie) / 2, counted over every pair."""
    rng = np.random.default_rng(2)
    neg, pos = rng.integers(0, 6, 30).astype(float), rng.integers(2, 9, 20).astype(float)
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert U.auroc(neg, pos) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert U.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and U.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0


@pytest.mark.slow
def test_attach_writes_a_model_the_runtime_loads_and_calibrates_on_good_parts(exported, tmp_path, monkeypatch):
    """attach on rendered frames: the runtime loads the pair (sha256, contract), the threshold flags at most
    the rate of the calibration's good parts, novel slices in the calibration data and a second attach are refused."""
    _, path = exported
    fit, cal, bad = tmp_path / "fit", tmp_path / "cal", tmp_path / "novel"
    write_dataset(fit, 16, seed=1, mix="good=2,dirt=1,scratch=1,ec=1")
    write_dataset(cal, 10, seed=3, mix="good=1")
    write_dataset(bad, 4, seed=5, mix="good=0.5,novel=0.5")
    monkeypatch.setattr(U.command, "MIN_CALIBRATION_GOOD", 10)
    for method in U.METHODS:
        u = U.attach(path, fit, cal, tmp_path / "out" / method, rate=0.1, threads=1, method=method)
        assert u["method"] == method and u["calibration"]["good_parts"] == 10
        assert u["calibration"]["flagged_parts"] <= 1 and u["parity_max_rel"] <= U.PARITY_TOLERANCE
        m = InferenceModel(tmp_path / "out" / method / "model.onnx", providers=("CPUExecutionProvider",),
                           intra_op_threads=1)
        assert m.has_unknown and m.unknown_threshold == pytest.approx(u["threshold"])
        part = U.load_parts(cal, limit=1).slices[0].copy()                    # a good part's 8 slices
        before = m.run(part).unknown
        part[3, 0, 80:112, 80:112] = 255                                      # a bright 32 px patch on slice 3
        after = m.run(part).unknown
        assert after.shape == (8,) and after[3] > before[3]
        if method == "variation":  # a patch this size is far outside the good parts' variation
            assert after[3] >= u["threshold"] and (before < u["threshold"]).all()
        np.testing.assert_allclose(np.delete(after, 3), np.delete(before, 3), rtol=1e-6)  # per-slice scores
    with pytest.raises(U.UnknownError, match="novel"):
        U.attach(path, fit, bad, tmp_path / "out2", rate=0.1, threads=1)
    with pytest.raises(U.UnknownError, match="already has"):
        U.attach(tmp_path / "out" / "variation" / "model.onnx", fit, cal, tmp_path / "out3", rate=0.1, threads=1)
    monkeypatch.setattr(U.command, "MIN_CALIBRATION_GOOD", 100)
    with pytest.raises(U.UnknownError, match="good parts"):
        U.attach(path, fit, cal, tmp_path / "out4", rate=0.1, threads=1)


# ------------------------------------------------------------------ the variation model (the default method)

def _replicate_shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[i, j] = a[clip(i + dy), clip(j + dx)]: OpenCV's replicated border, then a crop."""
    import cv2

    t = max(abs(dy), abs(dx), 1)
    pad = cv2.copyMakeBorder(a, t, t, t, t, cv2.BORDER_REPLICATE)
    return pad[t + dy:t + dy + a.shape[0], t + dx:t + dx + a.shape[1]]


def _middle(a: np.ndarray, axis: int) -> np.ndarray:
    """The median along ``axis`` from a full sort: the middle value, or the mean of the two middle values."""
    s = np.sort(a, axis=axis)
    n = a.shape[axis]
    mid = np.take(s, [n // 2] if n % 2 else [n // 2 - 1, n // 2], axis=axis)
    return mid.mean(axis=axis, keepdims=True)


def _variation_reference(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, f: int, k: int, pos: np.ndarray,
                         sigma: float = 0.0, t: int = 0, shading: str = "highpass"):
    """Independent of models.unknown: OpenCV's GaussianBlur (reflect-101 borders) for the high-pass, its area
    resize (= f x f mean pooling at an integer factor), for the profile shading the log and the row then column
    medians by a full sort, the smallest deviation over the model shifted within +-t px (replicated borders) and
    a box filter over the valid neighbours (zero-padded sums divided by the zero-padded count)."""
    import cv2

    out = []
    for img, p in zip(x[:, 0].astype(np.float64), pos, strict=True):
        if sigma:
            img = img - cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        small = cv2.resize(img, (img.shape[1] // f, img.shape[0] // f), interpolation=cv2.INTER_AREA)
        if shading == "profile":
            small = np.log(small + 1.0)
            small = small - _middle(small, 1)
            small = small - _middle(small, 0)
        d = np.min([np.abs(small - _replicate_shift(mean[p], dy, dx)) / _replicate_shift(scale[p], dy, dx)
                    for dy in range(-t, t + 1) for dx in range(-t, t + 1)], axis=0)
        if k > 1:
            box = cv2.boxFilter(d, -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
            cnt = cv2.boxFilter(np.ones_like(d), -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
            d = box / cnt
        out.append(d.max())
    return np.asarray(out)


@pytest.mark.parametrize("f, k, sigma, t, shading", [
    (4, 1, 0.0, 0, "highpass"), (4, 3, 0.0, 0, "highpass"), (4, 3, 12.0, 0, "highpass"), (4, 3, 12.0, 1, "highpass"),
    (4, 1, 0.0, 2, "highpass"), (4, 3, 0.0, 1, "profile"), (4, 1, 0.0, 0, "profile"),
    (64, 1, 0.0, 0, "profile")])  # 3 x 3 pooled: the odd-length median
def test_the_variation_graph_matches_an_opencv_reference_and_uses_the_batch_position(exported, f, k, sigma, t,
                                                                                      shading):
    """ORT's variation score equals an OpenCV reference within 1e-4 relative (with and without the high-pass, the
    profile shading at even and odd pooled sizes, and the position tolerance), position = batch index mod 8 (a
    batch of 11 slices wraps), and a slice's score changes at another position."""
    _, path = exported
    rng = np.random.default_rng(3)
    h = 192 // f
    if shading == "profile":  # log-ratio residuals: the spread of a few percent
        mean, scale = rng.normal(0, 0.05, (8, h, h)), rng.uniform(0.01, 0.05, (8, h, h))
    else:
        mean = rng.uniform(60, 200, (8, h, h)) if not sigma else rng.normal(0, 3, (8, h, h))
        scale = rng.uniform(2, 9, (8, h, h))
    v = U.VariationModel(f, k, mean, scale, highpass=sigma, tolerance=t, shading=shading)
    work = onnx.load(str(path))
    U.add_variation_score(work, "slices", v)
    x = rng.integers(0, 256, (11, 1, 192, 192), dtype=np.uint8)
    (got,) = U._session(work).run([U.UNKNOWN_OUTPUT], {"slices": x})
    pos = np.arange(11) % 8
    ref = _variation_reference(x, mean, scale, f, k, pos, sigma, t, shading)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_allclose(v.score(x, pos), ref, rtol=1e-9)
    (shifted,) = U._session(work).run([U.UNKNOWN_OUTPUT], {"slices": x[1:9]})  # the same slices, positions - 1
    assert not np.allclose(shifted, got[1:9], rtol=1e-3)


def test_fit_variation_takes_good_slices_per_position_and_refuses_too_few():
    """Mean/spread per position come from the slices labelled good only; a position with < 10 good slices is refused."""
    rng = np.random.default_rng(4)
    slices = rng.integers(90, 110, (12, 8, 1, 192, 192)).astype(np.uint8)
    labels = [["good"] * 8 for _ in range(12)]
    slices[0, 2] = 255  # a defect slice at position 2, labelled dirt: not part of the model
    labels[0][2] = "dirt"
    parts = U.PartSlices(slices, labels, ["good"] * 12, [None] * 12, [str(i) for i in range(12)])
    v = U.fit_variation(parts, 4, 3, highpass_sigma=0.0, shading="highpass")
    assert v.mean.shape == (8, 48, 48) and abs(v.mean[2].mean() - 99.5) < 1.0
    assert v.floor == pytest.approx(float(np.median(v.scale - v.floor)))
    labels[1][5] = labels[2][5] = labels[3][5] = "scratch"
    with pytest.raises(U.UnknownError, match="position 5: 9 good slices"):
        U.fit_variation(U.PartSlices(slices, labels, ["good"] * 12, [None] * 12, [""] * 12), 4, 3, 0.0,
                        shading="highpass")


def test_the_tolerance_forgives_a_pose_shift_and_keeps_a_defect():
    """Good parts whose bright band moves by up to 4 px (one pooled px): with tolerance 1 the fitted spread at the
    band's edges is less than half the rigid model's; a good slice whose band moved 8 px scores like the fitted
    ones with tolerance 2, lower with 1, and far out without (the pose the tolerance forgives), one moved 12 px
    stays far out with tolerance 1 (it forgives a stated distance, not any); a dark blob in the flat region
    stands out either way."""
    rng = np.random.default_rng(6)
    base = np.zeros((192, 192))
    base[:, 80:120] = 60.0
    slices = [np.repeat(np.clip(np.roll(base, int(rng.integers(-4, 5)), axis=1) + 100 + rng.normal(0, 2, base.shape),
                                0, 255)[None, None], 8, axis=0) for _ in range(40)]
    parts = U.PartSlices(np.stack(slices).astype(np.uint8), [["good"] * 8] * 40, ["good"] * 40, [None] * 40, [""] * 40)
    models = {t: U.fit_variation(parts, 4, 1, highpass_sigma=0.0, tolerance=t, shading="highpass") for t in (0, 1, 2)}
    edges = np.s_[:, :, [19, 20, 29, 30]]                          # pooled columns the band's edges cross
    assert (models[1].scale - models[1].floor)[edges].mean() < 0.5 * (models[0].scale - models[0].floor)[edges].mean()

    def slice_(shift, blob=0):
        img = np.roll(base, shift, axis=1) + 100 + rng.normal(0, 2, base.shape)
        img[40:72, 20:36] -= blob
        return np.clip(img, 0, 255).astype(np.uint8)[None, None]

    def score(t, x):
        return float(models[t].score(x, np.zeros(1, int))[0])

    fitted = [score(t, slice_(4)) for t in (0, 1, 2)]
    moved8 = [score(t, slice_(8)) for t in (0, 1, 2)]
    assert max(fitted) < 3
    assert moved8[0] > 10 * fitted[0] and moved8[1] < 0.25 * moved8[0] and moved8[2] < 1.5 * fitted[2]
    assert score(1, slice_(12)) > 10 * fitted[1]
    assert all(score(t, slice_(4, blob=15)) > 5 * fitted[t] for t in (0, 1, 2))


def test_the_profile_shading_forgives_the_lighting_and_keeps_a_smooth_stain():
    """Good slices: a profile across the valve (rows) times a gain of 0.85-1.15, times an end's falloff along it
    (columns), with grain. A good slice lit 1.5x brighter with a 30 % stronger falloff stays inside the profile
    model (log: gain and profile are sums the medians remove) and far outside the raw gray values' model; a
    smooth stain (Gaussian, sigma 24 px, 12 % darker) stands out of the profile model, and the 12 px high-pass,
    which removes most of a blob that smooth, scores it less than half as far out."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:192, 0:192].astype(np.float64)
    profile = 70 + 45 * np.exp(-((yy - 96) / 30) ** 2)  # at most 217 after gain and falloff: never clipped

    def slice_(gain, ends=1.0, stain=0.0):
        falloff = 1 + 0.2 * ends * np.exp(-xx / 40)
        blob = 1 - stain * np.exp(-((yy - 70) ** 2 + (xx - 110) ** 2) / (2 * 24 ** 2))
        img = gain * profile * falloff * blob * (1 + rng.normal(0, 0.02, yy.shape))
        return np.clip(img, 0, 255).astype(np.uint8)[None, None]

    good = np.concatenate([np.repeat(slice_(rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)), 8, axis=0)[None]
                           for _ in range(40)])
    parts = U.PartSlices(good, [["good"] * 8] * 40, ["good"] * 40, [None] * 40, [""] * 40)
    prof = U.fit_variation(parts, 4, 3, tolerance=1, shading="profile")
    raw = U.fit_variation(parts, 4, 3, highpass_sigma=0.0, tolerance=1, shading="highpass")
    hp = U.fit_variation(parts, 4, 3, highpass_sigma=12.0, tolerance=1, shading="highpass")
    zero = np.zeros(1, int)

    def rel(m, x):  # the score relative to the largest of 20 fresh good slices
        top = max(float(m.score(slice_(rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)), zero)[0]) for _ in range(20))
        return float(m.score(x, zero)[0]) / top

    bright = slice_(1.5, 1.3)
    assert rel(prof, bright) < 1.3 and rel(raw, bright) > 3
    stained = slice_(1.0, 1.0, stain=0.12)
    assert rel(prof, stained) > 4 and rel(hp, stained) < 0.5 * rel(prof, stained)
    with pytest.raises(U.UnknownError, match="shading 'flat': one of profile, highpass"):
        U.fit_variation(parts, shading="flat")


def test_the_pooled_blur_matrix_is_opencvs_blur_then_pooling_and_refuses_a_kernel_wider_than_the_slice():
    """M @ x @ M.T equals f x f mean pooling of OpenCV's GaussianBlur (reflect-101) to float64 precision, on a
    non-square image; a sigma whose kernel is wider than the slice is refused with the fix."""
    import cv2

    from models.unknown.scores import pooled_blur_matrix

    img = np.random.default_rng(8).uniform(0, 255, (64, 96))
    for sigma in (2.0, 7.0):
        ref = cv2.resize(cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101), (24, 16),
                         interpolation=cv2.INTER_AREA)
        got = pooled_blur_matrix(64, 4, sigma) @ img @ pooled_blur_matrix(96, 4, sigma).T
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    with pytest.raises(U.UnknownError, match="wider than the slice.*smaller --highpass"):
        pooled_blur_matrix(64, 4, 20.0)  # 161 taps


def test_attach_refuses_a_negative_tolerance_and_an_unknown_shading(exported, tmp_path):
    _, path = exported
    with pytest.raises(U.UnknownError, match="--tolerance -1: a number of pooled px, 0 or more"):
        U.attach(path, tmp_path, tmp_path, tmp_path / "out", tolerance=-1)
    with pytest.raises(U.UnknownError, match="--shading 'flat': one of profile, highpass"):
        U.attach(path, tmp_path, tmp_path, tmp_path / "out", shading="flat")


def test_the_cli_refuses_a_highpass_sigma_the_shading_would_ignore(exported, tmp_path, capsys):
    """--highpass only sets --shading highpass's sigma: given with the default profile shading it would be
    ignored, so the command refuses it (exit 2, naming the fix) before reading any frames."""
    _, path = exported
    argv = ["attach", "--model", str(path), "--fit", str(tmp_path), "--calibrate", str(tmp_path),
            "--out", str(tmp_path / "out"), "--highpass", "6"]
    assert U.main(argv) == 2
    assert "Fix: add --shading highpass, or drop --highpass" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_strip_unknown_gives_back_the_exported_graph(exported):
    """Attaching then stripping the score leaves the exported graph's nodes, constants and outputs as they were."""
    _, path = exported
    original = onnx.load(str(path))
    work = onnx.load(str(path))
    U.add_variation_score(work, "slices", U.VariationModel(4, 3, np.zeros((8, 48, 48)), np.ones((8, 48, 48))))
    assert U.strip_unknown(work) and not U.strip_unknown(work)
    assert [n.name + n.op_type for n in work.graph.node] == [n.name + n.op_type for n in original.graph.node]
    assert [i.name for i in work.graph.initializer] == [i.name for i in original.graph.initializer]
    assert [o.name for o in work.graph.output] == [o.name for o in original.graph.output]
