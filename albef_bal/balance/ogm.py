"""OGM-GE: on-the-fly gradient modulation with generalization enhancement.

Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022 (Eq. 10 and the GE noise), formulas as in the authors' code
(GeWu-Lab/OGM-GE_CVPR2022, ``main.py``).

Per step, with branch scores s_v, s_t (in ALBEF: the mean softmax probability of the
positive in each ITC half, ``ALBEFOutput.score_v`` / ``score_t``):

    rho_v = s_v / s_t,   rho_t = 1 / rho_v
    k_u   = 1 - tanh(alpha * rho_u)   if rho_u > 1
            1                         otherwise

The dominant branch's gradient is multiplied by k_u. Because the argument is
``alpha * rho`` and not ``alpha * (rho - 1)``, k drops from 1 to ``1 - tanh(alpha)`` as soon
as rho exceeds 1: the modulation switches on with a jump, not gradually.

GE then adds zero-mean Gaussian noise whose standard deviation is that of the unmodulated
gradient of the same tensor. In the authors' code this happens for both branches (also the
one whose k is 1) and only for 4-D (convolution) weights; the ViT adaptation applies it to
every encoder tensor of 2 or more dimensions (:func:`ogm_param_filter`).

The coefficient can be applied faithfully with :func:`albef_bal.balance.grad_ops.scale_grad`
on the branch's output tokens (``grad`` mode); see DESIGN.md section 4 for the ``lr`` mode.

Bidirectional rule (``rule: mlb``; Kontras, Chatzichristos, Blaschko, De Vos, "Improving
Multimodal Learning with Multi-Loss Gradient Modulation", BMVC 2024, "MLB"; formula as in the
authors' code, kkontras/MLB, ``Bias_Infusion_MLB``):

    k_u = 1 + tanh(alpha * (s_other / s_u - 1))

Both branches are modulated: the laggard (s_u < s_other) gets k in (1, 2), the leader
k in (1 - tanh(alpha), 1); k is exactly 1 at equal scores and continuous in the scores, and
the modulation fades as the scores approach each other. Note the ratio is the *other*
branch's score over the branch's own (the inverse of OGM's rho), so k_v * k_t != 1 in
general. :func:`mlb_coefficients`.

Training hooks (:class:`OGMGEHooks`, below the formulas)
--------------------------------------------------------

Per optimizer step, from the branch scores of the whole global batch (every micro step of
every rank), k_v and k_t are computed once, in ``before_step``, when the accumulated and
averaged gradient is complete:

- ``mode: grad`` (faithful): the gradient of every vision (text) tensor with 2 or more
  dimensions is multiplied by k_v (k_t) in place. A gradient is linear in the loss, so
  scaling the accumulated gradient once equals scaling every micro step's gradient by the
  global batch's k; it also covers the MLM decoder's direct gradient into the tied word
  embeddings, which a scaling identity on the text tokens would miss. The edit goes through
  the engine's own gradient storage (``p.grad`` under ZeRO 0, this rank's partition under
  ZeRO 1/2), so it works under every supported stage.
- ``mode: lr`` (adaptation): the learning rate of the ``<branch>/decay`` parameter group
  (exactly the tensors of 2 or more dimensions) is multiplied by k for this step; the
  schedule restores it at the step.
- ``mode: moment`` (new here; "OGM for Adam"): the ``<branch>/decay`` group's ``m_gain`` of
  :class:`~albef_bal.engine.optim.GainAdamW` is set to k for this step, so only the gradient
  entering Adam's first moment is scaled: m <- b1 m + (1 - b1) k g, v <- b2 v + (1 - b2) g^2.
  A steady k then scales the steady step by k (grad mode's k cancels in m / sqrt(v); lr mode
  also scales weight decay and the whole history in m). Each rank scales the moment of the
  partition it owns (ZeRO 0/1/2).

``rule`` picks k: ``ogm`` (above) or ``mlb`` (bidirectional); both work with every mode.

GE (``ge: true``): while modulation is active, every such tensor of both branches receives
Gaussian noise with the standard deviation of its unmodulated global-batch gradient, drawn
from a generator seeded by (run seed, step, tensor), so every rank adds the same noise to
the part it holds. ``ge_into: grad`` adds it to the gradient (the authors' choice: under
Adam it also enters, and inflates, the second moment); ``ge_into: moment`` adds it to the
gradient that enters the first moment only (``GainAdamW.add_first_moment``), so that v
sees the raw gradient. There the noise's scale is each element's own RMS gradient,
sqrt(v_hat) of the step, instead of the tensor's std (new here): with the tensor's std,
an element whose own gradient is far below the tensor's spread (the embedding row of a
token absent from the batch, the exactly-zero gradient of an attention key bias) would take
normalised steps of |n| / (sqrt(v) + eps) >> 1; in the tiny test model its weights grew to
about 7e4 within 4 steps. Scaled by sqrt(v_hat), the noise's share of the normalised step
m_hat / sqrt(v_hat) is a unit Gaussian times (1 - b1) for every element (0 where v is 0),
about what the authors' noise gives through both moments, without shrinking the step.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..config import ConfigError
from ..engine.grads import grad_views, optimizer_slot, reduce_param_sums
from ..engine.hooks import StepContext
from ..engine.optim import find_gain_optimizer
from .common import BRANCHES, BalanceHooks, refuse_fp16

Score = Union[float, int, torch.Tensor]


def ogm_coefficients(score_v: Score, score_t: Score, alpha: float):
    """OGM modulation coefficients ``(k_v, k_t)`` (Peng et al., CVPR 2022, Eq. 10).

    ``k = 1 - tanh(alpha * rho)`` for the branch whose ratio ``rho = s_self / s_other``
    exceeds 1, ``1`` for the other one.

    Types: two Python numbers give two Python floats; if either score is a tensor (0-dim)
    the result is two float32 0-dim tensors on that device, computed without a host sync
    (``torch.where`` instead of ``if``), so they can go straight into a
    :class:`~albef_bal.balance.grad_ops.GradCoefficient`.

    Edge cases (decided here, documented because the ratio is undefined at zero):

    - equal scores (including both 0): neither ratio exceeds 1, so ``k_v = k_t = 1``. This
      follows Eq. 10; the authors' code falls into its ``else`` branch at exact equality and
      would modulate the audio branch by ``1 - tanh(alpha)``, an asymmetry we do not copy.
    - one score 0, the other positive: the positive branch has rho = +inf, the limit
      ``k = 1 - tanh(inf) = 0`` (its gradient is switched off for that step); the other
      branch gets 1. No division by zero is evaluated into the result.
    - a NaN score: no comparison holds, so both coefficients are 1 (no modulation).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if isinstance(score_v, torch.Tensor) or isinstance(score_t, torch.Tensor):
        return _ogm_coefficients_tensor(score_v, score_t, alpha)
    s_v, s_t = float(score_v), float(score_t)
    k_v = _dominant_coefficient(s_v, s_t, alpha) if s_v > s_t else 1.0
    k_t = _dominant_coefficient(s_t, s_v, alpha) if s_t > s_v else 1.0
    return k_v, k_t


def _dominant_coefficient(s_self: float, s_other: float, alpha: float) -> float:
    # s_self > s_other >= 0 here (scores are probabilities); s_other == 0 means rho = inf
    rho = math.inf if s_other == 0 else s_self / s_other
    return 1.0 - math.tanh(alpha * rho)


def _ogm_coefficients_tensor(score_v: Score, score_t: Score, alpha: float):
    ref = score_v if isinstance(score_v, torch.Tensor) else score_t
    s_v = torch.as_tensor(score_v, dtype=torch.float32, device=ref.device).detach().reshape(())
    s_t = torch.as_tensor(score_t, dtype=torch.float32, device=ref.device).detach().reshape(())
    one = torch.ones((), dtype=torch.float32, device=ref.device)
    # division by a positive value only where it is used; s / 0 gives +inf -> tanh -> k = 0
    rho_v = s_v / s_t
    rho_t = s_t / s_v
    k_v = torch.where(s_v > s_t, 1.0 - torch.tanh(alpha * rho_v), one)
    k_t = torch.where(s_t > s_v, 1.0 - torch.tanh(alpha * rho_t), one)
    return k_v, k_t


def mlb_coefficients(score_v: Score, score_t: Score, alpha: float):
    """Bidirectional modulation coefficients ``(k_v, k_t)`` (MLB, Kontras et al., BMVC 2024):
    ``k_u = 1 + tanh(alpha * (s_other / s_u - 1))``.

    Exactly 1 at equal scores, continuous wherever both scores are positive, above 1 for the
    branch with the lower score (sped up) and below 1 for the higher (slowed down); bounded in
    ``(1 - tanh(alpha), 2)``. Types as :func:`ogm_coefficients` (floats in, floats out; a tensor
    score gives float32 0-dim tensors, no host sync).

    Edge cases: a branch whose score is 0 while the other's is positive has ratio +inf and gets
    ``k = 2`` (the limit); the other gets ``1 - tanh(alpha)``. Both 0, or a NaN score: ``(1, 1)``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if isinstance(score_v, torch.Tensor) or isinstance(score_t, torch.Tensor):
        ref = score_v if isinstance(score_v, torch.Tensor) else score_t
        s_v = torch.as_tensor(score_v, dtype=torch.float32, device=ref.device).detach().reshape(())
        s_t = torch.as_tensor(score_t, dtype=torch.float32, device=ref.device).detach().reshape(())
        one = torch.ones((), dtype=torch.float32, device=ref.device)
        # ratio other / self; x / 0 = +inf for x > 0, and 0 / 0 = NaN is replaced below
        k_v = 1.0 + torch.tanh(alpha * (s_t / s_v - 1.0))
        k_t = 1.0 + torch.tanh(alpha * (s_v / s_t - 1.0))
        bad = torch.isnan(k_v) | torch.isnan(k_t)
        return torch.where(bad, one, k_v), torch.where(bad, one, k_t)
    s_v, s_t = float(score_v), float(score_t)
    if math.isnan(s_v) or math.isnan(s_t) or (s_v == 0 and s_t == 0):
        return 1.0, 1.0
    return _mlb_one(s_v, s_t, alpha), _mlb_one(s_t, s_v, alpha)


def _mlb_one(s_self: float, s_other: float, alpha: float) -> float:
    ratio = math.inf if s_self == 0 else s_other / s_self
    return 1.0 + math.tanh(alpha * (ratio - 1.0))


RULES = {"ogm": ogm_coefficients, "mlb": mlb_coefficients}


def ogm_active(epoch: int, start: int, end: int) -> bool:
    """Whether OGM-GE modulates in ``epoch``: ``start <= epoch <= end``, both ends inclusive
    (as the authors' ``modulation_starts <= epoch <= modulation_ends``; 0-based epochs)."""
    return start <= epoch <= end


def ge_noise_like(grad: torch.Tensor, generator: Optional[torch.Generator] = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """GE noise for one gradient tensor: ``N(0, (std(grad) + eps)^2)`` elementwise, same shape,
    dtype and device as ``grad``.

    ``grad`` must be the *unmodulated* gradient (before multiplying by k); the GE step is
    ``grad_new = k * grad + ge_noise_like(grad)``. std is the per-tensor standard deviation
    with Bessel's correction (``torch.std``'s default, as in the authors' code), computed in
    float32; a tensor of one element has std 0. ``eps`` (the authors' ``+ 1e-8``) keeps the
    std strictly positive.

    If the gradient at hand was already scaled by ``k`` (e.g. by :func:`scale_grad` on the
    branch output), its std is ``k`` times the unmodulated one: pass ``grad / k`` (k > 0).

    Pass a ``generator`` seeded identically on every data-parallel rank (e.g. from the run
    seed and the global step) when the noise is added after gradient reduction, so that all
    ranks add the same noise and the replicas stay identical.
    """
    g = grad.detach()
    std = g.float().std() if g.numel() > 1 else torch.zeros((), device=g.device)
    noise = torch.randn(g.shape, generator=generator, dtype=torch.float32, device=g.device)
    return (noise * (std + eps)).to(g.dtype)


def ogm_param_filter(name: str, tensor: torch.Tensor) -> bool:
    """Whether an encoder tensor takes part in OGM-GE's per-tensor modulation and GE noise.

    Adaptation (DESIGN.md section 4): the authors modulate 4-D convolution weights only; a
    ViT/BERT has no convolutions besides the patch embedding, so every encoder tensor of 2 or
    more dimensions qualifies (linear weights, the patch-embedding kernel, ``pos_embed``,
    ``cls_token``, word/position embeddings); 1-D biases and LayerNorm parameters do not.
    The caller passes the tensors of one branch only (the branch decides *which* k applies);
    ``name`` is part of the signature so the filter drops straight into a
    ``named_parameters()`` loop; today the decision depends on the shape alone.
    """
    del name  # shape-only rule, see above
    return tensor.dim() >= 2


# ------------------------------------------------------------------ training hooks
GE_EPS = 1e-8  # the authors' "+ 1e-8" on the noise std


class OGMGEHooks(BalanceHooks):
    name = "ogm_ge"

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.ocfg = trainer.cfg.balance.ogm_ge
        refuse_fp16(trainer.cfg, "ogm_ge")
        self.targets = {b: [p for n, p in self.named[b] if ogm_param_filter(n, p)] for b in BRANCHES}
        self.k = {"vision": 1.0, "text": 1.0}
        self.rule = RULES[self.ocfg.rule]
        if self.ocfg.mode in ("lr", "moment"):
            groups = {g.get("name"): g for g in trainer.optimizer.param_groups}
            for b in BRANCHES:
                g = groups.get(f"{b}/decay")
                if g is None:
                    raise ConfigError(f"balance.ogm_ge.mode={self.ocfg.mode} needs the optimizer parameter group "
                                      f"'{b}/decay' (engine/optim.py param_groups)")
                # the lr/moment modes and the grad mode act on the same tensors
                # (param_groups' decay rule: neither 1-D nor a bias)
                decay = {n for n, p in self.named[b] if not (p.ndim <= 1 or n.endswith(".bias"))}
                if decay != {n for n, p in self.named[b] if ogm_param_filter(n, p)}:
                    raise ConfigError(f"optimizer group '{b}/decay' does not hold exactly the {b} tensors of "
                                      "2 or more dimensions that OGM-GE modulates")
        self.gain_opt = None
        if self.ocfg.mode == "moment" or (self.ocfg.ge and self.ocfg.ge_into == "moment"):
            self.gain_opt = find_gain_optimizer(trainer.optimizer, f"balance.ogm_ge.mode={self.ocfg.mode}, "
                                                                   f"ge_into={self.ocfg.ge_into}")

    def loss(self, out, ctx: StepContext) -> torch.Tensor:
        self.record_scores(out, ctx)
        return super().loss(out, ctx)

    def before_step(self, ctx: StepContext) -> None:
        if self.trainer.window_skipped:
            self._set_gains({"vision": 1.0, "text": 1.0})
            return  # the trainer zeroed this window's gradient and skips the update
        s_v, s_t = self.global_scores()
        active = ogm_active(ctx.epoch, self.ocfg.start_epoch, self.ocfg.end_epoch)
        k_v, k_t = self.rule(s_v, s_t, self.ocfg.alpha) if active else (1.0, 1.0)
        self.k = {"vision": k_v, "text": k_t}
        stats = {"ogm/k_v": k_v, "ogm/k_t": k_t, "ogm/active": float(active)}
        if self.ocfg.mode == "lr":
            for g in self.trainer.optimizer.param_groups:
                name = g.get("name", "")
                for b in BRANCHES:
                    if name == f"{b}/decay":
                        g["lr"] = g["lr"] * self.k[b]
        if self.ocfg.mode == "moment":
            self._set_gains(self.k)
        ge = active and self.ocfg.ge
        if self.ocfg.mode == "grad" or ge:
            noise_ratio = self._modulate(ctx, scale=self.ocfg.mode == "grad", ge=ge)
            if ge:
                stats.update({f"ogm/ge_noise_ratio_{b[0]}": r for b, r in noise_ratio.items()})
        self.means.add(**stats)

    def _set_gains(self, k: dict) -> None:
        """m_gain of each branch's decay group = its k (moment mode); every other group 1."""
        if self.ocfg.mode != "moment":
            return
        for g in self.trainer.optimizer.param_groups:
            name = g.get("name", "")
            g["m_gain"] = next((float(k[b]) for b in BRANCHES if name == f"{b}/decay"), 1.0)

    @torch.no_grad()
    def _modulate(self, ctx: StepContext, scale: bool, ge: bool) -> dict[str, float]:
        """grad <- k * grad on this rank's share of every target tensor (``scale``), and GE
        noise into that gradient or into the first moment only (``ge_into``). Returns the
        noise-to-gradient norm ratio per branch for gradient noise (diagnostic)."""
        ratios = {}
        into_moment = ge and self.ocfg.ge_into == "moment"
        moment_noise: dict = {}  # optimizer tensor -> flat unit-noise buffer (first moment only)
        for bi, b in enumerate(BRANCHES):
            k = self.k[b] if scale else 1.0
            views = grad_views(self.targets[b])
            std = None
            if ge and not into_moment:
                # per-tensor std of the unmodulated global gradient (Bessel, as torch.std)
                rows = torch.stack([
                    torch.stack([v.flat.double().sum(), v.flat.double().pow(2).sum()]) if v.flat is not None
                    else torch.zeros(2, dtype=torch.float64, device=self.device) for v in views])
                rows = reduce_param_sums(rows, views)
                n = torch.tensor([float(v.param.numel()) for v in views], dtype=torch.float64, device=rows.device)
                var = (rows[:, 1] - rows[:, 0] ** 2 / n) / (n - 1).clamp_min(1.0)
                std = torch.where(n > 1, var.clamp_min(0.0).sqrt(), torch.zeros_like(var)).tolist()
                grad_sq, noise_sq = float(rows[:, 1].sum()), 0.0
            for i, v in enumerate(views):
                if v.flat is None:
                    continue
                if k != 1.0:
                    v.flat.mul_(k)
                if not ge:
                    continue
                p = v.param
                gen = torch.Generator(device=v.flat.device)
                gen.manual_seed(_noise_seed(self.cfg.train.seed, ctx.step, bi, i))
                noise = v.slice_of(torch.randn(p.numel(), generator=gen, dtype=torch.float32, device=v.flat.device))
                if not into_moment:
                    v.flat.add_(noise.mul_(std[i] + GE_EPS).to(v.flat.dtype))
                    continue
                # unit noise, scaled by GainAdamW to each element's RMS gradient (relative=True)
                slot, offset = optimizer_slot(p, self.trainer.optimizer)
                if slot is None:  # this rank holds a share of the gradient, so it steps one
                    raise RuntimeError("OGM-GE ge_into=moment: no optimizer tensor holds this rank's share "
                                       f"of a {tuple(p.shape)} parameter (unsupported engine set-up)")
                buf = moment_noise.get(slot)
                if buf is None:
                    buf = moment_noise[slot] = torch.zeros(slot.numel(), dtype=torch.float32, device=slot.device)
                buf.narrow(0, offset, noise.numel()).add_(noise.to(buf.device))
            if std is not None:
                noise_sq = sum((s + GE_EPS) ** 2 * v.param.numel() for s, v in zip(std, views))
                ratios[b] = math.sqrt(noise_sq / grad_sq) if grad_sq > 0 else 0.0
        for slot, buf in moment_noise.items():
            self.gain_opt.add_first_moment(slot, buf.view(slot.shape).to(slot.dtype), relative=True)
        return ratios

    def state_dict(self) -> dict:
        return {"k": dict(self.k)}

    def load_state_dict(self, state) -> None:
        if state:
            self.k = dict(state.get("k", self.k))


def _noise_seed(seed: int, step: int, branch: int, tensor: int) -> int:
    """One generator seed per (run, step, branch, tensor), the same on every rank."""
    return (((seed * 1_000_003 + step) * 7 + branch) * 100_003 + tensor) % (2 ** 63)
