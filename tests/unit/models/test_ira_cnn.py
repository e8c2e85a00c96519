"""IRA-CNN and IAM against the paper's Table 1 and eqs (3)-(10)."""

import json
import math

import pytest
import torch

from models.attention import ATTENTION_KINDS, CBAM, IAM, ImprovedChannelAttention, make_attention
from models.ira_cnn import IRACNN, ModelConfig, build_model, count_parameters, preset_config


@pytest.fixture(scope="module")
def paper_model() -> IRACNN:
    torch.manual_seed(0)
    return build_model(preset_config("paper")).eval()


def test_paper_preset_intermediate_shapes_match_table_1(paper_model):
    """Every stage of the paper preset has Table 1's output shape for a 192x192 input."""
    seen = {}
    hooks = [getattr(paper_model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
             for n in ("stem", "block1", "block2", "block3", "classifier")]
    hooks.append(paper_model.classifier.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o.shape)))
    hooks.append(paper_model.classifier.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("fc2", o.shape)))
    x = torch.randint(0, 256, (1, 1, 192, 192), dtype=torch.uint8)
    with torch.no_grad():
        paper_model(x)
    for h in hooks:
        h.remove()
    assert seen["stem"] == (1, 32, 192, 192)
    assert seen["block1"] == (1, 64, 96, 96)
    assert seen["block2"] == (1, 128, 48, 48)
    assert seen["block3"] == (1, 256, 24, 24)
    assert seen["fc1"] == (1, 1024)
    assert seen["fc2"] == (1, 1024)
    assert seen["classifier"] == (1, 4)
    assert paper_model.classifier.fc1.in_features == 24 * 24 * 256


def test_paper_preset_has_about_155_million_parameters(paper_model):
    """The flatten head makes the paper preset ~155 M parameters (24*24*256*1024 alone is 151 M)."""
    n = count_parameters(paper_model)
    assert 150e6 < n < 160e6, n


def test_stem_is_two_1x1_convs_of_32_filters(paper_model):
    """The stem is two 1x1 convolutions with 32 filters each."""
    convs = [m for m in paper_model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((1, 1), 32), ((1, 1), 32)]


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("preset", ["paper", "compact"])
def test_forward_is_head_of_features(preset, attention):
    """forward(x) == head(features(x)) and features are (B, C, 24, 24) for every variant."""
    torch.manual_seed(1)
    cfg = preset_config(preset, attention, width=0.125, head_width=32) if preset == "paper" \
        else preset_config(preset, attention)
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (2, 1, 192, 192), dtype=torch.uint8)
    with torch.no_grad():
        f = model.features(x)
        assert f.shape == (2, cfg.block_channels[-1], 24, 24)
        torch.testing.assert_close(model(x), model.head(f))


def test_raw_gray_input_dtype_does_not_matter():
    """Normalisation is inside the model: uint8 and float gray values give the same logits."""
    model = build_model(preset_config("compact")).eval()
    x = torch.randint(0, 256, (2, 1, 192, 192), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float()))


def test_icam_alpha_starts_at_zero_and_mixes_gmp_and_gap_equally():
    """alpha0 = 0 gives the weights e^a/(e^a+1) = 1/(e^a+1) = 1/2 on GMP and GAP (eq 5)."""
    icam = ImprovedChannelAttention(8)
    assert icam.alpha.item() == 0.0
    w_gmp, w_gap = icam.mix_weights()
    assert w_gmp.item() == pytest.approx(0.5) and w_gap.item() == pytest.approx(0.5)
    with torch.no_grad():
        icam.alpha.fill_(1.3)
    w_gmp, w_gap = icam.mix_weights()
    assert w_gmp.item() == pytest.approx(math.exp(1.3) / (math.exp(1.3) + 1))
    assert w_gap.item() == pytest.approx(1 / (math.exp(1.3) + 1))
    assert icam.alpha.requires_grad


def test_iam_matches_equations_3_to_10_written_out():
    """IAM's output equals eqs (3)-(10) computed by hand from its own parameters."""
    torch.manual_seed(2)
    iam = IAM(6, reduction=2)
    with torch.no_grad():
        iam.channel.alpha.fill_(0.7)
    m = torch.randn(3, 6, 5, 7)
    a = torch.tensor(0.7)
    f_mix = torch.exp(a) / (torch.exp(a) + 1) * m.amax(dim=(2, 3), keepdim=True) \
        + 1 / (torch.exp(a) + 1) * m.mean(dim=(2, 3), keepdim=True)
    mlp = iam.channel.mlp
    f_cw = torch.sigmoid(mlp.fc2(torch.relu(mlp.fc1(f_mix))))
    assert mlp.fc1.out_channels == 3  # reduction 2
    m_icam = f_cw * m + m
    s = torch.cat([m_icam.mean(1, keepdim=True), m_icam.amax(1, keepdim=True)], 1)
    assert iam.spatial.conv.kernel_size == (7, 7)
    f_sw = torch.sigmoid(iam.spatial.conv(s))
    expected = f_sw * m_icam + m_icam
    torch.testing.assert_close(iam(m), expected)


def test_iam_without_spatial_is_the_channel_part_only():
    """'iam-no-spatial' returns M_ICAM and has no spatial convolution."""
    mod = make_attention("iam-no-spatial", 8)
    assert mod.spatial is None
    m = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(mod(m), mod.channel(m))


def test_cbam_has_no_residual_and_no_alpha():
    """CBAM multiplies by its gates (a zero gate zeroes the output) and has no alpha."""
    cbam = CBAM(4)
    assert not any("alpha" in n for n, _ in cbam.named_parameters())
    with torch.no_grad():
        cbam.spatial.conv.weight.fill_(-1e4)  # spatial gate ~ 0
    out = cbam(torch.rand(1, 4, 6, 6) + 1)
    assert out.abs().max() < 1e-3


def test_unknown_names_are_rejected_with_the_choices():
    """A typo in preset or attention names the valid choices."""
    with pytest.raises(ValueError, match="iam-no-spatial"):
        make_attention("iam-nospatial", 4)
    with pytest.raises(ValueError, match="compact"):
        preset_config("tiny")
    with pytest.raises(ValueError, match="multiple of 8"):
        ModelConfig(input_size=100)


def test_explicit_head_backprop_equals_autograd():
    """IRAHead.forward_with_grad gives autograd's d logit[argmax] / d features, both pools."""
    for preset in ("paper", "compact"):
        torch.manual_seed(3)
        cfg = preset_config(preset, width=0.125, head_width=64) if preset == "paper" else preset_config(preset)
        model = build_model(cfg).eval()
        f = torch.relu(torch.randn(3, cfg.block_channels[-1], 24, 24))
        logits, cls, grad = model.classifier.forward_with_grad(f)
        leaf = f.clone().requires_grad_(True)
        out = model.head(leaf)
        (ref,) = torch.autograd.grad(out.gather(1, cls.view(-1, 1)).sum(), leaf)
        torch.testing.assert_close(logits, out.detach())
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pool", ["gmp", "mix"])
def test_max_pool_heads_backprop_equals_autograd(pool):
    """forward_with_grad is exact for the GMP and the alpha-mixed GAP/GMP heads: on a ReLU map with
    ties (a dead channel, many zeros), for the argmax and for a given class, with alpha moved off 0."""
    torch.manual_seed(4)
    cfg = preset_config("compact", head_pool=pool)
    model = build_model(cfg).eval()
    if pool == "mix":
        with torch.no_grad():
            model.classifier.alpha.fill_(0.7)
    f = torch.relu(torch.randn(3, cfg.block_channels[-1], 24, 24))
    f[:, 0] = 0.0  # a dead channel: every position ties at the maximum
    for class_idx in (None, torch.tensor([1, 0, 3])):
        logits, cls, grad = model.classifier.forward_with_grad(f, class_idx)
        leaf = f.clone().requires_grad_(True)
        out = model.head(leaf)
        (ref,) = torch.autograd.grad(out.gather(1, cls.view(-1, 1)).sum(), leaf)
        torch.testing.assert_close(logits, out.detach())
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
        if class_idx is not None:
            assert cls.tolist() == class_idx.tolist()


def test_gmp_gradient_sits_at_the_argmax_and_mix_spreads_the_rest():
    """GMP: the gradient is non-zero only at one (the argmax) position per channel. Mix with
    w = sigmoid(alpha): (1 - w) g / (H W) everywhere plus w g at the argmax, g = d s / d pooled."""
    torch.manual_seed(5)
    gmp = build_model(preset_config("compact", head_pool="gmp")).eval()
    f = torch.rand(2, gmp.config.block_channels[-1], 24, 24)
    _, _, grad = gmp.classifier.forward_with_grad(f)
    flat_f, flat_g = f.flatten(2), grad.flatten(2)
    assert ((flat_g != 0).sum(dim=2) <= 1).all()
    nonzero = flat_g.abs().argmax(dim=2)
    has = (flat_g != 0).any(dim=2)
    assert (nonzero[has] == flat_f.argmax(dim=2)[has]).all()

    mix = build_model(preset_config("compact", head_pool="mix")).eval()
    with torch.no_grad():
        mix.classifier.alpha.fill_(-0.4)
    w = torch.sigmoid(torch.tensor(-0.4))
    _, cls, grad = mix.classifier.forward_with_grad(f)
    pooled = (w * f.flatten(2).amax(dim=2) + (1 - w) * f.mean(dim=(2, 3))).requires_grad_(True)
    h = mix.classifier
    s = h.fc3(torch.relu(h.fc2(torch.relu(h.fc1(pooled))))).gather(1, cls.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(s, pooled)  # (B, C): d s / d pooled
    expect = (g * (1 - w) / (24 * 24)).unsqueeze(2).expand(-1, -1, 24 * 24).clone()
    expect.scatter_add_(2, f.flatten(2).argmax(dim=2, keepdim=True), (w * g).unsqueeze(2))
    torch.testing.assert_close(grad.flatten(2), expect, rtol=1e-5, atol=1e-7)


def test_mix_head_alpha_starts_at_zero_and_trains():
    """The mix head's alpha is a parameter starting at 0 (GMP and GAP 1/2 each) that receives a gradient;
    an unknown head pool names the choices."""
    model = build_model(preset_config("compact", head_pool="mix"))
    assert model.classifier.alpha.item() == 0.0
    model(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)).sum().backward()
    assert model.classifier.alpha.grad is not None and model.classifier.alpha.grad.abs().item() > 0
    with pytest.raises(ValueError, match="gmp, mix"):
        preset_config("compact", head_pool="lse")


def test_explicit_channels_replace_the_widths_and_survive_the_config_round_trip():
    cfg = preset_config("compact", channels=(4, 16, 16, 32), head_pool="mix")
    assert (cfg.stem_channels, cfg.block_channels) == (4, (16, 16, 32))
    model = build_model(cfg)
    assert model.stem[0][0].out_channels == 4 and model.block1.proj[0].out_channels == 16
    assert model.block3.proj[0].out_channels == 32
    assert model(torch.zeros(2, 1, 192, 192)).shape == (2, 4)
    d = cfg.to_dict()
    assert d["channels"] == [4, 16, 16, 32]
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a config without explicit channels is written exactly as before they existed
    assert "channels" not in preset_config("compact").to_dict()
    assert ModelConfig.from_dict(preset_config("compact").to_dict()).block_channels == (8, 16, 32)


@pytest.mark.parametrize("bad", [(4, 16, 16), (4, 0, 16, 32), (4, 16.5, 16, 32), (4, True, 16, 32)])
def test_channels_that_are_not_four_positive_whole_numbers_are_refused(bad):
    with pytest.raises(ValueError, match="four positive whole numbers"):
        preset_config("compact", channels=bad)


def _stem_sees_a_dark_spot(model: IRACNN) -> bool:
    """At initialisation (eval mode: BatchNorm is the identity), does the stem's first layer (conv, BN, ReLU) tell
    a spot at gray 20 from one at 60 on a 128 background? Both are below the mean, so weights that are all
    positive map both to 0. (The second layer mixes channels and learns; the first layer's signs cannot.)"""
    x = torch.full((2, 1, 32, 32), 128.0)
    x[0, :, 8:16, 8:16] = 20.0
    x[1, :, 8:16, 8:16] = 60.0
    model.eval()
    with torch.no_grad():
        z = model.normalise(x)
        out = model.stem[0](z)
    return not torch.allclose(out[0], out[1])


def test_the_stems_first_conv_starts_with_both_signs_and_so_sees_dark_and_bright(monkeypatch):
    """Width 0.125's stem has 4 channels: a seed whose draw gives them one sign (4 of these 16, where 1 in 8 is
    expected) would leave the network blind below the mean for good (the sign gets no gradient). Every seed's
    model has both signs and tells the two dark spots apart; a draw that already had both is left unchanged, and
    the same model with its stem's signs made one (the draw the fix repairs) is blind to the spot."""
    import models.ira_cnn as M

    def build(seed: int) -> IRACNN:
        torch.manual_seed(seed)
        return build_model(preset_config("compact", "iam", classes=("good", "defect"), width=0.125, head_pool="mix"))

    fixed = {seed: build(seed) for seed in range(16)}
    monkeypatch.setattr(M, "ensure_both_polarities", lambda conv: False)  # the draws as they come
    raw = {seed: build(seed) for seed in range(16)}
    flipped = []
    for seed, m in fixed.items():
        w, w0 = m.stem[0][0].weight.flatten(), raw[seed].stem[0][0].weight.flatten()
        assert (w > 0).any() and (w < 0).any(), (seed, w)
        assert _stem_sees_a_dark_spot(m), seed
        if torch.equal(w, w0):
            assert (w0 > 0).any() and (w0 < 0).any()
        else:
            flipped.append(seed)
            assert (w0 > 0).all() or (w0 < 0).all(), (seed, w0)
            assert torch.equal(w.abs(), w0.abs()) and torch.equal(w[:2], w0[:2])  # only the second half's signs
            assert not _stem_sees_a_dark_spot(raw[seed]) or bool((w0 < 0).all())
    assert flipped == [0, 6, 8, 15]
    m = build(1)
    with torch.no_grad():
        m.stem[0][0].weight.abs_()
    assert not _stem_sees_a_dark_spot(m)


def test_the_identity_stem_passes_both_polarities_on_for_every_seed():
    """With the identity second layer the whole stem (both 1x1 layers) tells the two dark spots apart for each of
    16 seeds at width 0.125; drawn, it does not for some (the second layer can flatten the dark side too). An
    unknown choice is refused."""
    from models.ira_cnn import init_stem

    def stem_sees(m: IRACNN) -> bool:
        x = torch.full((2, 1, 32, 32), 128.0)
        x[0, :, 8:16, 8:16], x[1, :, 8:16, 8:16] = 20.0, 60.0
        m.eval()
        with torch.no_grad():
            out = m.stem(m.normalise(x))
        return not torch.allclose(out[0], out[1])

    blind_drawn = []
    for seed in range(16):
        for how in ("identity", "drawn"):
            torch.manual_seed(seed)
            m = build_model(preset_config("compact", "iam", classes=("good", "defect"), width=0.125, head_pool="mix"))
            init_stem(m, how)
            if how == "identity":
                assert torch.equal(m.stem[1][0].weight[:, :, 0, 0], torch.eye(4)) and stem_sees(m), seed
            elif not stem_sees(m):
                blind_drawn.append(seed)
    assert blind_drawn, "no drawn stem was blind: the identity's test would show nothing"
    with pytest.raises(ValueError, match="stem init must be one of identity, drawn"):
        init_stem(m, "zeros")
