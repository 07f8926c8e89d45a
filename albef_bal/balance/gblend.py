"""Gradient Blending weights.

Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?",
CVPR 2020. For each loss k, over a window from checkpoint N to N + n:

    G_k = L^val_k(N) - L^val_k(N + n)                                   (generalisation gain)
    O_k = (L^val_k(N + n) - L^train_k(N + n)) - (L^val_k(N) - L^train_k(N))   (overfitting)
    w_k proportional to G_k / O_k^2,  normalised to sum 1

In ALBEF the losses are {vision ITC half (i2t), text ITC half (t2i), multimodal (ITM + MLM)}
(``balance.unimodal_loss: itc``), or with ``ssl`` {vision feature-space loss, text
feature-space loss (``model.unimodal``), multimodal (ITC + ITM + MLM)}; both L^train and
L^val are means over equal-size subsets measured in eval mode.

Two guards, both choices made here: a loss whose held-out loss did not fall (G_k <= 0) gets
weight 0 (the formula would give a zero or negative weight), and O_k^2 is floored at ``eps``
so a loss that did not overfit at all does not get an infinite weight. If no loss improved,
all weights are equal.

Two options added here (off by default), because a loss at weight 0 is not trained, so it
shows no held-out gain in the next window and keeps weight 0 for the rest of the run (the
imbalance study's runs collapsed to w = (0, 0, 3) after the first window):
:func:`floor_weights` raises every weight to at least a floor, and :func:`mix_uniform`
blends the weights with equal ones. Both act on the weights normalised to sum 1, before
the ``sum_to_count`` rescale.

Scale. Normalised weights sum to 1, which shrinks ALBEF's total loss ``ITC + ITM + MLM`` by
about the number of losses K; with an optimizer that is not scale-invariant (SGD), or with a
tuned learning rate, this changes the effective step. ``sum_to_count=True`` (or
:func:`scale_to_count`) rescales them to sum to K, so equal weights are all 1 and reproduce
the unweighted ALBEF loss.

Training hooks (:class:`GBlendHooks`, below the formulas)
---------------------------------------------------------

The three losses and their weights w = [w_v, w_t, w_mm] multiply ALBEF's own terms:

    loss = w_v * itc/2 * L_i2t + w_t * itc/2 * L_t2i + w_mm * (itm * L_itm + mlm * L_mlm)
           [+ uni_image * L_uni_image + uni_text * L_uni_text, unweighted by w, when on]
    ssl:  loss = w_v * uni_image * L_uni_image + w_t * uni_text * L_uni_text
                 + w_mm * (itc * L_itc + itm * L_itm + mlm * L_mlm)

so w = [1, 1, 1] is exactly ALBEF's loss (``sum_to_count: true`` keeps the weights on that
scale: they sum to 3).

- ``mode: offline``: the weights are fixed: ``weights`` from the config, or
  ``weights_file`` (JSON written by ``albef-bal gblend-estimate``).
- ``mode: online``: the mean losses of a training subset and a held-out subset (equal
  sizes, eval mode, fixed seed; the same subsets every time) are measured before the first
  step and every ``window`` optimizer steps; each window's measurements give new weights
  for the next window. The first window trains with ``weights`` (default equal).
  Every estimate is also written to ``<output_dir>/gblend_weights.json``.

Options added here, each off by default (today's behaviour): ``floor`` / ``uniform_mix``
(above); ``measure_alpha: 0`` measures the losses without distillation and
``measure_queue: false`` scores ITC against each subset batch's momentum features only, so
that G and O follow the model and not the queue's contents (the momentum features on the
other side still move with the model; that is the loss being trained); ``holdout:
train_shard`` draws the held-out subset from a training shard held out of training, so
that O measures overfitting, not a shift between the training and validation distributions.

Every rank measures the full subsets and rank 0's numbers are broadcast, so the decision is
the same on every rank and does not depend on the number of ranks.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence, Union

import torch

from .. import distributed as D
from ..config import ConfigError
from ..engine.hooks import StepContext
from .common import BalanceHooks, PairSet, branch_losses, measure_losses, subset_pairs

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


def floor_weights(weights: Losses, floor: float) -> torch.Tensor:
    """Weights summing to 1 with every weight at least ``floor``: weights below it are raised
    to it and the others scaled down by one common factor (repeated until none falls below),
    so the ratios among the unfloored weights are kept. ``floor`` in [0, 1/K]; 0 returns the
    weights (normalised). Float32, as :func:`gblend_weights`."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().reshape(-1).clone()
    k = w.numel()
    if not 0.0 <= floor <= 1.0 / k + 1e-12:
        raise ValueError(f"floor must be in [0, 1/{k}], got {floor}")
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    fixed = w < floor
    for _ in range(k):
        free = ~fixed
        budget = 1.0 - floor * float(fixed.sum())
        mass = w[free].sum()
        scaled = w[free] * (budget / mass) if mass > 0 else torch.full_like(w[free], budget / max(1, int(free.sum())))
        low = scaled < floor
        if not low.any():
            out = torch.full_like(w, floor)
            out[free] = scaled
            return out.to(torch.float32)
        idx = free.nonzero().reshape(-1)[low]
        fixed[idx] = True
    return torch.full_like(w, 1.0 / k).to(torch.float32)  # every weight floored: equal


def mix_uniform(weights: Losses, mix: float) -> torch.Tensor:
    """``(1 - mix) * w / sum(w) + mix / K``: a blend with equal weights (every weight at least
    ``mix / K``). Float32."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().reshape(-1)
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return ((1.0 - mix) * w / w.sum() + mix / w.numel()).to(torch.float32)


def scale_to_count(weights: Losses) -> torch.Tensor:
    """Rescale weights so they sum to their count K (``w * K / sum(w)``), keeping ALBEF's loss
    scale: equal weights become all ones."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    s = w.sum()
    if not s > 0:
        raise ValueError("weights must have a positive sum")
    return w * (w.numel() / s)


# ------------------------------------------------------------------ training hooks
log = logging.getLogger("albef_bal")
LOSSES = ("v", "t", "mm")  # vision unimodal, text unimodal, multimodal (balance.unimodal_loss)
ORDER = {"itc": ["vision i2t", "text t2i", "multimodal itm+mlm"],
         "ssl": ["vision uni_image", "text uni_text", "multimodal itc+itm+mlm"]}
WEIGHTS_FILE = "gblend_weights.json"


def read_weights_file(path: str) -> list[float]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        w = [float(x) for x in data["weights"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"balance.gblend.weights_file: cannot read weights from {path}: {e}") from None
    if len(w) != 3:
        raise ConfigError(f"balance.gblend.weights_file: {path} must hold 3 weights, got {w}")
    return w


class GBlendHooks(BalanceHooks):
    name = "gblend"
    unimodal_loss = "itc"  # balance.unimodal_loss, read in setup

    def __init__(self, pairs: Optional[dict[str, PairSet]] = None):
        # tests and callers may hand in the subsets; otherwise they are read from the config
        self.pairs = pairs

    def setup(self, trainer) -> None:
        super().setup(trainer)
        g = self.gcfg = trainer.cfg.balance.gblend
        self.unimodal_loss = trainer.cfg.balance.unimodal_loss
        if g.weights is not None:
            w = list(g.weights)
        elif g.weights_file is not None:
            w = read_weights_file(g.weights_file)
        elif g.mode == "offline":
            raise ConfigError("balance.gblend.mode=offline needs balance.gblend.weights or "
                              "balance.gblend.weights_file (estimate one with `albef-bal gblend-estimate`)")
        else:
            w = [1.0, 1.0, 1.0]
        self.w = self._normalise(w)
        self.prev: Optional[list[float]] = None  # [train x3, val x3] at the window's start
        self.history: list[dict] = []
        if g.mode == "online" and self.pairs is None:
            self.pairs = {which: subset_pairs(trainer.cfg, g, which, "balance.gblend") for which in ("train", "val")}
        if g.mode == "online" and len(self.pairs["train"]) != len(self.pairs["val"]):
            n = min(len(self.pairs["train"]), len(self.pairs["val"]))
            log.warning("G-Blend: train and held-out subsets differ in size; using the first %d pairs of each", n)
            self.pairs = {k: PairSet(p.images[:n], p.input_ids[:n], p.attention_mask[:n]) for k, p in self.pairs.items()}

    def _normalise(self, w) -> list[float]:
        w = torch.as_tensor(w, dtype=torch.float32)
        w = w / w.sum()
        if self.gcfg.uniform_mix > 0:
            w = mix_uniform(w, self.gcfg.uniform_mix)
        if self.gcfg.floor > 0:
            w = floor_weights(w, self.gcfg.floor)
        return (scale_to_count(w) if self.gcfg.sum_to_count else w).tolist()

    # ------------------------------------------------------------------ the loss
    def loss(self, out, ctx: StepContext) -> torch.Tensor:
        (w_v, w_t, w_mm) = self.w
        v, t, mm, rest = branch_losses(out, self.weights, self.unimodal_loss)
        return w_v * v + w_t * t + w_mm * mm + rest

    # ------------------------------------------------------------ online windows
    def _measure(self) -> list[float]:
        bs = self.cfg.train.micro_batch_size
        g = self.gcfg
        alpha = self.cfg.model.alpha if g.measure_alpha is None else g.measure_alpha
        m = torch.cat([measure_losses(self.module, self.pairs[w], bs, alpha, seed=self.cfg.train.seed,
                                      unimodal=self.unimodal_loss, use_queue=g.measure_queue)
                       for w in ("train", "val")])
        return self.broadcast(m).tolist()

    def before_step(self, ctx: StepContext) -> None:
        if self.gcfg.mode == "online" and self.prev is None:
            self.prev = self._measure()  # the weights before the first update of the window

    def after_step(self, ctx: StepContext) -> None:
        if self.gcfg.mode != "online" or (ctx.step + 1) % self.gcfg.window:
            return
        now = self._measure()
        tr0, va0, tr1, va1 = self.prev[:3], self.prev[3:], now[:3], now[3:]
        raw = gblend_weights(tr0, tr1, va0, va1, eps=self.gcfg.eps)
        self.w = self._normalise(raw)
        est = {"step": ctx.step + 1, "weights": self.w, "train_start": tr0, "train_end": tr1, "val_start": va0,
               "val_end": va1}
        self.history.append(est)
        self.prev = now
        row = {f"gblend/w_{k}": v for k, v in zip(LOSSES, self.w)}
        for k, a, b in zip(LOSSES, va0, va1):
            row[f"gblend/gain_{k}"] = a - b
        for i, k in enumerate(LOSSES):
            row[f"gblend/overfit_{k}"] = (va1[i] - tr1[i]) - (va0[i] - tr0[i])
            row[f"gblend/val_{k}"] = va1[i]
            row[f"gblend/train_{k}"] = tr1[i]
        self.log_event(row)
        if D.is_main_process():
            path = os.path.join(self.cfg.train.output_dir, WEIGHTS_FILE)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**est, "order": ORDER[self.unimodal_loss],
                           "sum_to_count": self.gcfg.sum_to_count}, f, indent=1)
            os.replace(tmp, path)

    def metrics(self) -> dict:
        out = super().metrics()
        out.update({f"gblend/w_{k}": v for k, v in zip(LOSSES, self.w)})
        return out

    def state_dict(self) -> dict:
        return {"w": self.w, "prev": self.prev, "history": self.history}

    def load_state_dict(self, state) -> None:
        if state:
            self.w, self.prev, self.history = state["w"], state["prev"], state.get("history", [])
