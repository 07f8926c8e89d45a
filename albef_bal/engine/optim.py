"""AdamW with ALBEF's parameter groups (and a per-group gain on the first moment), and the
warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def _unhooked(step):
    # torch wraps an optimizer class's ``step`` in its profiling/hook wrapper the first time
    # an instance is built; call the implementation below that wrapper so that GainAdamW's
    # own (wrapped) step does not run the step hooks twice
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class GainAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose parameter groups can scale the gradient that enters the
    first moment (first-moment modulation, "OGM for Adam"):

        m <- b1 m + (1 - b1) (k g + n)      k = group["m_gain"], n = add_first_moment(...)
        v <- b2 v + (1 - b2) g^2            the raw gradient
        theta <- theta - lr wd theta - lr m_hat / (sqrt(v_hat) + eps)

    Built like ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` (its keyword
    arguments too: ``fused``, ``foreach``, ``amsgrad``, ``maximize``); every parameter group
    accepts ``m_gain`` (default 1.0). A gain stays until it is changed (a balancing method
    sets it before each step). With every ``m_gain`` at 1.0 and nothing added, ``step`` is
    torch's AdamW step itself, to the bit.

    How: torch's kernels (fused, foreach or per tensor) compute
    ``m <- b1 m + (1 - b1) g`` from the raw gradient, so the moment is first moved by
    ``c (k - 1) g + c n`` with ``c = (1 - b1) / b1``; the kernel then yields exactly
    ``b1 m + (1 - b1)(k g + n)`` (up to one rounding of the extra add) and does the rest of the
    update unchanged. One extra pass over a group's tensors when its gain is not 1; the
    state (``step``, ``exp_avg``, ``exp_avg_sq``) is torch's, so checkpoints and resumes are
    torch's. ``betas[0] = 0`` with a gain other than 1 is refused (the moment has no memory
    to move).

    Under DeepSpeed the client optimizer's parameter groups are kept (ZeRO 1/2 swap their
    ``params`` for this rank's flat fp32 partition and step one group at a time), so a gain
    written into ``engine.optimizer.param_groups[i]["m_gain"]`` reaches this class on every
    ZeRO stage, and each rank scales the moment of the partition it owns.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self.defaults["m_gain"] = 1.0
        for group in self.param_groups:
            group.setdefault("m_gain", 1.0)
            _check_gain(group["m_gain"])
        self._m_extra: dict = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_gain(self.param_groups[-1].setdefault("m_gain", 1.0))

    def add_first_moment(self, param: torch.Tensor, delta: torch.Tensor, relative: bool = False) -> None:
        """Add ``delta`` (the shape of ``param``, an optimizer parameter) to the gradient that
        enters ``param``'s first moment at the next step only (not to the second moment),
        e.g. noise. With ``relative=True`` ``delta`` is in units of each element's RMS
        gradient: it is multiplied elementwise by sqrt(v_hat), the bias-corrected second moment
        after that step's update, so that its share of the normalised step m_hat / sqrt(v_hat)
        does not depend on the element's gradient scale (and is 0 where v is 0; with
        ``amsgrad`` still v itself, not its running maximum). Calls before one step add up
        (separately for absolute and relative additions)."""
        if delta.shape != param.shape:
            raise ValueError(f"delta of shape {tuple(delta.shape)} for a parameter of shape {tuple(param.shape)}")
        key = (param, bool(relative))
        prev = self._m_extra.get(key)
        self._m_extra[key] = delta.detach().clone() if prev is None else prev.add_(delta)

    @torch.no_grad()
    def _shift_first_moments(self) -> None:
        for group in self.param_groups:
            k = float(group.get("m_gain", 1.0))
            _check_gain(k)
            extras = [(p, rel) for p in group["params"] for rel in (False, True) if (p, rel) in self._m_extra]
            if k == 1.0 and not extras:
                continue
            b1, b2 = float(group["betas"][0]), float(group["betas"][1])
            if b1 == 0.0:
                raise ValueError("GainAdamW: a first-moment gain or addition needs betas[0] > 0")
            # torch's own lazy state initialisation (what the step would do first)
            self._init_group(group, [], [], [], [], [], [])
            c = (1.0 - b1) / b1
            with_grad = [p for p in group["params"] if p.grad is not None]
            if k != 1.0 and with_grad:
                sign = -1.0 if group.get("maximize", False) else 1.0
                torch._foreach_add_([self.state[p]["exp_avg"] for p in with_grad], [p.grad for p in with_grad],
                                    alpha=sign * c * (k - 1.0))
            for p, rel in extras:
                delta = self._m_extra.pop((p, rel))
                if p.grad is None:
                    continue
                st = self.state[p]
                delta = delta.to(st["exp_avg"].dtype)
                if rel:  # in units of sqrt(v_hat) of this step: (b2 v + (1 - b2) g^2) / (1 - b2^t)
                    g = p.grad.to(st["exp_avg_sq"].dtype)
                    t = st["step"].to(torch.float64) + 1.0
                    v = st["exp_avg_sq"].mul(b2).addcmul_(g, g, value=1.0 - b2)
                    delta = delta * (v / (1.0 - b2 ** t).to(v.dtype)).sqrt_()
                st["exp_avg"].add_(delta, alpha=c)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._shift_first_moments()
        _adam_step(self)
        return loss


_adam_step = _unhooked(torch.optim.Adam.step)


def find_gain_optimizer(optimizer, what: str) -> GainAdamW:
    """The :class:`GainAdamW` inside ``optimizer`` (the trainer's optimizer: GainAdamW itself,
    or DeepSpeed's ZeRO / precision wrapper around it). ``what`` names the setting that needs
    it, for the error."""
    from ..config import ConfigError
    inner = optimizer
    for _ in range(4):
        if isinstance(inner, GainAdamW):
            return inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
    raise ConfigError(f"{what} needs the trainer's GainAdamW optimizer (engine/optim.py build_optimizer); "
                      f"found {type(optimizer).__name__}")


def _check_gain(k) -> None:
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
        raise ValueError(f"GainAdamW: m_gain must be a finite number >= 0, got {k!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split as in ALBEF (timm's rule): no weight decay on biases and
    on 1-D tensors (LayerNorm weights, the temperature), decay on everything else; and by
    branch (vision / text / shared), so that a balancing method can give one branch its own
    learning rate. Group names: ``"<branch>/decay"``, ``"<branch>/no_decay"``."""
    groups = []
    for branch, named in model.branch_parameters().items():
        decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))]
        no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
        for kind, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "name": f"{branch}/{kind}"})
    return groups


def build_optimizer(groups: list[dict], train, device: torch.device) -> torch.optim.Optimizer:
    """:class:`GainAdamW` (torch's AdamW, plus the first-moment gain that balancing methods
    may set; with no gain set it steps as torch's AdamW) with its fused kernel (one pass over
    each parameter instead of about ten elementwise ops; on CPU as well as GPU: about 5x
    faster than the default per-tensor loop at bench-small, see bench/NOTES.md). Falls back to the ``foreach`` implementation where
    the fused kernel is missing. Handed to DeepSpeed as a client optimizer, which avoids
    compiling DeepSpeed's own Adam ops (and works on CPU)."""
    kwargs = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    try:  # copies: a failed constructor leaves its defaults (fused=True) in the group dicts
        return GainAdamW([dict(g) for g in groups], fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
        return GainAdamW(groups, foreach=device.type == "cuda", **kwargs)


def lr_at(step: int, total_steps: int, train) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps`` optimizer steps,
    then cosine from ``lr`` down to ``min_lr`` at ``total_steps`` (the paper's schedule)."""
    if step < train.warmup_steps:
        return train.warmup_lr + (train.lr - train.warmup_lr) * step / max(1, train.warmup_steps)
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, train):
    """A LambdaLR over ``lr_at``; DeepSpeed steps it once per optimizer step and saves its
    state in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total_steps, train) / train.lr)
