"""Attention modules for IRA-CNN and its ablation (paper Table 6).

IAM — the paper's improved attention module, eqs (3)-(10):

    F_mix  = e^a/(e^a+1) * GMP(M) + 1/(e^a+1) * GAP(M)        # (B, C, 1, 1), a trainable, a0 = 0
    F_CW   = sigmoid(MLP(F_mix))                              # shared MLP C -> C/2 -> C
    M_ICAM = F_CW * M + M                                     # residual channel attention
    F_SW   = sigmoid(conv7x7([mean_c(M_ICAM); max_c(M_ICAM)])) # (B, 1, H, W)
    M_IAM  = F_SW * M_ICAM + M_ICAM                           # residual spatial attention

The variants for the ablation:
    ``iam``              the full IAM above
    ``iam-no-spatial``   channel part only (M_ICAM)
    ``cbam``             CBAM (Woo et al., ECCV 2018): sigmoid(MLP(GAP)+MLP(GMP)) * M, then
                         sigmoid(conv7x7([mean; max])) * M'; no residuals, no alpha
    ``none``             identity

Every variant keeps the tensor shape (B, C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_KINDS = ("iam", "iam-no-spatial", "cbam", "none")


class ChannelMLP(nn.Module):
    """The shared MLP of the channel branch: 1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SpatialGate(nn.Module):
    """F_SW = sigmoid(conv7x7([mean_c(x); max_c(x)])), shape (B, 1, H, W); eqs (8)-(9)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        mx = x.amax(dim=1, keepdim=True)  # (B, 1, H, W)
        return torch.sigmoid(self.conv(torch.cat([mean, mx], dim=1)))


class ImprovedChannelAttention(nn.Module):
    """ICAM, eqs (3)-(7): alpha-mixed GMP/GAP, shared MLP, sigmoid, residual.

    Args:
        channels: C of the input feature map.
        reduction: the MLP's reduction ratio (the paper: 2).
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))  # a0 = 0: GMP and GAP weighted 1/2 each
        self.mlp = ChannelMLP(channels, reduction)

    def mix_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gmp, w_gap) = (e^a/(e^a+1), 1/(e^a+1)); eq (5)."""
        w_gmp = torch.sigmoid(self.alpha)  # == e^a / (e^a + 1)
        return w_gmp, 1.0 - w_gmp

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        gap = m.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1), eq (3)
        gmp = m.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1), eq (4)
        w_gmp, w_gap = self.mix_weights()
        f_mix = w_gmp * gmp + w_gap * gap  # eq (5)
        f_cw = torch.sigmoid(self.mlp(f_mix))  # eq (6)
        return f_cw * m + m  # eq (7): M_ICAM


class IAM(nn.Module):
    """The improved attention module, eqs (3)-(10). ``spatial=False`` gives "IAM without spatial"."""

    def __init__(self, channels: int, reduction: int = 2, spatial: bool = True) -> None:
        super().__init__()
        self.channel = ImprovedChannelAttention(channels, reduction)
        self.spatial = SpatialGate() if spatial else None

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        m_icam = self.channel(m)  # (B, C, H, W)
        if self.spatial is None:
            return m_icam
        return self.spatial(m_icam) * m_icam + m_icam  # eq (10): M_IAM


class CBAM(nn.Module):
    """CBAM as published: multiplicative channel then spatial gates, no residual, no alpha.

    The reduction ratio is the same as IAM's (2) so that the ablation changes only the
    pooling mix and the residuals.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.mlp = ChannelMLP(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        gap = m.mean(dim=(2, 3), keepdim=True)
        gmp = m.amax(dim=(2, 3), keepdim=True)
        m = torch.sigmoid(self.mlp(gap) + self.mlp(gmp)) * m
        return self.spatial(m) * m


def make_attention(kind: str, channels: int, reduction: int = 2) -> nn.Module:
    """Build one of :data:`ATTENTION_KINDS` for a feature map of ``channels`` channels."""
    if kind == "iam":
        return IAM(channels, reduction, spatial=True)
    if kind == "iam-no-spatial":
        return IAM(channels, reduction, spatial=False)
    if kind == "cbam":
        return CBAM(channels, reduction)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown attention {kind!r}: choose one of {', '.join(ATTENTION_KINDS)}")
