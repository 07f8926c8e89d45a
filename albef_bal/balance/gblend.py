"""Gradient Blending weights.

Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?",
CVPR 2020. For each loss k, over a window from checkpoint N to N + n:

    G_k = L^val_k(N) - L^val_k(N + n)                                   (generalisation gain)
    O_k = (L^val_k(N + n) - L^train_k(N + n)) - (L^val_k(N) - L^train_k(N))   (overfitting)
    w_k proportional to G_k / O_k^2,  normalised to sum 1

In ALBEF the losses are {vision ITC half (i2t), text ITC half (t2i), multimodal (ITM + MLM)};
both L^train and L^val are means over equal-size subsets measured in eval mode.

Two guards, both choices made here: a loss whose held-out loss did not fall (G_k <= 0) gets
weight 0 (the formula would give a zero or negative weight), and O_k^2 is floored at ``eps``
so a loss that did not overfit at all does not get an infinite weight. If no loss improved,
all weights are equal.

Scale. Normalised weights sum to 1, which shrinks ALBEF's total loss ``ITC + ITM + MLM`` by
about the number of losses K; with an optimizer that is not scale-invariant (SGD), or with a
tuned learning rate, this changes the effective step. ``sum_to_count=True`` (or
:func:`scale_to_count`) rescales them to sum to K, so equal weights are all 1 and reproduce
the unweighted ALBEF loss.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Losses = Union[torch.Tensor, Sequence[float]]


def gblend_weights(train_start: Losses, train_end: Losses, val_start: Losses, val_end: Losses,
                   eps: float = 1e-8, sum_to_count: bool = False) -> torch.Tensor:
    """G-Blend weights [K] from per-loss mean losses at the start and end of a window.

    ``w_k = max(G_k, 0) / max(O_k^2, eps)`` normalised to sum 1 (to sum K with
    ``sum_to_count=True``); equal weights when every ``G_k <= 0``. Inputs are [K] tensors or
    sequences; the result is a float32 tensor on the inputs' device (float32 so that
    multiplying a float32 loss by a weight does not promote it to float64)."""
    # Python numbers go straight to float64 (torch would round them to float32 first)
    tensors = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
               for x in (train_start, train_end, val_start, val_end)]
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    tr0, tr1, va0, va1 = (t.detach().to(device=device, dtype=torch.float64).reshape(-1) for t in tensors)
    if not (tr0.shape == tr1.shape == va0.shape == va1.shape):
        raise ValueError("all four loss vectors must have the same length K")
    if tr0.numel() == 0:
        raise ValueError("no losses given")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    gain = va0 - va1
    overfit = (va1 - tr1) - (va0 - tr0)
    raw = gain.clamp_min(0.0) / (overfit * overfit).clamp_min(eps)
    total = raw.sum()
    k = raw.numel()
    if total > 0:
        w = raw / total
    else:  # no loss generalised better over the window: no evidence to prefer any
        w = torch.full_like(raw, 1.0 / k)
    if sum_to_count:
        w = w * k
    return w.to(torch.float32)


def scale_to_count(weights: Losses) -> torch.Tensor:
    """Rescale weights so they sum to their count K (``w * K / sum(w)``), keeping ALBEF's loss
    scale: equal weights become all ones."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    s = w.sum()
    if not s > 0:
        raise ValueError("weights must have a positive sum")
    return w * (w.numel() / s)
