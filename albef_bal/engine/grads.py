"""Reading gradients the same way under ZeRO 0, 1 and 2.

With ZeRO 0 every rank holds the full (averaged) gradient in ``p.grad``. With ZeRO 1/2 the
averaged gradient lives in optimizer partitions: each rank holds a disjoint fragment of
each parameter's gradient. Sums over a parameter (norms, moments) are therefore computed
from local fragments and all-reduced, which is exact and moves a few numbers instead of
the whole gradient.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .. import distributed as D


class UnsupportedDeepSpeedError(RuntimeError):
    pass


def _check_released(p: torch.nn.Parameter) -> None:
    """ZeRO 1/2 (every parameter the optimizer partitions has ``_hp_mapping``) must have moved
    the reduced gradient into the partition buffers and cleared ``p.grad`` at the end of the
    backward, as DeepSpeed 0.19.8 does. A ``p.grad`` still present there would be this rank's
    unreduced gradient, and reading it as the whole gradient would be silently wrong."""
    if p.grad is not None and hasattr(p, "_hp_mapping"):
        import deepspeed
        raise UnsupportedDeepSpeedError(
            f"DeepSpeed {deepspeed.__version__} keeps p.grad of a ZeRO-partitioned parameter after the backward "
            "(shape " + "x".join(map(str, p.shape)) + "); albef_bal reads ZeRO 1/2 gradients from the optimizer's "
            "partitions and relies on p.grad being cleared, as in the tested DeepSpeed 0.19.8. Install "
            "deepspeed==0.19.8 (constraints.txt) or use train.zero_stage=0")


def local_grad(p: torch.nn.Parameter) -> tuple[Optional[torch.Tensor], bool]:
    """(this rank's part of p's gradient, flattened; whether it is the whole gradient)."""
    _check_released(p)
    if p.grad is not None:
        return p.grad.reshape(-1), True
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None, False
    frag = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    addr = mapping.lp_fragment_address
    if frag.numel() == p.numel() and addr.numel != p.numel():  # full buffer kept: take our share
        frag = frag.narrow(0, addr.start, addr.numel)
    return frag, False


def grad_moments(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """[n, 3] tensor of (sum g, sum g^2, count) per parameter over the whole gradient,
    identical on every rank (one all-reduce for all parameters)."""
    params = list(params)
    rows, partial = [], []
    device = None
    for p in params:
        g, full = local_grad(p)
        if g is None:
            rows.append(None)
            partial.append(True)
            continue
        g = g.float()
        device = g.device
        rows.append(torch.stack([g.sum(), (g * g).sum(), torch.tensor(float(g.numel()), device=g.device)]))
        partial.append(not full)
    device = device or (params[0].device if params else torch.device("cpu"))
    out = torch.stack([r if r is not None else torch.zeros(3, device=device) for r in rows]) if rows \
        else torch.zeros(0, 3, device=device)
    if D.get_world_size() > 1 and any(partial):
        # full gradients (ZeRO 0) are the same on every rank: count them once
        if not all(partial):
            keep = torch.tensor([pt or D.get_rank() == 0 for pt in partial], device=device)
            out = out * keep[:, None]
        dist.all_reduce(out)
    return out


def branch_grad_norms(branches: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the gradient of each named group of parameters (collective)."""
    names = list(branches)
    params = [p for n in names for p in branches[n]]
    sq = grad_moments(params)[:, 1]
    out, i = {}, 0
    for n in names:
        k = len(branches[n])
        out[n] = float(sq[i:i + k].sum().sqrt())
        i += k
    return out


class GradView:
    """A writable view of this rank's share of one parameter's (averaged, accumulated)
    gradient, valid between the last backward of an accumulation window and ``engine.step``.

    ``flat`` is a 1-D view into the storage the optimizer will read (``p.grad`` under ZeRO 0,
    the partition buffer under ZeRO 1/2, the CPU buffer with offload), covering the elements
    ``[start, start + flat.numel())`` of the flattened parameter; in-place edits of ``flat``
    change what the step uses. ``full`` says whether the view is the whole gradient (then
    every rank holds the same values). ``flat`` is None when this rank holds none of it."""

    __slots__ = ("param", "flat", "start", "full")

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        _check_released(param)
        if param.grad is not None:
            self.flat, self.start, self.full = param.grad.view(-1), 0, True
            return
        self.full = False
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            self.flat, self.start = None, 0
            return
        frag = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
        addr = mapping.lp_fragment_address
        if frag.numel() == param.numel() and addr.numel != param.numel():  # full buffer kept: our share
            frag = frag.narrow(0, addr.start, addr.numel)
        self.flat, self.start = frag, addr.start

    def slice_of(self, full_flat: torch.Tensor) -> torch.Tensor:
        """The part of a flattened full-size tensor that this view covers."""
        return full_flat.narrow(0, self.start, self.flat.numel())


def grad_views(params: Iterable[torch.nn.Parameter]) -> list[GradView]:
    return [GradView(p) for p in params]


def reduce_param_sums(rows: torch.Tensor, views: list[GradView]) -> torch.Tensor:
    """Sum per-parameter partial sums ``rows`` [n, m] (computed from ``views``) over ranks,
    counting whole gradients (identical on every rank) once. Collective when ranks > 1 and
    any view is partial."""
    world = D.get_world_size()
    if world == 1 or all(v.full for v in views):
        return rows
    keep = torch.tensor([(not v.full) or D.get_rank() == 0 for v in views], device=rows.device,
                        dtype=rows.dtype)
    rows = rows * keep[:, None]
    dist.all_reduce(rows)
    return rows


def optimizer_slot(param: torch.nn.Parameter, optimizer=None) -> tuple[Optional[torch.Tensor], int]:
    """(the tensor the optimizer steps that holds this rank's share of ``param``, the offset of
    that share in it, flattened), valid where :class:`GradView` is: ``(param, 0)`` under ZeRO 0
    (the optimizer steps the parameter itself); under ZeRO 1/2 the rank's flat fp32 partition
    of the parameter's group and the share's place in it (its elements are those of
    ``GradView(param)``, in the same order); ``(None, 0)`` when this rank holds none of it.
    ``optimizer`` is the engine's optimizer (DeepSpeed's ZeRO optimizer under ZeRO 1/2).
    Lets a method address the optimizer state (e.g. a first-moment addition) of exactly the
    gradient share it edits."""
    if param.grad is not None:
        return param, 0
    mapping = getattr(param, "_hp_mapping", None)
    # DeepSpeed links a parameter back to its ZeRO optimizer only with CPU offload
    zero = getattr(param, "_zero_optimizer", None)
    if zero is None:
        zero = optimizer
    partitions = getattr(zero, "single_partition_of_fp32_groups", None)
    if mapping is None or partitions is None:
        return None, 0
    return partitions[mapping.param_group_index], int(mapping.hp_fragment_address.start)
