"""MMPareto: Pareto integration of a branch's multimodal and unimodal gradients.

Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024; details as in the authors' code (GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``
and ``code/min_norm_solvers.py``).

For one branch (encoder) with parameter tensors theta_1..theta_n, let g_mm be the gradient
of the multimodal loss and g_uni that of the branch's unimodal loss, each a list of n
tensors.

1. Direction, decided once per branch on the concatenation of all its tensors (the authors
   concatenate every flattened tensor of the encoder for the cosine and sum the per-tensor
   inner products for the min-norm problem):

       cos(g_mm, g_uni) > 0:   c = 1/2
       otherwise:              c = argmin_{c in [0,1]} |c g_mm + (1 - c) g_uni|^2
                                 = (g_uni.g_uni - g_mm.g_uni) / |g_mm - g_uni|^2
       new = 2 (c g_mm + (1 - c) g_uni)

   ``c`` weighs g_mm and ``1 - c`` weighs g_uni. The min-norm point of the segment has a
   non-negative inner product with both gradients (the "no-conflict" property).

2. Magnitude:  final = gamma * max(1, |g_mm + g_uni| / |new|) * new  (gamma = 1.5), with the
   norms taken per parameter tensor (``rescale="tensor"``, the authors' code) or over the
   whole branch (``rescale="global"``). The global rescale multiplies the whole direction by
   one positive number, so the no-conflict property holds for the final gradient exactly;
   the per-tensor one rescales tensors by different factors and can (rarely) break it.

Bounds on c (``c_rule``). The published description clips c to [0.001, 0.999]. The authors'
two-vector solver does slightly less: it returns 0.999 when the unconstrained minimiser is
>= 1 (``g_mm.g_uni >= |g_mm|^2``), 0.001 when it is <= 0 (``g_mm.g_uni >= |g_uni|^2``), and
the exact minimiser otherwise. Under conflict (cos <= 0) those ends are reached only when
one gradient is zero, so in practice the authors never move c off the exact min-norm point,
and the no-conflict property holds. ``c_rule="authors"`` (default) does that;
``c_rule="clip"`` is the literal clip, which differs when the minimiser lies in (0, 0.001) or
(0.999, 1) (one gradient nearly cancels the other) and then gives up the no-conflict
property by up to 0.1% of the dominant gradient.

Heads (fusion layers, projections, ITM/MLM heads, temperature) keep the plain summed
gradient; only the branches go through this. Both gradients must be of the same (global)
batch: all-reduce them before calling, so every rank takes the same decision.

Training hooks (:class:`MMParetoHooks`, below the formulas)
-----------------------------------------------------------

For each branch the method needs two gradients of the global batch: g_uni (the branch's
unimodal loss) and g_mm (the rest of the objective that reaches the branch). Which loss is
the unimodal one is ``balance.unimodal_loss`` (``common.branch_losses``):

- ``itc`` (default): the branch's ITC half; g_mm = ITM + MLM (and the unimodal
  feature-space loss of ``model.unimodal`` if one is on: it is not the unimodal loss here);
- ``ssl``: the branch's feature-space loss (``model.unimodal``), as the authors pair a
  true unimodal loss with the multimodal one; g_mm = ITC + ITM + MLM.

The engine's own backward computes ``g_mm + g_uni`` (the other ITC half does not reach the
branch: its other side is momentum features and the queue). So per micro step the hook
only adds one extra, partial backward:

    loss():        g_uni += autograd.grad(L_uni (weighted), branch params)     (local buffer)
    before_step(): g_uni  = mean over micro steps and ranks (one all-reduce per branch)
                   g_mm   = engine gradient - g_uni                             (per shard)
                   inner products per tensor, summed over shards and ranks -> c, scales
                   engine gradient <- scale_i * 2 (c g_mm + (1 - c) g_uni)      (in place)

Only a few numbers per tensor cross ranks besides g_uni; the combination is elementwise on
the shard each rank holds (ZeRO 1/2) or on the full gradient (ZeRO 0). Heads keep the
plain summed gradient. Cost: one backward of each unimodal loss through its encoder per micro
step, one all-reduce of the encoders' size per optimizer step, and two encoder-sized
float32 buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .. import distributed as D
from ..engine.grads import grad_views, reduce_param_sums
from ..engine.hooks import StepContext
from .common import BRANCHES, BalanceHooks, branch_losses, refuse_fp16
from .grad_ops import flat_dot

C_MIN, C_MAX = 0.001, 0.999


def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: float) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else ``fallback``; never evaluates x / 0 into the result
    (torch.where computes both sides, so the denominator is floored in the unused one)."""
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), torch.full_like(num, fallback))


@dataclass
class MMParetoStats:
    """Diagnostics of one branch's combination (0-dim or 1-D tensors; no host sync needed).

    cos:      cosine of g_mm and g_uni over the whole branch (0 if either is zero)
    c:        weight of g_mm in the direction (1 - c is that of g_uni)
    conflict: cos <= 0 (the min-norm branch was taken)
    scale:    the final multiplier ``gamma * max(1, |g_mm + g_uni| / |new|)`` per tensor
              ([n] with rescale="tensor") or for the branch ([1] with rescale="global")
    """

    cos: torch.Tensor
    c: torch.Tensor
    conflict: torch.Tensor
    scale: torch.Tensor

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Python floats for a metrics log (this syncs with the device)."""
        return {f"{prefix}cos": float(self.cos), f"{prefix}c": float(self.c),
                f"{prefix}conflict": float(self.conflict),
                f"{prefix}scale_mean": float(self.scale.float().mean()),
                f"{prefix}scale_max": float(self.scale.float().max())}


def min_norm_coefficient(mm_mm: torch.Tensor, mm_uni: torch.Tensor, uni_uni: torch.Tensor,
                         rule: str = "authors") -> torch.Tensor:
    """Weight c of g_mm in the min-norm point of the segment [g_uni, g_mm], from the inner
    products ``|g_mm|^2``, ``g_mm.g_uni``, ``|g_uni|^2``.

    Unconstrained minimiser: ``(|g_uni|^2 - g_mm.g_uni) / |g_mm - g_uni|^2``. ``rule="authors"``:
    0.999 if it is >= 1, 0.001 if it is <= 0, else itself; ``rule="clip"``: clipped to
    [0.001, 0.999]. When the two gradients coincide (zero denominator) every c gives the same
    point; 0.5 is returned under "clip" and 0.999 under "authors" (its first test holds)."""
    denom = mm_mm + uni_uni - 2.0 * mm_uni
    exact = _safe_div(uni_uni - mm_uni, denom, 0.5)
    if rule == "clip":
        return exact.clamp(C_MIN, C_MAX)
    if rule == "authors":
        hi = torch.full_like(exact, C_MAX)
        lo = torch.full_like(exact, C_MIN)
        return torch.where(mm_uni >= mm_mm, hi, torch.where(mm_uni >= uni_uni, lo, exact))
    raise ValueError(f"unknown c rule {rule!r} (expected 'authors' or 'clip')")


def mmpareto_plan(mm_mm: torch.Tensor, mm_uni: torch.Tensor, uni_uni: torch.Tensor, gamma: float = 1.5,
                  rescale: str = "tensor", c_rule: str = "authors") -> MMParetoStats:
    """The MMPareto decision of one branch from per-tensor inner products alone.

    ``mm_mm``, ``mm_uni``, ``uni_uni`` are [n] vectors: ``|g_mm,i|^2``, ``g_mm,i . g_uni,i``,
    ``|g_uni,i|^2`` for the branch's tensors i. Returns the stats whose ``c`` and ``scale`` give
    the final gradient ``scale_i * 2 (c g_mm,i + (1 - c) g_uni,i)``. The norms follow from the
    inner products (``|new_i|^2 = 4 (c^2 mm + 2 c (1 - c) mu + (1 - c)^2 uu)``), so a caller that
    holds only a shard of each gradient (ZeRO) can sum its shards' products over ranks and
    apply the result elementwise, never gathering a gradient."""
    if rescale not in ("tensor", "global"):
        raise ValueError(f"rescale must be 'tensor' or 'global', got {rescale!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    t_mm, t_mu, t_uu = mm_mm.sum(), mm_uni.sum(), uni_uni.sum()
    cos = _safe_div(t_mu, t_mm.sqrt() * t_uu.sqrt(), 0.0)
    conflict = cos <= 0
    c = torch.where(conflict, min_norm_coefficient(t_mm, t_mu, t_uu, c_rule), torch.full_like(cos, 0.5))
    if rescale == "global":
        mm_mm, mm_uni, uni_uni = t_mm.reshape(1), t_mu.reshape(1), t_uu.reshape(1)
    sum_norms = (mm_mm + 2.0 * mm_uni + uni_uni).clamp_min(0.0).sqrt()
    new_norms = (2.0 * (c * c * mm_mm + 2.0 * c * (1.0 - c) * mm_uni + (1.0 - c) ** 2 * uni_uni)
                 ).clamp_min(0.0).sqrt() * 2.0 ** 0.5
    # a zero `new` stays zero (factor 1) instead of the 0 * inf = NaN of a plain ratio
    ratio = _safe_div(sum_norms, new_norms, 1.0)
    scale = gamma * ratio.clamp_min(1.0)
    return MMParetoStats(cos=cos, c=c, conflict=conflict, scale=scale)


def mmpareto_combine_with_stats(g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor],
                                gamma: float = 1.5, rescale: str = "tensor",
                                c_rule: str = "authors") -> tuple[list[torch.Tensor], MMParetoStats]:
    """:func:`mmpareto_combine` plus its diagnostics (:class:`MMParetoStats`)."""
    g_mm, g_uni = list(g_mm), list(g_uni)
    dots = torch.stack([torch.stack([flat_dot([m], [m]), flat_dot([m], [u]), flat_dot([u], [u])])
                        for m, u in zip(g_mm, g_uni)]) if g_mm else None
    if dots is None:
        raise ValueError("empty tensor list")
    st = mmpareto_plan(dots[:, 0], dots[:, 1], dots[:, 2], gamma, rescale, c_rule)
    acc, c = st.c.dtype, st.c
    scales = st.scale if rescale == "tensor" else st.scale.expand(len(g_mm))
    out = [(2.0 * (c * m.to(acc) + (1.0 - c) * u.to(acc)) * s).to(m.dtype)
           for m, u, s in zip(g_mm, g_uni, scales)]
    return out, st


def mmpareto_combine(g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor], gamma: float = 1.5,
                     rescale: str = "tensor", c_rule: str = "authors") -> list[torch.Tensor]:
    """The MMPareto gradient of one branch (one tensor per parameter, same shapes and dtypes as
    ``g_mm``): cosine and c over the whole branch, final rescale per tensor
    (``rescale="tensor"``, as the authors coded it) or over the branch (``"global"``).
    See the module docstring for the formulas and :func:`mmpareto_combine_with_stats` for
    the diagnostics."""
    return mmpareto_combine_with_stats(g_mm, g_uni, gamma, rescale, c_rule)[0]


# ------------------------------------------------------------------ training hooks
class MMParetoHooks(BalanceHooks):
    name = "mmpareto"
    unimodal_loss = "itc"  # balance.unimodal_loss, read in setup

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.mcfg = trainer.cfg.balance.mmpareto
        self.unimodal_loss = trainer.cfg.balance.unimodal_loss
        refuse_fp16(trainer.cfg, "mmpareto")
        self.uni = {b: torch.zeros(sum(p.numel() for p in self.params[b]), dtype=torch.float32, device=self.device)
                    for b in BRANCHES}
        self._micro = 0

    def loss(self, out, ctx: StepContext) -> torch.Tensor:
        if ctx.first_micro:
            for buf in self.uni.values():
                buf.zero_()
            self._micro = 0
        self._micro += 1
        # the branch's unimodal loss (balance.unimodal_loss), weighted as in the total loss
        uni_v, uni_t, _, _ = branch_losses(out, self.weights, self.unimodal_loss)
        for b, uni_loss in (("vision", uni_v), ("text", uni_t)):
            params = self.params[b]
            if not uni_loss.requires_grad or not bool(torch.isfinite(uni_loss)):
                continue  # a non-finite window is skipped by the trainer; keep the buffer clean
            grads = torch.autograd.grad(uni_loss, params, retain_graph=True, allow_unused=True)
            offset = 0
            for p, g in zip(params, grads):
                if g is not None:
                    self.uni[b][offset:offset + p.numel()] += g.reshape(-1).float()
                offset += p.numel()
        return super().loss(out, ctx)

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        if self.trainer.window_skipped:
            return  # the trainer zeroed this window's gradient and skips the update
        world = D.get_world_size()
        stats = {}
        for b in BRANCHES:
            uni = self.uni[b] / self._micro  # the engine averages micro steps the same way
            if world > 1:
                dist.all_reduce(uni)
                uni /= world
            params = self.params[b]
            views = grad_views(params)
            offsets, offset = [], 0
            for p in params:
                offsets.append(offset)
                offset += p.numel()
            shards = []  # (view, g_uni shard, g_mm shard)
            rows = []
            for p, v, off in zip(params, views, offsets):
                if v.flat is None:
                    shards.append(None)
                    rows.append(torch.zeros(3, dtype=torch.float64, device=self.device))
                    continue
                u = v.slice_of(uni.narrow(0, off, p.numel())).to(v.flat.device)
                total = v.flat.float()
                m = total - u
                shards.append((v, u, m))
                md, ud = m.double(), u.double()
                rows.append(torch.stack([md @ md, md @ ud, ud @ ud]).to(self.device))
            dots = reduce_param_sums(torch.stack(rows), views)
            st = mmpareto_plan(dots[:, 0], dots[:, 1], dots[:, 2], self.mcfg.gamma, self.mcfg.rescale,
                               self.mcfg.c_rule)
            c = float(st.c)
            scales = st.scale.tolist() if self.mcfg.rescale == "tensor" else [float(st.scale[0])] * len(params)
            for sh, s in zip(shards, scales):
                if sh is None:
                    continue
                v, u, m = sh
                v.flat.copy_((2.0 * s * (c * m + (1.0 - c) * u)).to(v.flat.dtype))
            stats.update({f"mmpareto/{b}/{k}": val for k, val in st.scalars().items()})
        self.means.add(**stats)
