"""The fixed points at which the training step calls a balancing method.

A method subclasses :class:`TrainHooks` and overrides what it needs; the trainer calls,
for every micro step and optimizer step::

    batch = hooks.before_forward(batch, ctx)  # 0. before the forward: the inputs
    out  = model(batch)                       # separate losses and branch scores
    loss = hooks.loss(out, ctx)               # 1. after the forward: weights, coefficients
    engine.backward(loss)
    if accumulation boundary:
        hooks.before_step(ctx)                # 2. gradients of the whole global batch ready
        engine.step()
        hooks.after_step(ctx)
    hooks.on_epoch_end(epoch)                 # 3. at epoch ends (windows, re-learning)

What each point may do:

- ``before_forward(batch, ctx) -> batch``: sees the micro batch on the device (``image``,
  ``input_ids``, ``attention_mask``, maybe ``idx``) and returns the batch to train on. To
  change what the *online* encoders see while the momentum encoders (and so the
  distillation targets and the queues) keep the clean batch, it adds an ``"online"`` entry:
  a dict with any of ``image``, ``patch_keep``, ``input_ids``, ``attention_mask`` (see
  ``ALBEF.forward``). Randomness drawn here must come from the method's own generator, not
  the global one, so that a run without the method draws the same masks and negatives.
- ``loss(out, ctx) -> loss``: the scalar the engine differentiates (weights, coefficients,
  extra terms); also where a method records the branch scores of the micro batch.
- ``before_step(ctx)``: the accumulated, rank-averaged gradient of the global batch is in
  the engine (``p.grad`` or this rank's ZeRO partition; see engine/grads.py). A method may
  edit it in place, or edit the optimizer's parameter groups for this step: ``lr`` (the
  schedule resets it at the step) or ``m_gain``, the optimizer-side gain: the trainer's
  optimizer is :class:`~albef_bal.engine.optim.GainAdamW`, whose groups scale the gradient
  entering AdamW's first moment by ``m_gain`` (kept until changed), and whose
  ``add_first_moment(tensor, delta, relative=False)`` adds to the first moment's input of
  the next step only (``relative=True``: in units of each element's RMS gradient,
  sqrt(v_hat)); ``engine.grads.optimizer_slot(param, trainer.optimizer)`` finds the tensor
  and offset that hold this rank's share of a parameter under ZeRO 0/1/2. The groups are reached through
  ``trainer.optimizer.param_groups`` on every ZeRO stage.
- ``after_step(ctx)``: the weights of this step are written (held-out measurements).
- ``on_epoch_end(epoch)``: after the last step of an epoch (re-initialisation).
- ``metrics()`` at log steps, on every rank at the same steps (a method may reduce its
  counters across ranks there); ``state_dict()`` / ``load_state_dict()`` travel with
  checkpoints, so a resumed run takes the same decisions as an uninterrupted one.

Nothing else in the model or the engine needs to change for a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..models.albef import ALBEFOutput
    from .trainer import Trainer


@dataclass
class StepContext:
    step: int  # optimizer steps completed before this one
    epoch: int
    micro: int  # micro step within the accumulation window (0-based)
    grad_accum: int
    alpha: float
    boundary: bool  # this micro step ends the accumulation window
    log: bool  # this optimizer step will be logged

    @property
    def first_micro(self) -> bool:
        return self.micro == 0


class TrainHooks:
    """No balancing: ALBEF's weighted sum of the three losses."""

    name = "none"

    def setup(self, trainer: "Trainer") -> None:
        """Called once after ``deepspeed.initialize`` (and after a resume)."""
        self.trainer = trainer
        w = trainer.cfg.model.loss_weights
        self.weights = dict(itc=w.itc, itm=w.itm, mlm=w.mlm, uni_image=w.uni_image, uni_text=w.uni_text)

    def before_forward(self, batch: dict, ctx: StepContext) -> dict:
        return batch

    def loss(self, out: "ALBEFOutput", ctx: StepContext) -> torch.Tensor:
        return out.total(**self.weights)

    def before_step(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def metrics(self) -> dict:
        """Diagnostics for the metrics log (called at log steps, on every rank)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass
