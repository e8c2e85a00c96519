"""Class saliency on the last feature map: Grad-CAM++, Grad-CAM and CAM, by autograd.

This is the reference the ONNX graph is checked against. With A = features(x), (B, C, h, w),
and g = d s_c / d A for the class c (the predicted class unless given), s_c being the logit:

    Grad-CAM++ (eqs 11-13, closed form as in Chattopadhay et al. and pytorch-grad-cam):
        alpha = g^2 / (2 g^2 + sum_ij(A) * g^3)      (0 where the denominator is 0)
        w_k   = sum_ij alpha * relu(g)
        map   = relu(sum_k w_k A_k)
    Grad-CAM:  w_k = mean_ij g;  map = relu(sum_k w_k A_k)
    CAM:       map = relu(h*w * sum_k g_k(i,j) A_k(i,j)). For a GAP + linear head this is exactly
               Zhou et al.'s sum_k w_ck A_k; for our piecewise-linear FC head it is the exact
               per-location share of the logit (the head linearised at this input).

Every map is upsampled bilinearly (align_corners=False) to the input size and min-max scaled to
[0, 1] per slice; a flat map becomes all zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ira_cnn import IRACNN

METHODS = ("gradcam++", "gradcam", "cam")
EPS = 1e-7


def weighted_map(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations and gradients -> (B, h, w) raw map (before scaling)."""
    if method == "gradcam++":
        g2 = grads * grads
        g3 = g2 * grads
        sum_a = acts.sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        denom = 2.0 * g2 + sum_a * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        weights = (alpha * torch.relu(grads)).sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return torch.relu((weights * acts).sum(dim=1))
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * acts).sum(dim=1))
    if method == "cam":
        h, w = acts.shape[2:]
        return torch.relu((grads * acts).sum(dim=1) * float(h * w))
    raise ValueError(f"unknown saliency method {method!r}: choose one of {', '.join(METHODS)}")


def scale_map(raw: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W): bilinear upsampling (align_corners=False), min-max to [0, 1]."""
    if isinstance(size, int):
        size = (size, size)
    up = F.interpolate(raw.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = up.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    rng = hi - lo
    safe = torch.where(rng > EPS, rng, torch.ones_like(rng))
    return torch.where(rng > EPS, (up - lo) / safe, torch.zeros_like(up))


def saliency(model: IRACNN, x: torch.Tensor, method: str = "gradcam++",
             class_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd reference: (logits (B, K), maps (B, H, W) in [0, 1]) for ``class_idx`` or argmax.

    The model should be in eval mode (BatchNorm and dropout fixed), so each sample's score
    depends on its own features only and one backward of the summed scores gives every
    sample's gradient.
    """
    with torch.enable_grad():
        acts = model.features(x)
        acts_leaf = acts.detach().requires_grad_(True)
        logits = model.head(acts_leaf)
        if class_idx is None:
            class_idx = logits.argmax(dim=1)
        score = logits.gather(1, class_idx.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, acts_leaf)
    raw = weighted_map(method, acts.detach(), grads)
    return logits.detach(), scale_map(raw, tuple(x.shape[-2:])).detach()
