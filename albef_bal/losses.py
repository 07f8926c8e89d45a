"""ALBEF's three losses as pure tensor functions (the model wires them together).

- ITC: soft cross-entropy between online logits and targets mixed from momentum logits
  (distillation) and the positive mask: ``alpha * softmax(sim_m) + (1 - alpha) * positives``.
- ITM: hard negatives drawn by multinomial sampling from the in-batch similarity softmax
  with the positive pair (and, given image ids, every same-id pair) excluded.
- MLM: BERT masking (15%; 80% [MASK], 10% random token, 10% unchanged; never special
  tokens), loss ``(1 - alpha) * CE + alpha * soft CE`` against the momentum model's logits.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


def clamp_temperature(temp: torch.Tensor) -> torch.Tensor:
    """The temperature clamped to [0.001, 0.5] with the gradient passing straight through.

    ALBEF clamps the parameter in place before each forward and lets the gradient reach it
    unchanged; this gives the same value and gradient without mutating a parameter inside
    the forward (which optimizer master copies would not see)."""
    return temp + (temp.clamp(TEMP_MIN, TEMP_MAX) - temp).detach()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j targets_ij * log_softmax(logits)_ij``."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_positive_mask(batch: int, queue_len: int, idx: Optional[torch.Tensor] = None,
                      idx_queue: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Positives among [batch ; queue] columns for each row: the diagonal, or with image ids
    every column sharing the row's id (ALBEF retrieval). Returns float [B, B + Q]."""
    if idx is None:
        pos = torch.zeros(batch, batch + queue_len, device=device)
        pos[:, :batch].fill_diagonal_(1.0)
        return pos
    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), idx_queue.view(1, -1)], dim=1)
    return torch.eq(idx, idx_all).float()


def itc_targets(pos: torch.Tensor, sim_m: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """Distilled ITC targets; with ``sim_m=None`` (no distillation) the normalised positives."""
    hard = pos / pos.sum(dim=1, keepdim=True)
    if sim_m is None:
        return hard
    return alpha * F.softmax(sim_m.float(), dim=1) + (1.0 - alpha) * hard


@torch.no_grad()
def positive_score(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean softmax probability mass on the positives (the balancing methods' branch score)."""
    return (F.softmax(logits.float(), dim=1) * pos).sum(dim=1).mean()


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, exclude: torch.Tensor,
                          generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative column per row of the in-batch similarity ``sim`` [B, B].

    Weights are ``softmax(sim)`` with excluded pairs (the diagonal; same-id pairs) zeroed.
    Rows whose weights are all zero or not finite fall back to uniform over the allowed
    columns; rows with no allowed column (batch of one, or every other item shares the id)
    get ``valid = False`` and an arbitrary index that the caller must not train on.
    Returns (index [B] long, valid [B] bool)."""
    w = F.softmax(sim.float(), dim=1).masked_fill(exclude, 0.0)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    allowed = (~exclude).float()
    valid = allowed.sum(dim=1) > 0
    dead = w.sum(dim=1) <= 0
    w = torch.where(dead[:, None], allowed, w)
    # rows with nothing allowed: any index (masked out of the loss by `valid`)
    w = torch.where(valid[:, None], w, torch.ones_like(w))
    # one draw per row as torch.multinomial(w, 1) draws it (argmax of w / q with q ~ Exp(1):
    # the same op sequence, so the same indices from the same generator state), without
    # multinomial's validity checks, which read the device back (the rows are valid here)
    q = torch.empty_like(w).exponential_(1, generator=generator)
    return (w / q).argmax(dim=1), valid


@torch.no_grad()
def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int,
                special_ids: Iterable[int], probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as ALBEF does it: each non-special token is selected with
    ``probability``; of those 80% become [MASK], 10% a random token, 10% stay.
    Returns (masked input ids, labels with -100 where not selected)."""
    def bern(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < p

    selected = bern(probability)
    for sid in special_ids:
        selected &= input_ids != sid
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    replaced = bern(0.8) & selected
    randomised = bern(0.5) & selected & ~replaced
    random_words = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, generator=generator)
    masked = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(randomised, random_words, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_targets: Optional[torch.Tensor],
             alpha: float) -> torch.Tensor:
    """MLM loss on the selected positions only: ``logits`` [M, V], ``labels`` [M].
    With ``soft_targets`` (momentum softmax) it is ``(1 - alpha) * CE + alpha * soft CE``."""
    ce = F.cross_entropy(logits.float(), labels)
    if soft_targets is None:
        return ce
    return (1.0 - alpha) * ce + alpha * soft_cross_entropy(logits, soft_targets)


def alpha_schedule(alpha: float, step_in_epoch: int, steps_per_epoch: int, epoch: int) -> float:
    """ALBEF's distillation weight: ramped linearly from 0 over the first epoch, then constant."""
    if epoch > 0 or steps_per_epoch <= 0:
        return alpha
    return alpha * min(1.0, step_in_epoch / steps_per_epoch)
