"""IRA-CNN: the improved residual attention CNN of the paper (Table 1).

Data flow for the ``paper`` preset, input (B, 1, 192, 192) gray values 0..255:

    normalise (x/255 - 0.5) / 0.25                         # inside the model and the ONNX graph
    stem: 1x1 conv 32 + BN + ReLU, 1x1 conv 32 + BN + ReLU # (B, 32, 192, 192)
    IRA-Block 64   -> (B, 64, 96, 96)
    IRA-Block 128  -> (B, 128, 48, 48)
    IRA-Block 256  -> (B, 256, 24, 24)                     # features(x): the Grad-CAM++ target
    head: flatten -> FC 1024 -> ReLU -> FC 1024 -> ReLU -> FC K   (logits; softmax outside)

IRA-Block (our reading of the unavailable Fig. 3, see docs/model.md):

    x0 = ReLU(BN(conv3x3(x)))                 # C_in -> C_out
    x1 = ReLU(x0 + BN(conv3x3(ReLU(BN(conv3x3(x0))))))   # residual connection 1
    x2 = ReLU(x1 + BN(conv3x3(ReLU(BN(conv3x3(x1))))))   # residual connection 2
    x3 = attention(x2)                        # IAM, CBAM, IAM without spatial, or none
    out = maxpool2x2(x3)

The ``compact`` preset scales every width by ``width`` and replaces the flatten head by a
global-average-pooling head, so it trains on a 2-core CPU and accepts any input size.

The head is piecewise linear (pool, Linear, ReLU, Dropout), so the gradient of a class score
with respect to the feature map has a closed form: :meth:`IRAHead.grad_wrt_features` computes
it with plain forward ops; the ONNX export uses it to put Grad-CAM++ inside the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from models.attention import ATTENTION_KINDS, make_attention

DEFAULT_CLASSES = ("good", "dirt", "scratch", "ec")
#: classes whose Grad-CAM++ map is binarised into a mask (EC covers the whole valve, Good has none)
DEFAULT_SEGMENTED = ("dirt", "scratch")
PRESETS = ("paper", "compact")
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
#: the head's pooling of the last feature map (IRAHead)
HEAD_POOLS = ("flatten", "gap", "gmp", "mix")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an IRA-CNN; saved as JSON beside the weights.

    Args:
        preset: ``paper`` (Table 1, flatten head) or ``compact`` (width multiplier, GAP head).
        attention: one of ``iam``, ``iam-no-spatial``, ``cbam``, ``none``.
        classes: class names in logit order.
        width: channel multiplier applied to the stem and the three blocks.
        channels: explicit (stem, block 1, block 2, block 3) channels instead of the ones ``width`` gives,
            e.g. ``(4, 16, 16, 32)``: width 0.125 with block 1 at width 0.25 (docs/results.md: on
            KolektorSDD block 1's width decides whether the compact model learns).
        head_width: units of the two hidden FC layers.
        head_pool: ``flatten`` (paper), ``gap`` (compact), ``gmp`` (global max pool) or ``mix``
            (``sigmoid(a) * GMP + (1 - sigmoid(a)) * GAP`` with a trainable ``a``, a0 = 0: the IAM's
            eq (5) mix as the head's pooling); see docs/trainability.md.
        input_size: the side of the square input (192 in the paper).
        dropout: dropout before each hidden FC output (training only).
        reduction: attention MLP reduction ratio (2 in the paper).
    """

    preset: str = "compact"
    attention: str = "iam"
    classes: tuple[str, ...] = DEFAULT_CLASSES
    width: float = 0.125
    head_width: int = 64
    head_pool: str = "gap"
    input_size: int = 192
    dropout: float = 0.3
    reduction: int = 2
    channels: tuple[int, ...] | None = None
    stem_channels: int = field(init=False, default=0)
    block_channels: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.attention!r}: choose one of {', '.join(ATTENTION_KINDS)}")
        if self.head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {', '.join(HEAD_POOLS)}, not {self.head_pool!r}")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        if self.input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8 (three 2x2 pools), not {self.input_size}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.channels is not None:
            ch = tuple(self.channels)
            if len(ch) != 4 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in ch):
                raise ValueError(f"channels must be four positive whole numbers (stem, block 1, block 2, block 3), "
                                 f"not {self.channels!r}")
            object.__setattr__(self, "channels", ch)
            object.__setattr__(self, "stem_channels", ch[0])
            object.__setattr__(self, "block_channels", ch[1:])
            return
        object.__setattr__(self, "stem_channels", max(4, round(32 * self.width)))
        object.__setattr__(self, "block_channels", tuple(max(4, round(c * self.width)) for c in (64, 128, 256)))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def feature_size(self) -> int:
        return self.input_size // 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stem_channels")
        d.pop("block_channels")
        d["classes"] = list(self.classes)
        if self.channels is None:
            d.pop("channels")  # configs written before explicit channels stay as they were
        else:
            d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k not in ("stem_channels", "block_channels")}
        if known.get("channels") is not None:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


def preset_config(preset: str, attention: str = "iam", **overrides) -> ModelConfig:
    """The two presets: ``paper`` is Table 1 exactly (~155 M parameters); ``compact`` is small."""
    if preset == "paper":
        base = ModelConfig(preset="paper", attention=attention, width=1.0, head_width=1024,
                           head_pool="flatten", dropout=0.5)
    elif preset == "compact":
        base = ModelConfig(preset="compact", attention=attention, width=0.125, head_width=64,
                           head_pool="gap", dropout=0.3)
    else:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return replace(base, **overrides) if overrides else base


def conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=k, padding=k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualUnit(nn.Module):
    """x -> ReLU(x + BN(conv3x3(ReLU(BN(conv3x3(x)))))): one of the block's two residuals."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.conv1(x))))


class IRABlock(nn.Module):
    """IRA-Block: 3x3 conv (C_in -> C_out), two residual units, attention, 2x2 max-pool.

    Args:
        c_in: input channels.
        c_out: output channels (64, 128, 256 in the paper).
        attention: the attention variant.
        reduction: the attention MLP's reduction ratio.
    """

    def __init__(self, c_in: int, c_out: int, attention: str = "iam", reduction: int = 2) -> None:
        super().__init__()
        self.proj = conv_bn_relu(c_in, c_out, 3)  # (B, C_out, H, W)
        self.res1 = ResidualUnit(c_out)
        self.res2 = ResidualUnit(c_out)
        self.attn = make_attention(attention, c_out, reduction)
        self.pool = nn.MaxPool2d(2)  # (B, C_out, H/2, W/2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.attn(self.res2(self.res1(self.proj(x)))))


class IRAHead(nn.Module):
    """pool -> FC -> ReLU -> Dropout -> FC -> ReLU -> Dropout -> FC K.

    ``pool`` is ``flatten`` (paper: 24*24*256 inputs to the first FC), ``gap`` (mean over the
    positions), ``gmp`` (max over the positions: a small defect is not averaged away) or ``mix``
    (``w * GMP + (1 - w) * GAP``, ``w = sigmoid(alpha)`` = e^a/(e^a+1), alpha trainable from 0,
    as the IAM's eq (5)). GMP takes the first position of the maximum per channel (``max(dim)``),
    so its gradient is exactly one-hot there, in autograd and in :meth:`forward_with_grad` alike.
    """

    def __init__(self, channels: int, spatial: int, hidden: int, num_classes: int, pool: str,
                 dropout: float) -> None:
        super().__init__()
        if pool not in HEAD_POOLS:
            raise ValueError(f"head pool must be one of {', '.join(HEAD_POOLS)}, not {pool!r}")
        self.pool_kind = pool
        self.spatial = spatial
        n_in = channels * spatial * spatial if pool == "flatten" else channels
        if pool == "mix":
            self.alpha = nn.Parameter(torch.zeros(1))  # a0 = 0: GMP and GAP weighted 1/2 each
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(dropout)
        self.act = nn.ReLU()

    def _pool_and_argmax(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled (B, N_in), argmax position per channel (B, C) or None)."""
        if self.pool_kind == "flatten":
            return torch.flatten(f, 1), None  # (B, C*H*W)
        if self.pool_kind == "gap":
            return f.mean(dim=(2, 3)), None  # (B, C)
        mx, idx = torch.flatten(f, 2).max(dim=2)  # (B, C), (B, C)
        if self.pool_kind == "gmp":
            return mx, idx
        w = torch.sigmoid(self.alpha)
        return w * mx + (1.0 - w) * f.mean(dim=(2, 3)), idx

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        return self._pool_and_argmax(f)[0]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z1 = self.fc1(self.pool(f))
        z2 = self.fc2(self.drop(self.act(z1)))
        return self.fc3(self.drop(self.act(z2)))  # (B, K) logits

    def forward_with_grad(self, f: torch.Tensor, class_idx: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the chosen class per sample, and d logit[class] / d f by explicit backprop.

        Eval mode only (dropout is the identity). ``class_idx`` defaults to the argmax.
        Returns (logits (B, K), class_idx (B,), grad (B, C, H, W)).
        """
        p, idx = self._pool_and_argmax(f)
        z1 = self.fc1(p)
        h1 = self.act(z1)
        z2 = self.fc2(h1)
        h2 = self.act(z2)
        logits = self.fc3(h2)
        if class_idx is None:
            class_idx = logits.argmax(dim=1)
        g = self.fc3.weight[class_idx]  # (B, H2): d s / d h2
        g = g * (z2 > 0).to(g.dtype)  # through ReLU
        g = g @ self.fc2.weight  # (B, H1): d s / d h1
        g = g * (z1 > 0).to(g.dtype)
        g = g @ self.fc1.weight  # (B, N_in): d s / d pool(f)
        b, c, h, w = f.shape
        if self.pool_kind == "flatten":
            return logits, class_idx, g.reshape(b, c, h, w)
        if self.pool_kind == "gap":
            return logits, class_idx, (g / float(h * w)).reshape(b, c, 1, 1).expand(b, c, h, w)
        # GMP: the gradient reaches only the argmax position of each channel (a one-hot of plain ops)
        positions = torch.arange(h * w, device=f.device).reshape(1, 1, h * w)
        onehot = (positions == idx.unsqueeze(2)).to(g.dtype)  # (B, C, H*W)
        if self.pool_kind == "gmp":
            grad = g.unsqueeze(2) * onehot
        else:  # mix: (1 - w) / (H W) everywhere plus w at the argmax
            wt = torch.sigmoid(self.alpha)
            grad = g.unsqueeze(2) * (wt * onehot + (1.0 - wt) / float(h * w))
        return logits, class_idx, grad.reshape(b, c, h, w)


def ensure_both_polarities(conv: nn.Conv2d) -> bool:
    """Give the stem's first 1x1 conv (one gray channel in) weights of both signs; True when it flipped some.

    BatchNorm follows it and removes each weight's magnitude, so its channel i is ReLU(+z) or ReLU(-z) (z: the
    standardised gray value) by the sign of its weight alone, and that sign gets no gradient: the loss does not
    depend on the magnitude, and the sign cannot cross 0. When every sign is the same (probability 2^(1-s) for s
    channels: 1 in 8 at width 0.125's 4) the network sees one side of the mean only, e.g. nothing of a dark
    crack on a bright surface; on KolektorSDD such starts stalled at the chance level (docs/results.md, "the
    stem's signs"). The second half of the channels is flipped then; a draw with both signs is left unchanged.
    """
    w = conv.weight
    if w.shape[1] != 1 or w.shape[0] < 2 or not ((w > 0).all() or (w < 0).all()):
        return False
    with torch.no_grad():
        w[w.shape[0] // 2:] *= -1
    return True


#: how the stem's second 1x1 conv starts: "identity" (nn.init.dirac_: each channel of the first layer passes on
#: as it is, so both polarities reach the blocks) or "drawn" (Kaiming normal, as every other conv)
STEM_INITS = ("identity", "drawn")


def init_stem(model: IRACNN, how: str) -> None:
    """Start the stem's second 1x1 conv as ``how`` says (STEM_INITS). The stem is a per-pixel function of the gray
    value (two 1x1 convs on one channel); with width 0.125's 4 channels a drawn second layer can leave it flat
    where a defect is, and on KolektorSDD seed 0 stalled so even with both signs in the first layer
    (docs/results.md, "The stem's signs"): the identity does not."""
    if how not in STEM_INITS:
        raise ValueError(f"stem init must be one of {', '.join(STEM_INITS)}, not {how!r}")
    if how == "identity":
        with torch.no_grad():
            nn.init.dirac_(model.stem[1][0].weight)


class IRACNN(nn.Module):
    """IRA-CNN (Table 1). ``forward(x) == head(features(x))``; x is raw gray 0..255, (B, 1, S, S)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD), persistent=False)
        s = config.stem_channels
        self.stem = nn.Sequential(conv_bn_relu(1, s, 1), conv_bn_relu(s, s, 1))  # (B, 32, 192, 192)
        c1, c2, c3 = config.block_channels
        self.block1 = IRABlock(s, c1, config.attention, config.reduction)  # (B, 64, 96, 96)
        self.block2 = IRABlock(c1, c2, config.attention, config.reduction)  # (B, 128, 48, 48)
        self.block3 = IRABlock(c2, c3, config.attention, config.reduction)  # (B, 256, 24, 24)
        self.classifier = IRAHead(c3, config.feature_size, config.head_width, config.num_classes,
                                  config.head_pool, config.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The logit layer feeds a softmax, not a ReLU: small weights start the loss near ln K.
        nn.init.normal_(self.classifier.fc3.weight, std=0.01)
        ensure_both_polarities(self.stem[0][0])

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw gray values 0..255 (any dtype) -> float, the model's first step."""
        return (x.to(torch.float32) / 255.0 - self.pixel_mean) / self.pixel_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (B, C, S/8, S/8): the Grad-CAM++ target."""
        x = self.stem(self.normalise(x))
        return self.block3(self.block2(self.block1(x)))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def segmented_classes(classes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Which classes get an Otsu mask: dirt and scratch where present; for other class sets
    (the public datasets) every class except ``good``/``free``."""
    named = tuple(c for c in classes if c in DEFAULT_SEGMENTED)
    if named:
        return named
    return tuple(c for c in classes if c.lower() not in ("good", "free", "mt_free", "ok", "ec"))


def build_model(config: ModelConfig) -> IRACNN:
    return IRACNN(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
