"""Branch scores: how far each encoder has come, for the balancing methods and the log.

``balance.score`` selects one; the metrics log's ``score_v``, ``score_t`` and ``rho_v =
score_v / score_t`` follow it for every method (``none`` included), and every method that
reads scores (OGM-GE and the modulation rules, weakening) reads the selected one.

- ``itc`` (the documented adaptation of the published methods): the mean softmax
  probability of the positive in each ITC half of the training batch, image-to-text for
  vision and text-to-image for text. Both halves score the same pairs with the same
  similarities (normalised by row and by column), so a weak image encoder lowers both:
  measured on corpora made imbalanced on purpose, it cannot tell which modality was
  degraded (docs/study.md).
- ``uniformity``: the uniformity (Wang & Isola, ICML 2020) of each encoder's L2-normalised
  ITC features on a fixed held-out subset, measured in eval mode every
  ``balance.score_every`` optimizer steps: ``-log mean_{i != j} exp(-2 ||x_i - x_j||^2)``
  (0 when every feature is the same, about 4 for features spread evenly over the sphere).
  It estimates how many inputs an encoder tells apart. Contrastive training pulls each
  image feature onto its caption's feature, so when both modalities carry the same
  information the two point clouds take the same shape and the scores agree; a modality
  whose inputs lost information (blurred images, captions without attributes) maps
  distinct pairs onto the same feature, and its score falls below the other's. Validated
  on the synthetic corpus (docs/study.md, `albef-bal validate-score`).
- ``unimodal``: how far each branch's own unimodal loss (``model.unimodal``: image SimSiam
  or SimCLR, text MLM or SimCSE) has come from its value at the run's first optimizer step
  toward the lowest value the loss can take: ``(L_first - L) / (L_first - L_floor)``, with
  ``L`` the loss averaged over ranks and over the last ``balance.score_every`` optimizer
  steps and ``L_first`` that average over the run's first ``score_every`` steps. 0 until
  then, 1 at the floor. Free (the losses are computed anyway; one small
  all-reduce per optimizer step). Whether the two branches' progress is comparable (their
  losses differ in kind) is what ``albef-bal validate-score --score unimodal`` measures: it
  fails (it sees degraded captions, not degraded images; docs/study.md).

A score is a pair of numbers per optimizer step, the same on every rank.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed as D
from ..config import Config, ConfigError

log = logging.getLogger("albef_bal")

SCORES = ("itc", "uniformity", "unimodal")

# the lowest value of each unimodal loss (models/unimodal.py): SimSiam's negative cosine
# reaches -1, the cross-entropies (MLM; SimCLR's and SimCSE's InfoNCE) reach 0
LOSS_FLOOR = {"simsiam": -1.0, "simclr": 0.0, "mlm": 0.0, "simcse": 0.0}


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """``-log mean_{i != j} exp(-t ||x_i - x_j||^2)`` of the rows of ``x`` (L2-normalised
    features): larger = more spread; 0 when all rows are equal."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two features")
    x = x if x.dtype == torch.float64 else x.float()
    sq = torch.cdist(x, x).pow(2)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return -(torch.logsumexp(-t * sq[off], 0) - math.log(n * (n - 1)))


class BranchScore:
    """``itc``: the forward's own scores, nothing to do."""

    name = "itc"

    def setup(self, trainer) -> None:
        pass

    def apply(self, out) -> None:
        """Set ``out.score_v`` / ``out.score_t`` to this score (after the forward)."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (``step`` = steps done)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


class HeldOutUniformity(BranchScore):
    """Uniformity of the online encoders' ITC features on a fixed held-out subset."""

    name = "uniformity"

    def __init__(self, cfg: Config):
        b = cfg.balance
        self.every = b.score_every
        self.samples = b.score_samples
        self.split_path = b.score_split or cfg.data.val_split
        if not self.split_path:
            raise ConfigError("balance.score=uniformity needs a held-out split: set balance.score_split "
                              "(or data.val_split)")
        self.cfg = cfg
        self.values: Optional[tuple[float, float]] = None
        self.measured_at = -1

    def setup(self, trainer) -> None:
        # the score must not change the run: the DataLoader below would draw its seed from the
        # training RNG, so it runs on a forked generator
        with torch.random.fork_rng(devices=[]):
            self._setup(trainer)

    def _setup(self, trainer) -> None:
        from ..data import build_tokenizer, iter_images, load_retrieval_split
        self.trainer = trainer
        self.module = trainer.module
        self.device = trainer.device
        split = load_retrieval_split(self.split_path)
        n = min(self.samples, len(split))
        if n < 2:
            raise ConfigError(f"balance.score_split {self.split_path}: {len(split)} image(s), need at least 2")
        # this rank's share of the first n images (decoded once; a few MB at training size)
        rank, world = D.get_rank(), D.get_world_size()
        lo, hi = rank * n // world, (rank + 1) * n // world
        images = torch.zeros(hi - lo, 3, self.cfg.model.image_res, self.cfg.model.image_res)
        for batch, idx in iter_images(split, self.cfg.model.image_res, 256):
            keep = (idx >= lo) & (idx < hi)
            if keep.any():
                images[idx[keep] - lo] = batch[keep]
            if int(idx.min()) >= hi and split.shards is None:
                break
        tokenizer = build_tokenizer(self.cfg.data.tokenizer)
        texts = [split.texts[split.img2txt[i][0]] for i in range(lo, hi)]
        self.ids, self.mask = tokenizer.encode(texts, self.cfg.data.max_len, self.cfg.data.add_sep)
        self.images = images
        self.n = n
        if self.values is None:  # not restored from a checkpoint
            self.measure(trainer.state.step)
        if trainer.rank == 0:
            log.info("branch score: uniformity of the ITC features of %d held-out pairs of %s, every %d steps "
                     "(s_v %.3f, s_t %.3f)", n, self.split_path, self.every, *self.values)

    @torch.no_grad()
    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features of this rank's share, online encoders in eval mode."""
        m = self.module
        was_training = m.training
        m.eval()
        try:
            v, t = [], []
            for i in range(0, len(self.images), 128):
                img = self.images[i:i + 128].to(self.device)
                v.append(m.image_feat(m.encode_image(img)).float())
                ids, mask = self.ids[i:i + 128].to(self.device), self.mask[i:i + 128].to(self.device)
                t.append(m.text_feat(m.encode_text(ids, mask)).float())
        finally:
            m.train(was_training)
        return torch.cat(v), torch.cat(t)

    def measure(self, step: int) -> None:
        v, t = self.features()
        if D.get_world_size() > 1:  # shares differ in size by at most one row: pad, gather, trim
            v, t = _gather_rows(v, self.n), _gather_rows(t, self.n)
        self.values = (float(uniformity(v)), float(uniformity(t)))
        self.measured_at = step

    def apply(self, out) -> None:
        s_v, s_t = self.values
        ref = out.score_v
        # the forward's ITC-half scores stay in the log for comparison
        out.metrics["score_itc_v"], out.metrics["score_itc_t"] = out.score_v, out.score_t
        out.score_v = torch.full_like(ref, s_v, dtype=torch.float32)
        out.score_t = torch.full_like(ref, s_t, dtype=torch.float32)

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            self.measure(step)

    def state_dict(self) -> dict:
        return {"values": list(self.values) if self.values else None, "measured_at": self.measured_at}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state and state.get("values"):
            self.values = tuple(state["values"])
            self.measured_at = state.get("measured_at", -1)


class UnimodalProgress(BranchScore):
    """Progress of each branch's own unimodal loss since the first optimizer steps."""

    name = "unimodal"

    def __init__(self, cfg: Config):
        cfg.need_both_unimodal_losses("balance.score=unimodal reads each branch's own unimodal loss")
        u = cfg.model.unimodal
        self.floor = (LOSS_FLOOR[u.image], LOSS_FLOOR[u.text])
        self.every = cfg.balance.score_every
        self.window: Optional[torch.Tensor] = None  # this optimizer step's micro-batch losses, summed
        self.micro = 0
        # the last `every` steps' (image, text) losses, a ring on the device; the reference
        # L_first; the number of steps seen. Lists in a checkpoint.
        self.recent = None
        self.first = None
        self.steps = 0

    def setup(self, trainer) -> None:
        self.device = trainer.device
        self.floor_t = torch.tensor(self.floor, dtype=torch.float32, device=self.device)
        if self.recent is None:
            self.recent = torch.zeros(self.every, 2, device=self.device)
        elif not torch.is_tensor(self.recent):  # restored from a checkpoint
            self.recent = torch.tensor(self.recent, dtype=torch.float32, device=self.device)
            if self.first is not None:
                self.first = torch.tensor(self.first, dtype=torch.float32, device=self.device)

    def _mean(self) -> torch.Tensor:
        return self.recent[:min(self.steps, self.every)].mean(0)

    def values(self) -> torch.Tensor:
        """(s_v, s_t) as a tensor on the device (no host synchronisation); 0 before the first
        ``every`` steps are done (and at that step, where L is L_first)."""
        if self.first is None:
            return torch.zeros(2, device=self.device)
        return (self.first - self._mean()) / (self.first - self.floor_t).clamp_min(1e-6)

    def apply(self, out) -> None:
        if out.loss_uni_image is None or out.loss_uni_text is None:
            raise RuntimeError("balance.score=unimodal: the model returned no unimodal loss")
        losses = torch.stack([out.loss_uni_image.detach(), out.loss_uni_text.detach()]).float()
        self.window = losses if self.window is None else self.window + losses
        self.micro += 1
        s = self.values()
        out.metrics["score_itc_v"], out.metrics["score_itc_t"] = out.score_v, out.score_t
        out.score_v = torch.zeros_like(out.score_v, dtype=torch.float32) + s[0]
        out.score_t = torch.zeros_like(out.score_t, dtype=torch.float32) + s[1]

    def after_step(self, step: int) -> None:
        if self.window is None:
            return
        w = self.window / self.micro
        self.window, self.micro = None, 0
        if D.get_world_size() > 1:
            dist.all_reduce(w)
            w = w / D.get_world_size()
        # a non-finite step (skipped by the trainer) repeats the previous step's losses
        if self.steps:
            w = torch.where(torch.isfinite(w), w, self.recent[(self.steps - 1) % self.every])
        self.recent[self.steps % self.every] = w
        self.steps += 1
        if self.steps == self.every:
            self.first = self._mean().clone()

    def state_dict(self) -> dict:
        return {"recent": self.recent.tolist() if self.recent is not None else None,
                "first": self.first.tolist() if self.first is not None else None, "steps": self.steps}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state and state.get("recent") is not None:
            self.recent, self.first, self.steps = state["recent"], state["first"], int(state["steps"])


def _gather_rows(x: torch.Tensor, total: int) -> torch.Tensor:
    world = D.get_world_size()
    size = -(-total // world)
    padded = torch.zeros(size, x.shape[1], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = []
    for r, p in enumerate(parts):
        lo, hi = r * total // world, (r + 1) * total // world
        rows.append(p[:hi - lo])
    return torch.cat(rows)


def build_branch_score(cfg: Config) -> BranchScore:
    """The :class:`BranchScore` of ``balance.score``."""
    if cfg.balance.score == "itc":
        return BranchScore()
    if cfg.balance.score == "uniformity":
        return HeldOutUniformity(cfg)
    if cfg.balance.score == "unimodal":
        return UnimodalProgress(cfg)
    raise ConfigError(f"balance.score={cfg.balance.score!r}: expected one of {', '.join(SCORES)}")
