"""Diagnosing and Re-learning: purity diagnostics and soft re-initialisation.

Wei, Li, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024;
details as in the authors' code (GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py``).

At scheduled epochs, for each branch k:

1. extract the branch's features (ALBEF: CLS features) on a training subset and a held-out
   subset; min-max scale each set per dimension (each set with its own minima and maxima);
2. cluster each set with k-means into as many clusters as there are classes and measure
   purity P = share of samples whose cluster's majority label equals their own label;
3. g_k = |P_train - P_val|, alpha_k = tanh(lambda * g_k)  (lambda = 3);
4. theta_k <- (1 - alpha_k) theta_k + alpha_k theta_k_init for every parameter of the branch.

Two options added here, off by default: ``min_gap_se`` re-learns a branch only when its gap
exceeds that many standard errors (:func:`purity_gap_se`, :func:`gated_relearn_alpha`; pure
noise at 500 samples per subset gives gaps of about 0.02, alpha about 0.07, under one
standard error of about 0.03), and ``holdout: train_shard`` draws the held-out subset from a
training shard held out of training (see ``common.hold_out_training_shard``), so that the
gap measures memorisation, not a shift between the training and validation distributions.

A branch that clusters its training data much better than held-out data has memorised
rather than learnt a transferable representation; it is pulled back toward its
initialisation in proportion.

Adaptation: data without a labelled diagnostic split gets labels from k-means on the
features of a frozen reference encoder (:func:`pseudo_labels`).

k-means is faiss's (random initialisation, ``nredo`` restarts keeping the lowest objective);
the authors used scikit-learn's. Both are Lloyd's algorithm; results can differ where
k-means has several local optima.

Training hooks (:class:`RelearnHooks`, below the formulas)
----------------------------------------------------------

At set-up, before any step or resume, the hook keeps a copy of each branch's initial
weights (the pretrained or freshly built initialisation; the same config rebuilds the same
copy on resume, so checkpoints do not carry it). At the end of epochs ``every``,
``2 * every``, ... (at most ``max_times`` times) it

1. extracts each branch's CLS features (image tokens; text-only layers) on a training
   subset and a held-out subset, in eval mode;
2. measures k-means purity (faiss) of each set against its labels: the ``cls`` field of
   the subsets when every sample has one, else (adaptation) pseudo-labels: k-means of the
   min-max scaled features of the *initial* vision and text encoders, concatenated,
   computed once at set-up;
3. alpha_k = tanh(lam * |P_train - P_val|) and
   theta_k <- (1 - alpha_k) theta_k + alpha_k theta_k_init on the branch, on its momentum
   copy, and on the optimizer's fp32 master copy of the branch (ZeRO 1/2 keep one; without
   it the next step would write the old weights back).

Every rank diagnoses on the same subsets and rank 0's alphas are broadcast. The shared
head (fusion layers, projections, ITM/MLM heads, temperature) is never touched.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .common import BRANCHES, BalanceHooks, PairSet, branch_features, subset_pairs

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cluster_purity(labels: ArrayLike, assignments: ArrayLike) -> float:
    """Purity: ``(1 / N) * sum over clusters of the count of its most frequent label``, i.e.
    the share of samples whose cluster's majority label equals their own label.

    Labels and cluster ids may be any hashable integers (they need not be 0..K-1). Ties for
    the majority do not change the value. Returns a Python float in (0, 1]."""
    y = _to_numpy(labels).reshape(-1)
    a = _to_numpy(assignments).reshape(-1)
    if y.shape != a.shape:
        raise ValueError(f"labels ({y.shape[0]}) and assignments ({a.shape[0]}) differ in length")
    if y.size == 0:
        raise ValueError("purity of an empty set is undefined")
    _, y_idx = np.unique(y, return_inverse=True)
    _, a_idx = np.unique(a, return_inverse=True)
    n_labels = int(y_idx.max()) + 1
    # contingency table: rows = clusters, columns = labels
    table = np.bincount(a_idx * n_labels + y_idx, minlength=(int(a_idx.max()) + 1) * n_labels)
    table = table.reshape(-1, n_labels)
    return float(table.max(axis=1).sum()) / float(y.size)


def minmax_scale(features: ArrayLike, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Per-dimension min-max scaling to ``[low, high]`` (float32 [N, D]).

    [-1, 1] as the authors' scaler; any range gives the same k-means partition, since it
    changes all distances by one common factor. A constant dimension maps to the middle of
    the range (it carries no information and must not divide by zero)."""
    x = _to_numpy(features).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    lo = x.min(axis=0)
    span = x.max(axis=0) - lo
    unit = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.5)
    return (unit * (high - low) + low).astype(np.float32)


def kmeans_assign(features: ArrayLike, k: int, seed: int = 0, niter: int = 25, nredo: int = 5) -> np.ndarray:
    """faiss k-means on ``features`` [N, D] (used as given, no scaling) -> cluster id [N] int64.

    Every point takes part in training (faiss would otherwise subsample above 256 points per
    centroid) and no warning is printed for few points per centroid."""
    import faiss  # imported here: the package stays cheap to import

    x = np.ascontiguousarray(_to_numpy(features), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    km = faiss.Kmeans(d, int(k), niter=int(niter), nredo=int(nredo), seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(1, math.ceil(n / k)))
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def kmeans_purity(features: ArrayLike, labels: ArrayLike, k: Optional[int] = None, seed: int = 0,
                  niter: int = 25, nredo: int = 5) -> float:
    """Min-max scale ``features`` [N, D] per dimension, cluster them with k-means into ``k``
    clusters, return the purity of the clusters against ``labels`` [N].

    ``k`` defaults to the number of distinct labels in ``labels`` (the authors use the number
    of classes). ``seed``, ``niter`` (Lloyd iterations) and ``nredo`` (restarts, best
    objective kept) go to faiss."""
    y = _to_numpy(labels).reshape(-1)
    if k is None:
        k = int(np.unique(y).size)
    assign = kmeans_assign(minmax_scale(features), k, seed=seed, niter=niter, nredo=nredo)
    return cluster_purity(y, assign)


def pseudo_labels(reference_features: ArrayLike, k: int, seed: int = 0, niter: int = 25,
                  nredo: int = 5) -> np.ndarray:
    """Adaptation (no labelled diagnostic split): k-means cluster ids [N] int64 of min-max
    scaled features from a frozen reference encoder, used as the labels for purity.

    Compute them once per diagnostic subset with the same reference encoder (e.g. the
    pretrained initialisation) so that every diagnosis measures against the same labels."""
    return kmeans_assign(minmax_scale(reference_features), k, seed=seed, niter=niter, nredo=nredo)


def relearn_alpha(purity_train: float, purity_val: float, lam: float = 3.0) -> float:
    """Re-initialisation strength ``alpha = tanh(lam * |P_train - P_val|)`` in [0, 1)."""
    return math.tanh(lam * abs(float(purity_train) - float(purity_val)))


@torch.no_grad()
def reinit_toward(params: Sequence[torch.Tensor], init_params: Sequence[torch.Tensor], alpha: float) -> None:
    """In place: ``theta <- (1 - alpha) * theta + alpha * theta_init`` for each pair.

    ``alpha = 0`` leaves the tensors bit-identical and ``alpha = 1`` copies the initial
    values exactly. ``init_params`` are cast to each tensor's dtype and device. Apply it to
    the online branch, to its momentum copy, and to the optimizer's fp32 master weights of
    the branch where they exist (otherwise the next step overwrites the edit)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(params) != len(init_params):
        raise ValueError(f"{len(params)} tensors but {len(init_params)} initial tensors")
    for p, p0 in zip(params, init_params):
        if p.shape != p0.shape:
            raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(p0.shape)}")
    if alpha == 0.0:
        return
    for p, p0 in zip(params, init_params):
        # lerp: p + alpha * (p0 - p); torch evaluates it from the nearer end, so alpha = 1
        # yields p0 exactly
        p.lerp_(p0.to(device=p.device, dtype=p.dtype), alpha)


def purity_gap_se(purity_train: float, n_train: int, purity_val: float, n_val: int) -> float:
    """Standard error of ``P_train - P_val`` for purities measured on independent subsets of
    ``n_train`` and ``n_val`` samples, each purity taken as a proportion of samples that match
    their cluster's majority (binomial): ``sqrt(P_t (1 - P_t) / N_t + P_v (1 - P_v) / N_v)``.
    It ignores the clustering's own variance, so it is a lower bound of the gap's spread."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f"subset sizes must be >= 1, got {n_train} and {n_val}")
    pt, pv = float(purity_train), float(purity_val)
    return math.sqrt(max(0.0, pt * (1 - pt)) / n_train + max(0.0, pv * (1 - pv)) / n_val)


def gated_relearn_alpha(purity_train: float, purity_val: float, n_train: int, n_val: int, lam: float = 3.0,
                        min_gap_se: float = 0.0) -> float:
    """:func:`relearn_alpha`, or 0 when the gap ``|P_train - P_val|`` is not larger than
    ``min_gap_se`` standard errors (:func:`purity_gap_se`): re-learn only on a gap the subset
    sizes can tell from sampling noise. ``min_gap_se = 0`` is the authors' rule."""
    gap = abs(float(purity_train) - float(purity_val))
    if min_gap_se > 0 and gap <= min_gap_se * purity_gap_se(purity_train, n_train, purity_val, n_val):
        return 0.0
    return relearn_alpha(purity_train, purity_val, lam)


def relearn_due(epoch: int, every: int, max_times: int, done: int) -> bool:
    """Whether to diagnose and re-learn at the end of (0-based) ``epoch``.

    Fires when ``epoch > 0``, ``epoch % every == 0`` and fewer than ``max_times`` re-learnings
    were ``done``: epochs every, 2*every, ... at most max_times times; epoch 0 never fires (as
    in the authors' code, which checks after each epoch's training). The caller increments
    ``done`` after each re-learning."""
    if every <= 0:
        return False
    return epoch > 0 and epoch % every == 0 and done < max_times


# ------------------------------------------------------------------ training hooks
log = logging.getLogger("albef_bal")
_MOMENTUM_PREFIX = {"vision": ("visual_encoder.", "visual_encoder_m."), "text": ("text_encoder.", "text_encoder_m.")}


class RelearnHooks(BalanceHooks):
    name = "relearn"

    def __init__(self, pairs: Optional[dict[str, PairSet]] = None):
        self.pairs = pairs

    def setup(self, trainer) -> None:
        super().setup(trainer)
        r = self.rcfg = trainer.cfg.balance.relearn
        self.init = {b: [p.detach().to("cpu", copy=True) for p in self.params[b]] for b in BRANCHES}
        named = dict(self.module.named_parameters())
        self.momentum = {}
        for b in BRANCHES:
            online, mom = _MOMENTUM_PREFIX[b]
            self.momentum[b] = [named[mom + n[len(online):]] for n, _ in self.named[b]]
        if self.pairs is None:
            self.pairs = {which: subset_pairs(trainer.cfg, r, which, "balance.relearn") for which in ("train", "val")}
        self.labels = {}
        if all(self.pairs[w].labels is not None for w in ("train", "val")):
            self.labels = {w: self.pairs[w].labels for w in ("train", "val")}
            self.k = int(np.unique(np.concatenate(list(self.labels.values()))).size)
            self.label_source = "cls"
        else:  # adaptation: pseudo-labels from the frozen initial encoders
            self.k = r.num_clusters
            for w in ("train", "val"):
                f = self._features(w)
                joint = np.concatenate([minmax_scale(f["vision"]), minmax_scale(f["text"])], axis=1)
                self.labels[w] = pseudo_labels(joint, min(self.k, len(joint)), seed=r.seed, niter=r.kmeans_iters,
                                               nredo=r.kmeans_redo)
            self.label_source = "pseudo"
        self.done = 0
        self.history: list[dict] = []

    def _features(self, which: str) -> dict[str, np.ndarray]:
        return branch_features(self.module, self.pairs[which], self.cfg.train.micro_batch_size)

    def diagnose(self) -> dict[str, dict[str, float]]:
        """Purity of each branch's features on both subsets, gap and alpha (rank 0's values on
        every rank)."""
        r = self.rcfg
        feats = {w: self._features(w) for w in ("train", "val")}
        values = []
        n_t, n_v = len(self.labels["train"]), len(self.labels["val"])
        for b in BRANCHES:
            p = [kmeans_purity(feats[w][b], self.labels[w], k=min(self.k, len(self.labels[w])), seed=r.seed,
                               niter=r.kmeans_iters, nredo=r.kmeans_redo) for w in ("train", "val")]
            values += [p[0], p[1], gated_relearn_alpha(p[0], p[1], n_t, n_v, r.lam, r.min_gap_se)]
        values = self.broadcast(torch.tensor(values, dtype=torch.float64)).tolist()
        return {b: {"purity_train": values[3 * i], "purity_val": values[3 * i + 1],
                    "gap": abs(values[3 * i] - values[3 * i + 1]),
                    "gap_se": purity_gap_se(values[3 * i], n_t, values[3 * i + 1], n_v),
                    "alpha": values[3 * i + 2]}
                for i, b in enumerate(BRANCHES)}

    @torch.no_grad()
    def reinit(self, branch: str, alpha: float) -> None:
        """theta <- (1 - alpha) theta + alpha theta_init on the branch, its momentum copy and
        the optimizer's fp32 master weights (collective under ZeRO 1/2)."""
        from deepspeed.utils import safe_set_full_fp32_param
        reinit_toward(self.params[branch], self.init[branch], alpha)
        reinit_toward(self.momentum[branch], self.init[branch], alpha)
        for p in self.params[branch]:
            # ZeRO 1/2 keep an fp32 partition that the step writes back into the weights;
            # give it the edited values (a no-op without one)
            safe_set_full_fp32_param(p, p.detach().float())

    def on_epoch_end(self, epoch: int) -> None:
        if not relearn_due(epoch, self.rcfg.every, self.rcfg.max_times, self.done):
            return
        diag = self.diagnose()
        for b in BRANCHES:
            self.reinit(b, diag[b]["alpha"])
        self.done += 1
        self.history.append({"epoch": epoch, **{b: diag[b] for b in BRANCHES}})
        row = {f"relearn/{b}/{k}": v for b in BRANCHES for k, v in diag[b].items()}
        row.update({"relearn/count": self.done, "relearn/epoch": epoch})
        self.log_event(row)
        log.info("re-learning %d at epoch %d (%s labels): %s", self.done, epoch, self.label_source,
                 ", ".join(f"{b} P_train {diag[b]['purity_train']:.3f} P_val {diag[b]['purity_val']:.3f} "
                           f"alpha {diag[b]['alpha']:.3f}" for b in BRANCHES))

    def state_dict(self) -> dict:
        return {"done": self.done, "history": self.history}

    def load_state_dict(self, state) -> None:
        if state:
            self.done = int(state["done"])
            self.history = list(state.get("history", []))
