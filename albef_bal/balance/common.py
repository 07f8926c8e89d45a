"""What the balancing methods' training hooks share: the branches of the model, global-batch
averages, running means for the metrics log, and the held-out / diagnostic pair subsets.

Every method is a :class:`~albef_bal.engine.hooks.TrainHooks` subclass; it sees the trainer
(engine, module, optimizer, config) through ``setup`` and never edits the model or the
engine. Decisions that the authors take over a batch are taken over the *global* batch:
sums over the micro steps of the accumulation window, all-reduced over the ranks.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed as D
from ..config import ConfigError
from ..engine.hooks import StepContext, TrainHooks

log = logging.getLogger("albef_bal")

BRANCHES = ("vision", "text")


class WindowMeans:
    """Means of named scalars since the last :meth:`pop` (for metrics between log steps)."""

    def __init__(self):
        self._sums: dict[str, list[float]] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            s = self._sums.setdefault(k, [0.0, 0])
            s[0] += float(v)
            s[1] += 1

    def pop(self) -> dict[str, float]:
        out = {k: s / n for k, (s, n) in self._sums.items() if n}
        self._sums = {}
        return out


class BalanceHooks(TrainHooks):
    """Base of the methods: ALBEF's loss, the branch parameter lists, global-batch scores."""

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.cfg = trainer.cfg
        self.module = trainer.module
        self.device = next(self.module.parameters()).device
        self.named = self.module.branch_parameters()  # vision / text / shared: [(name, param)]
        self.params = {b: [p for _, p in self.named[b]] for b in self.named}
        self.means = WindowMeans()
        self._score_sum = torch.zeros(3, dtype=torch.float64, device=self.device)

    # --------------------------------------------------------------- scores
    def record_scores(self, out, ctx: StepContext) -> None:
        """Add this micro batch's branch scores to the window's sums (no device sync)."""
        if ctx.first_micro:
            self._score_sum.zero_()
        self._score_sum += torch.stack([out.score_v.detach().double().reshape(()),
                                        out.score_t.detach().double().reshape(()),
                                        torch.ones((), dtype=torch.float64, device=self.device)])

    def global_scores(self) -> tuple[float, float]:
        """(s_v, s_t) of the global batch: the mean over every micro batch of every rank
        (micro batches have equal sizes, so this is the mean over all pairs). Collective."""
        s = self._score_sum.clone()
        if D.get_world_size() > 1:
            dist.all_reduce(s)
        return float(s[0] / s[2]), float(s[1] / s[2])

    def metrics(self) -> dict:
        return self.means.pop()

    # ------------------------------------------------------------- helpers
    def log_event(self, values: dict) -> None:
        """Write a row to the metrics log now (rank 0 writes; e.g. at epoch ends)."""
        self.trainer.metrics.log(self.trainer.state.step, values)

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's values on every rank (decisions computed redundantly stay identical)."""
        if D.get_world_size() > 1:
            values = values.to(self.device)
            dist.broadcast(values, 0)
        return values


def branch_losses(out, weights: Optional[dict], unimodal: str = "itc"):
    """(vision unimodal, text unimodal, multimodal, rest) losses of one forward, as MMPareto and
    G-Blend divide ALBEF's objective (``balance.unimodal_loss``), weighted by
    ``model.loss_weights`` (``weights``; None = unweighted). The four add up to the trainer's
    total loss.

    - ``itc`` (default): each branch's ITC half (itc/2 x L_i2t, itc/2 x L_t2i); multimodal =
      ITM + MLM; rest = the unimodal feature-space losses, if on (balanced by neither method).
    - ``ssl``: each branch's unimodal feature-space loss (``model.unimodal``: uni_image x
      L_uni_image, uni_text x L_uni_text), a true unimodal loss as in the methods' papers;
      multimodal = ITC + ITM + MLM (ITC is cross-modal); rest = 0."""
    w = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "uni_image": 1.0, "uni_text": 1.0, **(weights or {})}
    mm = w["itm"] * out.loss_itm
    if out.loss_mlm is not None:
        mm = mm + w["mlm"] * out.loss_mlm
    if unimodal == "ssl":
        if out.loss_uni_image is None or out.loss_uni_text is None:
            raise ConfigError("balance.unimodal_loss=ssl needs model.unimodal.image and model.unimodal.text on")
        return (w["uni_image"] * out.loss_uni_image, w["uni_text"] * out.loss_uni_text,
                mm + w["itc"] * out.loss_itc, out.loss_itc.new_zeros(()))
    half = w["itc"] / 2.0  # ALBEF's ITC = (i2t + t2i) / 2
    rest = out.unimodal(w["uni_image"], w["uni_text"])
    if not torch.is_tensor(rest):
        rest = out.loss_itc.new_zeros(())
    return half * out.loss_i2t, half * out.loss_t2i, mm, rest


def refuse_fp16(cfg, method: str) -> None:
    """Methods that read or write gradients against unscaled losses cannot follow DeepSpeed's
    dynamic fp16 loss scale; bf16 and fp32 keep gradients unscaled."""
    if cfg.train.precision == "fp16":
        raise ConfigError(f"balance.method={method} needs train.precision fp32 or bf16: with fp16 the engine's "
                          "gradients carry a dynamic loss scale that the method's own gradients do not")


# ------------------------------------------------------------------ pair subsets
@dataclass
class PairSet:
    """A fixed set of image-text pairs (first caption of each image), optionally labelled,
    kept in memory for repeated measurements (held-out losses, purity diagnostics)."""
    images: torch.Tensor  # [N, 3, R, R] float
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    labels: Optional[np.ndarray] = None  # [N] int64 class labels when the data has them

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Full batches only (equal sizes keep in-batch ITC terms comparable); at least one."""
        n = len(self)
        stop = max(batch_size, n - n % batch_size) if n >= batch_size else n
        for i in range(0, stop, batch_size):
            sl = slice(i, min(i + batch_size, n))
            yield (self.images[sl].to(device), self.input_ids[sl].to(device), self.attention_mask[sl].to(device))

    @staticmethod
    def from_batches(batches: Sequence[dict], labels: Optional[Sequence[int]] = None) -> "PairSet":
        """From trainer-style batch dicts (``image``, ``input_ids``, ``attention_mask``)."""
        return PairSet(torch.cat([b["image"] for b in batches]), torch.cat([b["input_ids"] for b in batches]),
                       torch.cat([b["attention_mask"] for b in batches]),
                       None if labels is None else np.asarray(labels, dtype=np.int64))


def meta_label(meta: dict, name: str):
    """A sample's label ``name`` from its annotation: a top-level field (``cls``) or a probe
    target / attribute of the synthetic corpus (``anchor_colour``, ``num_objects`` ...)."""
    for where in (meta, meta.get("probe"), meta.get("attributes"), (meta.get("attributes") or {}).get("probe")):
        if isinstance(where, dict) and name in where:
            return where[name]
    return None


def load_pairs(cfg, path: str, image_root: Optional[str], samples: int, key: str,
               label: str = "cls") -> PairSet:
    """The first ``samples`` images of a retrieval split (annotation JSON or shards) with their
    first captions, at the model's resolution; labels from the ``label`` field (default
    ``cls``; see :func:`meta_label`) when every image has an integer one. ``key`` names the
    config setting in errors."""
    from ..data import build_tokenizer, iter_images, load_retrieval_split
    from ..data.retrieval import RetrievalSplit
    try:
        split = load_retrieval_split(path, image_root, cfg.data.max_words)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    n = min(samples, len(split))
    sub = RetrievalSplit(source=split.source, images=split.images[:n], image_ids=split.image_ids[:n],
                         texts=[split.texts[split.img2txt[i][0]] for i in range(n)],
                         img2txt=[[i] for i in range(n)], txt2img=list(range(n)), meta=split.meta[:n],
                         shards=split.shards)
    images = torch.empty(n, 3, cfg.model.image_res, cfg.model.image_res)
    for batch, idx in iter_images(sub, cfg.model.image_res, 64):
        keep = idx < n
        images[idx[keep]] = batch[keep]
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    ids, mask = tokenizer.encode(sub.texts, cfg.data.max_len, cfg.data.add_sep)
    labels = None
    cls = [meta_label(m, label) for m in sub.meta]
    if cls and all(isinstance(c, int) and not isinstance(c, bool) for c in cls):
        labels = np.asarray(cls, dtype=np.int64)
    log.info("%s: %d pairs from %s (%s)", key, n, path, "labelled" if labels is not None else "no labels")
    return PairSet(images, ids, mask, labels)


def hold_out_training_shard(cfg, section, key: str) -> Optional[str]:
    """``<key>.holdout: train_shard``: take the held-out subset from a training shard that
    training never reads, so that the training and held-out subsets share one distribution.

    The held-out shard is ``<key>.val_split`` when it names one of ``data.train_shards``,
    else the last of them; it is removed from ``data.train_shards`` and written into
    ``<key>.val_split``, and ``<key>.train_split`` defaults to the first remaining shard. The
    saved ``config.yaml`` shows the result, and applying this to it again changes nothing
    (its ``val_split`` is no longer a training shard). Returns the held-out shard (None when
    the option is off). Pretraining shards only."""
    if getattr(section, "holdout", "val_split") != "train_shard":
        return None
    from ..data.shards import ShardSpecError, expand_urls
    if not cfg.data.train_shards:
        raise ConfigError(f"{key}.holdout=train_shard takes a shard of data.train_shards, which is empty "
                          "(pretraining shards only)")
    try:
        urls = expand_urls(cfg.data.train_shards, "data.train_shards")
    except ShardSpecError as e:
        raise ConfigError(str(e)) from None
    norm = {os.path.abspath(u) if not u.startswith(("pipe:", "http:", "https:", "s3:", "gs:")) else u: u
            for u in urls}
    held = section.val_split
    if held is not None:
        key_held = os.path.abspath(held) if os.path.exists(held) else held
        if key_held not in norm:
            return held  # already held out (a resolved config) or a separate split: nothing to remove
        held = norm[key_held]
    else:
        held = urls[-1]
    kept = [u for u in urls if u != held]
    if not kept:
        raise ConfigError(f"{key}.holdout=train_shard needs at least two training shards; data.train_shards "
                          f"has one ({held})")
    cfg.data.train_shards = kept
    section.val_split, section.val_image_root = held, None
    if section.train_split is None:
        section.train_split = kept[0]
    log.info("%s: held-out subset from training shard %s (removed from the %d training shards); training "
             "subset from %s", key, held, len(urls), section.train_split)
    return held


def subset_pairs(cfg, section, which: str, key: str) -> PairSet:
    """``section.<which>_split`` (``val`` falls back to ``data.val_split``) as a :class:`PairSet`."""
    path = getattr(section, f"{which}_split")
    root = getattr(section, f"{which}_image_root")
    if path is None and which == "val":
        path, root = cfg.data.val_split, cfg.data.val_image_root
    if not path:
        raise ConfigError(f"{key}.{which}_split is not set: the method measures a {which} subset "
                          f"(a retrieval split: annotation JSON or shards)")
    return load_pairs(cfg, path, root, section.samples, f"{key}.{which}_split")


@torch.no_grad()
def measure_losses(module, pairs: PairSet, batch_size: int, alpha: float, seed: int = 0,
                   unimodal: str = "itc", use_queue: bool = True) -> torch.Tensor:
    """Mean [vision unimodal, text unimodal, multimodal] losses over ``pairs`` in eval mode
    (see :func:`branch_losses`, unweighted), without touching the momentum encoders or the
    queues; MLM masks, hard negatives and image views from a fixed seed, and the training
    RNG left as it was (resumed runs stay exact). ``alpha`` is the distillation weight (0:
    one-hot targets); ``use_queue=False`` scores ITC against each batch's momentum features
    only (no dependence on the queue's contents)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for image, ids, mask in pairs.batches(batch_size, device):
            out = module(image, ids, mask, alpha=alpha, update=False, use_queue=use_queue)
            v, t, mm, _ = branch_losses(out, None, unimodal)
            total += torch.stack([v.double(), t.double(), mm.double()])
            count += 1
    module.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def branch_features(module, pairs: PairSet, batch_size: int) -> dict[str, np.ndarray]:
    """CLS features of each branch's output (image tokens / text-only tokens) over ``pairs``,
    in eval mode: {"vision": [N, Dv], "text": [N, Dt]} float32."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    feats: dict[str, list] = {"vision": [], "text": []}
    n = len(pairs)
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        feats["vision"].append(module.visual_encoder.forward_features(pairs.images[sl].to(device))[:, 0].float().cpu())
        feats["text"].append(module.text_encoder.forward_text(pairs.input_ids[sl].to(device),
                                                              pairs.attention_mask[sl].to(device))[:, 0].float().cpu())
    module.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in feats.items()}
