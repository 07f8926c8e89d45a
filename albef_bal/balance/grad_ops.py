"""Gradient operations shared by the balancing methods.

- :class:`GradScale` / :func:`scale_grad`: an identity whose backward multiplies the incoming
  gradient by a coefficient read from a mutable holder *at backward time*. Placed on a
  branch's output tokens (the model's ``branch_hook``) it scales the gradient of every loss
  that reaches that branch, which is the same as scaling every parameter gradient of the
  branch, without touching parameters (so it works under every ZeRO stage).
- :func:`injection_term`: a linear term whose gradient turns the gradient the engine's own
  backward computes into any chosen target gradient (ZeRO-friendly gradient replacement).
- :func:`flat_dot` / :func:`flat_sq_norm`: inner products over a list of tensors, as if the
  tensors were concatenated into one vector, without building that vector.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

Number = Union[float, int, torch.Tensor]


class GradCoefficient:
    """A mutable box for a gradient coefficient.

    The forward pass builds the graph with the box; the training loop writes ``value`` after
    the forward (when the branch scores are known) and before ``backward``. ``value`` may be a
    Python number or a 0-dim tensor (a tensor avoids a device-to-host sync on accelerators).
    """

    __slots__ = ("value",)

    def __init__(self, value: Number = 1.0):
        self.value = value

    def __repr__(self) -> str:
        return f"GradCoefficient({self.value!r})"


class GradScale(torch.autograd.Function):
    """Identity forward; backward returns ``holder.value * grad``.

    The coefficient is looked up when backward runs, not when the forward is recorded.
    A coefficient that is the Python number 1 passes the gradient through untouched (the
    same tensor object), so an unscaled branch stays bit-identical to no hook at all.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, holder: GradCoefficient) -> torch.Tensor:
        ctx.holder = holder
        # a view, not a copy: the identity costs no memory; autograd tracks it as a new node
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.holder.value
        if not isinstance(k, torch.Tensor) and k == 1:
            return grad, None
        if isinstance(k, torch.Tensor):
            k = k.to(device=grad.device, dtype=grad.dtype)
        return grad * k, None


def scale_grad(x: torch.Tensor, holder: GradCoefficient) -> torch.Tensor:
    """``x`` in the forward; in backward the gradient reaching ``x`` is multiplied by
    ``holder.value`` as it is at that moment. Returns ``x`` itself when no gradient flows."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return GradScale.apply(x, holder)


def make_branch_hook(holders: Mapping[str, GradCoefficient]):
    """A ``BranchHook`` for :class:`albef_bal.models.albef.ALBEF`: branches named in
    ``holders`` (``"vision"``, ``"text"``) get :func:`scale_grad` with their holder, the
    others pass through."""

    def hook(branch: str, x: torch.Tensor) -> torch.Tensor:
        holder = holders.get(branch)
        return x if holder is None else scale_grad(x, holder)

    return hook


def flat_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``<a, b>`` of two tensor lists seen as one concatenated vector, in float32 or wider
    (a 0-dim tensor on the tensors' device)."""
    if len(a) != len(b):
        raise ValueError(f"tensor lists differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("empty tensor list")
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    total = torch.zeros((), dtype=dtype, device=a[0].device)
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
        # dot on flat views: no elementwise product tensor is materialised
        total = total + torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))
    return total


def flat_sq_norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|a|^2`` of a tensor list seen as one vector."""
    return flat_dot(a, a)


def injection_term(params: Sequence[torch.Tensor], target_grads: Sequence[torch.Tensor],
                   natural_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i <theta_i, (target_i - natural_i).detach()>`` as a scalar tensor.

    Its gradient with respect to ``theta_i`` is ``target_i - natural_i``; so if ``natural_i``
    is the gradient that ``loss`` gives ``theta_i``, the backward of ``loss + term`` leaves
    ``natural_i + (target_i - natural_i) = target_i`` in ``theta_i.grad`` (up to one float
    rounding of that sum). The value of the term is meaningless; only its gradient matters,
    so log ``loss`` without it.

    Why: under DeepSpeed ZeRO the engine owns the gradients (reduced, partitioned, maybe
    offloaded); assigning ``param.grad`` after its backward is not supported. Adding this term
    before ``engine.backward`` lets the engine compute exactly the wanted gradient itself,
    with its own loss scaling, accumulation and reduction applied to it. With data
    parallelism pass the rank's own ``natural`` gradient and the global ``target``: the
    engine's average over ranks then gives ``mean(natural_r) + mean(target - natural_r) =
    target``. Parameters must be materialised when the term is built (ZeRO-3: inside
    ``deepspeed.zero.GatheredParameters`` or a module forward).
    """
    if not (len(params) == len(target_grads) == len(natural_grads)):
        raise ValueError("params, target_grads and natural_grads must have the same length")
    if not params:
        raise ValueError("empty parameter list")
    term: Optional[torch.Tensor] = None
    for p, t, n in zip(params, target_grads, natural_grads):
        diff = (t.detach() - n.detach()).to(p.dtype)
        piece = (p * diff).sum()
        term = piece if term is None else term + piece
    return term
