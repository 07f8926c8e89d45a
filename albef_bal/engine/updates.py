"""Learning speed per branch: the relative update size ||theta_now - theta_then|| / ||theta_then||
of each branch's trainable weights over one logging window.

Under ZeRO 0, 1 and 2 every rank holds the full weights after each step, so one rank (rank 0)
measures them alone: no collective, and the other ranks keep no copy. The cost is one fp32
copy of the trainable weights on that rank and one pass over them per log step.
"""
from __future__ import annotations

import torch


class UpdateTracker:
    def __init__(self, branches: dict[str, list[torch.nn.Parameter]]):
        self.branches = branches
        self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current weights as the start of the next window."""
        if not hasattr(self, "then"):
            self.then = {b: [p.detach().float().clone() for p in ps] for b, ps in self.branches.items()}
            return
        for b, ps in self.branches.items():
            for p, p0 in zip(ps, self.then[b]):
                p0.copy_(p.detach())

    @torch.no_grad()
    def ratios(self, reset: bool = True) -> dict[str, float]:
        """``{"update_ratio_<branch>": ||delta|| / ||theta_then||}`` since the last snapshot
        (0.0 for a branch without trainable weights or whose weights did not move)."""
        out = {}
        for b, ps in self.branches.items():
            if not ps:
                out[f"update_ratio_{b}"] = 0.0
                continue
            # one sum per tensor on its own device, one transfer per branch
            delta = torch.stack([(p.detach().float() - p0).pow(2).sum() for p, p0 in zip(ps, self.then[b])])
            norm = torch.stack([p0.pow(2).sum() for p0 in self.then[b]])
            delta, norm = float(delta.double().sum().sqrt()), float(norm.double().sum().sqrt())
            out[f"update_ratio_{b}"] = delta / norm if norm > 0 else 0.0
        if reset:
            self.snapshot()
        return out
