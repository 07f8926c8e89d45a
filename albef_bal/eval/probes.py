"""Linear probes: what each frozen encoder learned about ground-truth attributes.

A probe is a multinomial logistic regression on frozen features (standardised with the
training part's statistics), fitted with L-BFGS. Two ways to use it:

- :func:`fit_linear_probe`: fit on one split, score on another (accuracy);
- :func:`cross_fit_predictions`: k-fold cross-fitting inside one split, so that every item
  gets a prediction from a probe that never saw it (what :mod:`albef_bal.eval.diagnostics`
  scores with balanced accuracy, paired against the same seed's initialisation).

Targets should not be words of the caption, else the text probe reads them off the input
(the synthetic corpus lists which of its ``probe`` targets are caption words).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@contextmanager
def _one_thread():
    """Probe-sized products gain nothing from threads, and on a busy machine every parallel
    region waits for a descheduled thread: fit on one thread, then restore the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int, seed: int,
                 class_weight: Optional[torch.Tensor] = None):
    """Standardise ``x`` and fit softmax regression (cross-entropy, weighted by ``class_weight``
    as ``F.cross_entropy`` weighs it, plus ``weight_decay * |W|^2``) by L-BFGS with the
    analytic gradient; returns a predict function."""
    x = x.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    onehot = F.one_hot(y, classes).float()
    sw = (class_weight[y] if class_weight is not None else torch.ones(len(y))).float()
    sw = (sw / sw.sum())[:, None]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    # stop when a step changes the loss by < 1e-7 (far below what moves a prediction)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-7)

    @torch.no_grad()
    def closure():
        logp = torch.log_softmax(x @ w + b, dim=1)
        loss = -(sw * onehot * logp).sum() + weight_decay * (w * w).sum()
        grad_z = sw * (logp.exp() - onehot)
        w.grad = x.t() @ grad_z + 2 * weight_decay * w
        b.grad = grad_z.sum(0)
        return loss

    with _one_thread():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: ((z.float() - mean) / std @ w + b).argmax(1)


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     weight_decay: float = 1e-3, steps: int = 300, seed: int = 0) -> dict:
    """Fit a softmax classifier on (x_train, y_train) with L-BFGS; return train/test accuracy
    and the majority-class baseline of the test set."""
    classes = int(max(y_train.max(), y_test.max())) + 1
    predict = _fit_softmax(x_train, y_train, classes, weight_decay, steps, seed)
    acc = lambda x, y: float((predict(x) == y).float().mean())  # noqa: E731
    majority = float((y_test == torch.bincount(y_train, minlength=classes).argmax()).float().mean())
    return {"train_acc": acc(x_train, y_train), "test_acc": acc(x_test, y_test), "majority": majority}


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of every item: each class's items are shuffled (``seed``) and dealt
    round-robin, so every fold holds about 1/k of every class."""
    y = np.asarray(y)
    folds = np.empty(len(y), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class starts where this one stopped: folds stay even
    return folds


def cross_fit_predictions(x: torch.Tensor, y: np.ndarray, folds: np.ndarray, c: float = 1.0, steps: int = 100,
                          seed: int = 0, balanced: bool = True) -> np.ndarray:
    """Out-of-fold predictions: for each fold, a probe fitted on the other folds predicts it.

    The L2 penalty is scikit-learn's ``LogisticRegression(C=c)``: ``|W|^2 / (2 c n)`` beside
    the mean cross-entropy of the n training items, so small folds are regularised more.
    With ``balanced`` the training loss weighs each class by n / (classes x count), so the
    probe aims at balanced accuracy rather than at the majority class. Deterministic: the
    same features, targets and folds give the same predictions."""
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    classes = int(y_t.max()) + 1
    pred = np.empty(len(y_t), dtype=np.int64)
    for f in np.unique(folds):
        test = torch.as_tensor(folds == f)
        train = ~test
        weight = None
        if balanced:
            counts = torch.bincount(y_t[train], minlength=classes).double()
            present = counts > 0
            weight = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)),
                                 torch.zeros_like(counts)).float()
        if int(train.sum()) == 0 or int(torch.unique(y_t[train]).numel()) < 2:
            # one class only in the training folds: the probe can only say that class
            pred[test.numpy()] = int(y_t[train][0]) if int(train.sum()) else 0
            continue
        weight_decay = 1.0 / (2.0 * c * int(train.sum()))
        predict = _fit_softmax(x[train], y_t[train], classes, weight_decay, steps, seed, weight)
        pred[test.numpy()] = predict(x[test]).numpy()
    return pred


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the classes present in ``y`` of the share of that class predicted right."""
    y, pred = np.asarray(y), np.asarray(pred)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


@torch.no_grad()
def encoder_features(model, split, tokenizer, batch_size: int = 256, caption: int = 0,
                     device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Per image of a retrieval split: the image encoder's and the text encoder's CLS token
    (of caption number ``caption`` of each image), before projection, frozen."""
    from ..data import iter_images
    device = device or next(model.parameters()).device
    model.eval()
    n = len(split.image_ids)
    image = None
    for images, idx in iter_images(split, model.cfg.image_res, batch_size):
        cls = model.encode_image(images.to(device))[:, 0].float().cpu()
        if image is None:
            image = torch.zeros(n, cls.shape[1])
        image[idx] = cls
    texts = [split.texts[caps[min(caption, len(caps) - 1)]] for caps in split.img2txt]
    add_sep = getattr(getattr(model, "config", None), "data", None)
    add_sep = add_sep.add_sep if add_sep is not None else True
    text = []
    for i in range(0, n, batch_size):
        ids, mask = tokenizer.encode(texts[i:i + batch_size], model.cfg.text.max_position, add_sep)
        text.append(model.encode_text(ids.to(device), mask.to(device))[:, 0].float().cpu())
    return {"vision": image, "text": torch.cat(text)}


def probe_targets(split, names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Integer targets per image from the split's ``attributes.probe`` entries; a split without
    them (or with an image lacking one of ``names``) raises ValueError naming the split."""
    rows = [m.get("attributes", {}).get("probe") if isinstance(m.get("attributes"), dict) else None
            for m in split.meta]
    missing = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if not rows or missing:
        raise ValueError(f"{split.source}: {len(missing) if rows else 'all'} of {len(rows)} images have no "
                         f"'attributes.probe' entry (integer probe targets per image; the synthetic corpus "
                         f"writes them: data_tools/make_synthetic.py)")
    names = names or sorted(rows[0])
    for k in names:
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get(k), int) or isinstance(r.get(k), bool)]
        if bad:
            raise ValueError(f"{split.source}: image {bad[0]} has no integer 'attributes.probe.{k}' "
                             f"({len(bad)} image(s) in all)")
    return {k: torch.tensor([r[k] for r in rows]) for k in names}


def probe_encoders(model, train_split, test_split, tokenizer, names: Optional[list[str]] = None) -> dict:
    """``{attribute: {"vision": {...}, "text": {...}}}`` test accuracies of per-encoder probes."""
    f_train = encoder_features(model, train_split, tokenizer)
    f_test = encoder_features(model, test_split, tokenizer)
    y_train, y_test = probe_targets(train_split, names), probe_targets(test_split, names)
    return {attr: {branch: fit_linear_probe(f_train[branch], y_train[attr], f_test[branch], y_test[attr])
                   for branch in ("vision", "text")}
            for attr in y_train}
