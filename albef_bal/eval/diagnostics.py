"""Imbalance diagnostics: what each encoder learned, what the fusion layers use, and where
the two embedding spaces sit, measured on held-out data.

Four instruments (the definitions are in docs, section "Diagnostics"):

- **Probe gain per encoder.** Linear probes on frozen features, k-fold cross-fitted inside
  one split (every item is scored once, by a probe that never saw it), scored with balanced
  accuracy, reported as the gain over the same seed's initialisation (rebuilt as
  ``albef-bal pretrain`` builds it). 95% intervals by a paired bootstrap over items: the
  same resample for the trained and the initial model, so an untrained model's gain is 0
  with interval [0, 0]. The text headline leaves out targets that are words of the caption.
- **Fusion reliance on each modality.** A two-player Shapley value per item: the players
  are the image (true image, or another item's image) and the caption's content words
  (visible, or replaced by [MASK]); the value is the accuracy of masked-content-word
  prediction (MLM) and of image-text matching (ITM). Reported per task and averaged.
- **Modality gap** (Liang et al., NeurIPS 2022): distance between the centroids of the
  L2-normalised image and text ITC features; **alignment** and **uniformity** of those
  features (Wang and Isola, ICML 2020).
- **Learning speed per branch** lives in the trainer (``update_ratio_<branch>`` in the
  metrics log, :mod:`albef_bal.engine.updates`).

Entry points: :func:`diagnose_checkpoint` (what ``albef-bal diagnose`` runs),
:func:`diagnose_model` (a built model and its initialisation), :class:`TrainingDiagnostics`
(the trainer's ``diagnose.every``). Nothing here runs a collective or the model's
``forward`` (which would move the queues): only the feature API.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, to_dict
from .probes import balanced_accuracy, cross_fit_predictions, probe_targets, stratified_folds

log = logging.getLogger("albef_bal.diagnose")

BRANCHES = ("vision", "text")
FEATURE_KINDS = ("cls", "itc", "pooled")
# the four coalitions of the two-player game: which inputs the fusion gets intact
COALITIONS = ("image+text", "image", "text", "none")
RESULT_FILE = "diagnose.json"
# Function words: everything else in a caption is a content word (the text player). Spatial
# prepositions (above, below, behind, ...) carry scene content and are not listed.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no another
and or but nor so yet if then than as because while although
of in on at to for from by with into onto upon about out off up down over
is are was were be been being am has have had do does did will would can could shall should may might must
there here it its they them their he him his she her we us our you your i me my
which who whom whose what where when how
very just also too not only
""".split())


@dataclass
class DiagnoseSettings:
    """How the diagnostics are computed (``albef-bal diagnose`` options, ``diagnose.*`` keys)."""
    features: str = "pooled"  # probe features: pooled | cls | itc (docs: why pooled)
    folds: int = 5  # cross-fitting folds inside the split
    bootstrap: int = 1000  # paired bootstrap resamples for the 95% intervals
    seed: int = 0  # folds, bootstrap resamples, probe initialisation
    caption: int = 0  # which caption of each image (index into its caption list)
    batch_size: int = 64  # images per encoder call
    fusion_batch: int = 256  # sequences per fusion call (reliance)
    probe_c: float = 1.0  # inverse L2 strength, as scikit-learn's LogisticRegression(C)
    probe_steps: int = 100  # L-BFGS iterations (separable small folds would run the full budget)
    reliance: bool = True
    uniformity_max: int = 4096  # items in the uniformity estimate (pairwise, quadratic)

    def validate(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise ConfigError(f"features must be one of {list(FEATURE_KINDS)}, got {self.features!r}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.bootstrap < 1 or self.batch_size < 1 or self.fusion_batch < 1 or self.caption < 0:
            raise ConfigError("bootstrap, batch_size and fusion_batch must be >= 1 and caption >= 0")


# ---------------------------------------------------------------- initialisation
def build_init_model(cfg: Config, device: Optional[torch.device] = None):
    """The initial weights of a pretraining run with this resolved config, rebuilt exactly as
    ``albef-bal pretrain`` builds them: ``torch.manual_seed(train.seed); build_model(model)``
    (``model.init_text`` / ``model.init_vision`` loaded when set). The caller's RNG state is
    left as it was."""
    from ..models.albef import build_model
    for key in ("init_text", "init_vision"):
        path = getattr(cfg.model, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"model.{key}={path!r} does not exist here: the initialisation cannot be rebuilt "
                              f"(run from the directory the training ran in, or fix the path in the config)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(copy.deepcopy(cfg.model))
    model.config = cfg
    return model.to(device or torch.device("cpu")).eval()


def resolve_export(path: str, what: str = "CHECKPOINT") -> str:
    """The export directory (``model.safetensors`` + ``config.yaml``) of ``path``: the path
    itself, or a run directory's ``export/``. Errors name the missing file."""
    from ..checkpoints import CONFIG_FILE, MODEL_FILE, CheckpointError
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} {path}: diagnose needs an export directory or a run directory "
                              f"(model.safetensors + config.yaml): the resolved config, train.seed included, "
                              f"is what rebuilds the initialisation. Official .pth files carry neither")
    for d in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(d, MODEL_FILE)):
            if not os.path.isfile(os.path.join(d, CONFIG_FILE)):
                raise CheckpointError(f"{what} {d} has {MODEL_FILE} but no {CONFIG_FILE}: diagnose needs the "
                                      f"resolved config (model.* and train.seed) to rebuild the initialisation")
            return d
    raise CheckpointError(f"{what} {path}: neither {path}/{MODEL_FILE} nor {path}/export/{MODEL_FILE} exists "
                          f"(pass an export directory or a finished run's output directory)")


# --------------------------------------------------------------------- the items
def subsplit(split, indices: Sequence[int]):
    """The images ``indices`` of a retrieval split (captions and meta kept), in that order."""
    from ..data.retrieval import RetrievalSplit
    texts, img2txt, txt2img = [], [], []
    for new, i in enumerate(indices):
        img2txt.append([])
        for t in split.img2txt[i]:
            img2txt[-1].append(len(texts))
            texts.append(split.texts[t])
            txt2img.append(new)
    return RetrievalSplit(source=split.source, images=[split.images[i] for i in indices],
                          image_ids=[split.image_ids[i] for i in indices], texts=texts, img2txt=img2txt,
                          txt2img=txt2img, meta=[split.meta[i] for i in indices], shards=split.shards)


def caption_word_targets(split_source: str, names: Iterable[str]) -> list[str]:
    """Which probe targets are words of the caption: the corpus manifest's
    ``probe_targets.caption_words`` (next to the split file) when there is one, else the
    synthetic corpus's list."""
    from ..data.synthetic import CAPTION_WORD_TARGETS
    listed = list(CAPTION_WORD_TARGETS)
    if isinstance(split_source, str):
        manifest = os.path.join(os.path.dirname(os.path.abspath(split_source)), "manifest.json")
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    listed = list(json.load(f)["probe_targets"]["caption_words"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return [n for n in names if n in listed]


def content_words(ids: Sequence[int], tokenizer, special: Iterable[int]) -> list[list[int]]:
    """Token positions of each content word of one tokenised caption: a word is a token and
    its ``##`` continuations; it is content unless it is a function word (FUNCTION_WORDS) or
    has no letter or digit."""
    special = set(int(s) for s in special)
    words: list[list[int]] = []
    text: list[str] = []
    for pos, tid in enumerate(ids):
        tid = int(tid)
        if tid in special:
            continue
        tok = tokenizer.id_to_token(tid) or ""
        if tok.startswith("##") and words and words[-1][-1] == pos - 1:
            words[-1].append(pos)
            text[-1] += tok[2:]
        else:
            words.append([pos])
            text.append(tok)
    return [w for w, t in zip(words, text)
            if t.lower() not in FUNCTION_WORDS and any(ch.isalnum() for ch in t)]


def _regroup(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], min_size: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Image batches of at least ``min_size`` items: a short batch joins the one before it."""
    held = None
    for images, idx in batches:
        if held is None:
            held = (images, idx)
        elif len(idx) < min_size:
            held = (torch.cat([held[0], images]), torch.cat([held[1], idx]))
        else:
            yield held
            held = (images, idx)
    if held is not None:
        yield held


# ------------------------------------------------------------------- collection
@torch.no_grad()
def collect(model, split, tokenizer, cfg: Config, settings: DiagnoseSettings, reliance: bool = True,
            progress: Optional[Callable[[int], None]] = None) -> dict:
    """One pass over ``split`` (one caption per image): per-branch features of every kind,
    the L2-normalised ITC features, and (``reliance``) the per-item accuracies of the fusion
    under the four coalitions. Runs in eval mode with the branch hook off; restores both."""
    from ..data import iter_images
    device = next(model.parameters()).device
    was_training, hook = model.training, getattr(model, "branch_hook", None)
    model.eval()
    model.branch_hook = None
    n = len(split.images)
    if reliance and n < 4:
        raise ValueError(f"{split.source}: fusion reliance needs at least 4 images (got {n})")
    texts = [split.texts[caps[min(settings.caption, len(caps) - 1)]] for caps in split.img2txt]
    t = model.cfg.text
    special = (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id, getattr(tokenizer, "unk_token_id", -1))
    feats: dict[str, dict[str, Optional[torch.Tensor]]] = {b: {k: None for k in FEATURE_KINDS} for b in BRANCHES}
    itc = {"image": None, "text": None}
    rel = {task: {c: np.full(n, np.nan) for c in COALITIONS} for task in ("mlm", "itm")}
    try:
        batches = iter_images(split, model.cfg.image_res, settings.batch_size)
        for images, idx in (_regroup(batches, 4) if reliance else batches):
            idx_l = idx.tolist()
            ids, mask = tokenizer.encode([texts[i] for i in idx_l], cfg.data.max_len, cfg.data.add_sep)
            ids, mask = ids.to(device), mask.to(device)
            img_tok = model.encode_image(images.to(device))
            txt_tok = model.encode_text(ids, mask)
            m = mask[:, 1:, None].float()
            out = {"vision": {"cls": img_tok[:, 0], "itc": model.image_feat(img_tok),
                              "pooled": img_tok[:, 1:].mean(1)},
                   "text": {"cls": txt_tok[:, 0], "itc": model.text_feat(txt_tok),
                            "pooled": (txt_tok[:, 1:] * m).sum(1) / m.sum(1).clamp_min(1.0)}}
            for b in BRANCHES:
                for k, v in out[b].items():
                    if feats[b][k] is None:
                        feats[b][k] = torch.zeros(n, v.shape[1])
                    feats[b][k][idx] = v.float().cpu()
            for key, v in (("image", out["vision"]["itc"]), ("text", out["text"]["itc"])):
                if itc[key] is None:
                    itc[key] = torch.zeros(n, v.shape[1])
                itc[key][idx] = v.float().cpu()
            if reliance:
                words = [content_words(row, tokenizer, special) for row in ids.tolist()]
                chunk = fusion_accuracies(model, img_tok, ids, mask, words, settings.fusion_batch)
                for task, by_coalition in chunk.items():
                    for c, v in by_coalition.items():
                        rel[task][c][idx_l] = v
            if progress is not None:
                progress(len(idx_l))
    finally:
        model.train(was_training)
        model.branch_hook = hook
    return {"features": feats, "itc": itc, "reliance": rel if reliance else None}


def _batched(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def fusion_accuracies(model, img_tok: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      words: list[list[list[int]]], fusion_batch: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """Per-item accuracies of the fusion layers for the m >= 4 items of one chunk under each
    coalition (``image+text``, ``image``, ``text``, ``none``).

    Image absent: item j attends to the image of item (j + 2) mod m instead of its own.
    Text absent: every content word of the caption is [MASK].

    - ``itm``: item j's caption with its own image (a positive; absent image: item j+2's)
      and with item (j+1)'s image (a negative; absent image: item j+3's); the score is the
      mean of the two decisions' correctness (0, 0.5 or 1), labels from the intact pairs.
    - ``mlm`` (pretraining models): each content word is predicted from the fused tokens;
      text present: that word alone is masked (one sequence per word); text absent: all
      content words are masked (one sequence). Score: share of its content tokens predicted
      right; NaN for a caption without content words."""
    m = ids.shape[0]
    dev = ids.device
    shift = lambda k: (torch.arange(m, device=dev) + k) % m  # noqa: E731
    mask_id = model.cfg.text.mask_token_id
    all_masked = ids.clone()
    for j, ws in enumerate(words):
        for w in ws:
            all_masked[j, w] = mask_id
    txt = {True: model.encode_text(ids, mask), False: model.encode_text(all_masked, mask)}

    def itm_match(text_tok: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        out = torch.empty(m, dtype=torch.bool, device=dev)
        for sl in _batched(m, fusion_batch):
            logits = model.itm_logits(model.fuse(text_tok[sl], mask[sl], img_tok, image_index=image_index[sl]))
            out[sl] = logits[:, 1] > logits[:, 0]
        return out

    def key(image: bool, text: bool) -> str:
        return {(True, True): "image+text", (True, False): "image", (False, True): "text",
                (False, False): "none"}[(image, text)]

    result: dict[str, dict[str, np.ndarray]] = {"itm": {}}
    for text in (True, False):
        for image, (kp, kn) in ((True, (0, 1)), (False, (2, 3))):
            pos = itm_match(txt[text], shift(kp))
            neg = itm_match(txt[text], shift(kn))
            result["itm"][key(image, text)] = ((pos.float() + (~neg).float()) / 2).cpu().numpy()
    if getattr(model, "mlm_head", None) is None:
        return result

    # text present: one sequence per content word, that word masked
    rows, row_item, targets = [], [], []  # targets: (row, position) of every token to predict
    for j, ws in enumerate(words):
        for w in ws:
            seq = ids[j].clone()
            seq[w] = mask_id
            for p in w:
                targets.append((len(rows), p))
            rows.append(seq)
            row_item.append(j)
    n_tokens = np.array([sum(len(w) for w in ws) for ws in words], dtype=np.float64)
    result["mlm"] = {}
    if not rows:
        for image in (True, False):
            for text in (True, False):
                result["mlm"][key(image, text)] = np.full(m, np.nan)
        return result
    single = torch.stack(rows)
    item = torch.tensor(row_item, device=dev)
    single_mask = mask[item]
    single_tok = torch.cat([model.encode_text(single[sl], single_mask[sl]) for sl in _batched(len(rows), fusion_batch)])
    t_row = torch.tensor([r for r, _ in targets], device=dev)
    t_pos = torch.tensor([p for _, p in targets], device=dev)
    t_item = item[t_row]
    t_label = ids[t_item, t_pos]
    # text absent: the all-masked caption, every content token a target
    a_item = torch.tensor([j for j, ws in enumerate(words) for w in ws for _ in w], device=dev)
    a_pos = torch.tensor([p for ws in words for w in ws for p in w], device=dev)
    a_label = ids[a_item, a_pos]

    def mlm_correct(text_tok, text_mask, image_index, sel_row, sel_pos, labels) -> torch.Tensor:
        correct = torch.zeros(len(labels), dtype=torch.bool, device=dev)
        for sl in _batched(text_tok.shape[0], fusion_batch):
            fused = model.fuse(text_tok[sl], text_mask[sl], img_tok, image_index=image_index[sl])
            hit = (sel_row >= sl.start) & (sel_row < sl.stop)
            if hit.any():
                logits = model.mlm_head(fused[sel_row[hit] - sl.start, sel_pos[hit]])
                correct[hit] = logits.argmax(-1) == labels[hit]
        return correct

    for image, k in ((True, 0), (False, 2)):
        c1 = mlm_correct(single_tok, single_mask, shift(k)[item], t_row, t_pos, t_label)
        c0 = mlm_correct(txt[False], mask, shift(k), a_item, a_pos, a_label)
        for text, correct, owner in ((True, c1, t_item), (False, c0, a_item)):
            hits = np.bincount(owner.cpu().numpy(), weights=correct.float().cpu().numpy(), minlength=m)
            with np.errstate(invalid="ignore", divide="ignore"):
                result["mlm"][key(image, text)] = np.where(n_tokens > 0, hits / np.maximum(n_tokens, 1), np.nan)
    return result


# ------------------------------------------------------------------------ probes
def probe_predictions(features: dict, targets: dict[str, np.ndarray], folds: dict[str, np.ndarray],
                      settings: DiagnoseSettings, kind: Optional[str] = None,
                      progress: Optional[Callable[[int], None]] = None) -> dict[str, dict[str, np.ndarray]]:
    """Out-of-fold predictions {target: {branch: [n]}} of linear probes on ``features``
    (``collect(...)["features"]``) of ``kind`` (default ``settings.features``)."""
    kind = kind or settings.features
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, y in targets.items():
        out[name] = {}
        for b in BRANCHES:
            out[name][b] = cross_fit_predictions(features[b][kind], y, folds[name], settings.probe_c,
                                                 settings.probe_steps, settings.seed)
            if progress is not None:
                progress(1)
    return out


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement (one shared draw for every paired
    comparison)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_balanced_accuracy(y: np.ndarray, correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Balanced accuracy (%) of each resample ``idx[r]``: mean recall over the classes present in it."""
    yr, cr = y[idx], correct[idx]
    recalls = []
    for c in np.unique(y):
        is_c = yr == c
        cnt = is_c.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(cnt > 0, (is_c & cr).sum(1) / np.maximum(cnt, 1), np.nan))
    return 100.0 * np.nanmean(np.stack(recalls), axis=0)


def _ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if not len(v):
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def probe_report(targets: dict[str, np.ndarray], preds: dict[str, dict], caption_words: Sequence[str],
                 idx: np.ndarray) -> dict:
    """Gains and intervals from out-of-fold predictions.

    ``preds`` maps a model name to ``{target: {branch: predictions}}``: ``run`` and ``init``
    always, ``reference`` and ``reference_init`` for the relative gain. Headlines: vision =
    mean gain over every target (pixels spell nothing); text = mean over the targets that are
    not caption words; the caption-word targets get their own line."""
    names = list(targets)
    computed = [t for t in names if t not in caption_words]
    words = [t for t in names if t in caption_words]
    has_ref = "reference" in preds
    per_target: dict[str, Any] = {}
    boot: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # model -> branch -> target -> [R] BA
    for t in names:
        y = targets[t]
        classes = np.unique(y)
        per_target[t] = {"kind": "caption_word" if t in caption_words else "computed",
                         "classes": int(y.max()) + 1, "classes_present": int(len(classes)),
                         "chance": 100.0 / len(classes)}
        for b in BRANCHES:
            d: dict[str, Any] = {}
            for model_name, p in preds.items():
                correct = p[t][b] == y
                d[model_name] = 100.0 * balanced_accuracy(y, p[t][b])
                boot.setdefault(model_name, {}).setdefault(b, {})[t] = bootstrap_balanced_accuracy(y, correct, idx)
            gain = boot["run"][b][t] - boot["init"][b][t]
            d["gain"] = d["run"] - d["init"]
            d["ci"] = _ci(gain)
            if has_ref:
                ref_gain = boot["reference"][b][t] - boot["reference_init"][b][t]
                d["reference_gain"] = d["reference"] - d["reference_init"]
                d["relative_gain"] = d["gain"] / d["reference_gain"] if d["reference_gain"] > 0 else None
                with np.errstate(invalid="ignore", divide="ignore"):
                    d["relative_gain_ci"] = _ci(np.where(ref_gain > 0, gain / ref_gain, np.nan))
            per_target[t][b] = d

    def headline(branch: str, group: Sequence[str]) -> tuple[Optional[float], list]:
        if not group:
            return None, [None, None]
        gains = np.mean([boot["run"][branch][t] - boot["init"][branch][t] for t in group], axis=0)
        return float(np.mean([per_target[t][branch]["gain"] for t in group])), _ci(gains)

    groups = {"vision": names, "text": computed}
    out: dict[str, Any] = {"probe_gain": {}, "probe_gain_ci": {}, "headline_targets": groups,
                           "probe_gain_caption_words": {}, "probe_gain_caption_words_ci": {},
                           "probe_gain_computed": {}, "probe_gain_computed_ci": {}, "targets": per_target}
    out["probe_accuracy"] = {m: {b: (float(np.mean([per_target[t][b][m] for t in groups[b]])) if groups[b] else None)
                                 for b in BRANCHES} for m in preds}
    for b in BRANCHES:
        out["probe_gain"][b], out["probe_gain_ci"][b] = headline(b, groups[b])
        out["probe_gain_caption_words"][b], out["probe_gain_caption_words_ci"][b] = headline(b, words)
        out["probe_gain_computed"][b], out["probe_gain_computed_ci"][b] = headline(b, computed)
    if has_ref:
        out["relative_gain"], out["relative_gain_ci"] = {}, {}
        for b in BRANCHES:
            group = groups[b]
            if not group:
                out["relative_gain"][b], out["relative_gain_ci"][b] = None, [None, None]
                continue
            run = np.mean([boot["run"][b][t] - boot["init"][b][t] for t in group], axis=0)
            ref = np.mean([boot["reference"][b][t] - boot["reference_init"][b][t] for t in group], axis=0)
            ref_point = float(np.mean([per_target[t][b]["reference_gain"] for t in group]))
            out["relative_gain"][b] = out["probe_gain"][b] / ref_point if ref_point > 0 else None
            with np.errstate(invalid="ignore", divide="ignore"):
                out["relative_gain_ci"][b] = _ci(np.where(ref > 0, run / ref, np.nan))
            out.setdefault("reference_probe_gain", {})[b] = ref_point
    return out


# ---------------------------------------------------------------------- reliance
def shapley_two_player(v: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-item Shapley values (image, text) of the game v(coalition):
    phi_image = [(v(image+text) - v(text)) + (v(image) - v(none))] / 2, phi_text likewise;
    phi_image + phi_text = v(image+text) - v(none)."""
    phi_i = ((v["image+text"] - v["text"]) + (v["image"] - v["none"])) / 2
    phi_t = ((v["image+text"] - v["image"]) + (v["text"] - v["none"])) / 2
    return phi_i, phi_t


def reliance_report(rel: dict[str, dict[str, np.ndarray]], idx: np.ndarray) -> dict:
    """Shapley reliance per task (accuracy points) with paired-bootstrap intervals, and the
    headline ``reliance`` = mean over the tasks measured (MLM and ITM; ITM only for a
    retrieval model)."""
    detail: dict[str, Any] = {}
    boot_i, boot_t, point_i, point_t = [], [], [], []
    for task in ("mlm", "itm"):
        v = rel.get(task)
        if v is None or np.all(np.isnan(v["image+text"])):
            continue
        v = {c: 100.0 * a for c, a in v.items()}
        phi_i, phi_t = shapley_two_player(v)
        ok = np.isfinite(phi_i)
        pi, pt = float(np.mean(phi_i[ok])), float(np.mean(phi_t[ok]))
        bi, bt = np.nanmean(phi_i[idx], axis=1), np.nanmean(phi_t[idx], axis=1)
        detail[task] = {"accuracy": {c: float(np.nanmean(a)) for c, a in v.items()},
                        "image": pi, "text": pt, "image_ci": _ci(bi), "text_ci": _ci(bt), "items": int(ok.sum())}
        boot_i.append(bi)
        boot_t.append(bt)
        point_i.append(pi)
        point_t.append(pt)
    if not detail:
        return {"reliance": {"image": None, "text": None}, "reliance_ci": {"image": None, "text": None},
                "reliance_detail": {}}
    return {"reliance": {"image": float(np.mean(point_i)), "text": float(np.mean(point_t))},
            "reliance_ci": {"image": _ci(np.mean(boot_i, axis=0)), "text": _ci(np.mean(boot_t, axis=0))},
            "reliance_detail": detail}


# ---------------------------------------------------------------------- geometry
def modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """||mean(image) - mean(text)|| of L2-normalised embeddings (Liang et al., 2022)."""
    image, text = F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)
    return float((image.mean(0) - text.mean(0)).norm())


def alignment(image: torch.Tensor, text: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(y)||^alpha over matching pairs (Wang and Isola, 2020; lower = closer)."""
    image, text = F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)
    return float((image - text).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs (Wang and Isola, 2020; lower = more
    uniform on the sphere, about -4 for t = 2 in high dimension; 0 when all points coincide).
    The negative of the branch score ``balance.score=uniformity``, which counts spread as more."""
    from ..balance.scores import uniformity as spread
    return -float(spread(F.normalize(x.double(), dim=-1), t))


def geometry_report(itc: dict[str, torch.Tensor], max_items: int = 4096, seed: int = 0) -> dict:
    img, txt = itc["image"], itc["text"]
    sub = torch.arange(len(img))
    if len(img) > max_items:
        sub = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(img), max_items, replace=False)))
    return {"modality_gap": modality_gap(img, txt), "alignment": alignment(img, txt),
            "uniformity": {"image": uniformity(img[sub]), "text": uniformity(txt[sub])}}


# ----------------------------------------------------------------------- driver
def _folds_for(targets: dict[str, np.ndarray], k: int, seed: int) -> dict[str, np.ndarray]:
    n = len(next(iter(targets.values())))
    if n < k:
        raise ValueError(f"{n} items are too few for {k}-fold cross-fitting")
    return {t: stratified_folds(y, k, seed) for t, y in targets.items()}


class _Bar:
    """A tqdm bar on the terminal (``enabled``), nothing otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            import sys
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 20.0)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def diagnose_model(model, init_model, split, tokenizer, cfg: Config, settings: Optional[DiagnoseSettings] = None,
                   reference=None, reference_init=None, compare_features: bool = False,
                   show_progress: bool = False) -> dict:
    """Every diagnostic of ``model`` on ``split`` (probe gains over ``init_model``, fusion
    reliance, modality gap, alignment, uniformity). ``reference`` / ``reference_init``: a
    run on the balanced corpus and its initialisation, for the relative probe gain."""
    settings = settings or DiagnoseSettings()
    settings.validate()
    t0 = time.time()
    y = {k: v.numpy() for k, v in probe_targets(split).items()}
    words = caption_word_targets(split.source, y)
    folds = _folds_for(y, settings.folds, settings.seed)
    n = len(split.images)
    models = {"run": model, "init": init_model}
    if reference is not None:
        models.update(reference=reference, reference_init=reference_init)
    collected = {}
    for name, mdl in models.items():
        if mdl is None:
            raise ValueError(f"diagnose_model: the {name} model is missing")
        if name == "reference_init" and mdl is init_model:
            collected[name] = collected["init"]
            continue
        log.info("%s model: encoding %d images and captions%s", name, n,
                 " and measuring fusion reliance" if name in ("run", "reference") and settings.reliance else "")
        bar = _Bar(n, f"{name}: encode", show_progress)
        collected[name] = collect(mdl, split, tokenizer, cfg if name.startswith("run") or name == "init"
                                  else getattr(mdl, "config", cfg), settings,
                                  reliance=settings.reliance and name in ("run", "reference"), progress=bar)
        bar.close()
    kinds = list(FEATURE_KINDS) if compare_features else [settings.features]
    idx = bootstrap_indices(n, settings.bootstrap, settings.seed)
    by_kind = {}
    for kind in kinds:
        bar = _Bar(len(models) * len(y) * len(BRANCHES), f"probes ({kind})", show_progress)
        log.info("probes on %s features: %d targets x %d encoders x %d models, %d-fold cross-fitting", kind, len(y),
                 len(BRANCHES), len(models), settings.folds)
        preds = {}
        for name in models:
            if name == "reference_init" and collected[name] is collected["init"]:
                preds[name] = preds["init"]
                continue
            preds[name] = probe_predictions(collected[name]["features"], y, folds, settings, kind, bar)
        bar.close()
        by_kind[kind] = probe_report(y, preds, words, idx)
    result: dict[str, Any] = {"items": n, "features": settings.features}
    result.update(by_kind[settings.features])
    if compare_features:
        result["probe_gain_by_features"] = {k: {key: r[key] for key in ("probe_gain", "probe_gain_ci",
                                                                          "probe_gain_caption_words",
                                                                          "probe_gain_caption_words_ci",
                                                                          "probe_accuracy")}
                                            for k, r in by_kind.items()}
    run = collected["run"]
    if settings.reliance:
        result.update(reliance_report(run["reliance"], idx))
    result.update(geometry_report(run["itc"], settings.uniformity_max, settings.seed))
    if reference is not None:
        ref = collected["reference"]
        result["reference"] = geometry_report(ref["itc"], settings.uniformity_max, settings.seed)
        if settings.reliance:
            result["reference"].update(reliance_report(ref["reliance"], idx))
    result["settings"] = asdict(settings)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _same_init(a: Config, b: Config) -> bool:
    return a.train.seed == b.train.seed and to_dict(a.model) == to_dict(b.model)


def diagnose_checkpoint(checkpoint: str, split: str, reference: Optional[str] = None, out_dir: Optional[str] = None,
                        image_root: Optional[str] = None, settings: Optional[DiagnoseSettings] = None,
                        compare_features: bool = False, show_progress: bool = False,
                        device: Optional[torch.device] = None) -> dict:
    """``albef-bal diagnose``: load the checkpoint (an export directory, or a run directory's
    ``export/``), rebuild its initialisation from its config and seed, diagnose it on the
    retrieval split, and write ``out_dir/diagnose.json``. Bad input (no such split, a split
    without probe targets, a checkpoint without config) fails before any model is built."""
    from ..checkpoints import load_pretrained
    from ..config import load_config
    from ..data import build_tokenizer, load_retrieval_split
    settings = settings or DiagnoseSettings()
    settings.validate()
    export = resolve_export(checkpoint)
    ref_export = resolve_export(reference, "--reference") if reference else None
    cfg = load_config(os.path.join(export, "config.yaml"))
    ref_cfg = load_config(os.path.join(ref_export, "config.yaml")) if ref_export else None
    if not (isinstance(split, str) and split.endswith(".json")) and not os.path.exists(str(split)):
        raise FileNotFoundError(f"--split {split}: no such file or directory")
    loaded = load_retrieval_split(split, image_root, cfg.data.max_words)
    try:  # a split without probe targets fails here, before any model is built
        probe_targets(loaded)
    except ValueError as e:
        from ..data.retrieval import SplitError
        raise SplitError(f"--split: {e}") from None
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    device = device or torch.device("cpu")
    log.info("diagnosing %s on %s (%d images); initialisation: torch.manual_seed(%d) + build_model",
             export, split, len(loaded), cfg.train.seed)
    model = load_pretrained(export).to(device)
    init = build_init_model(cfg, device)
    ref = ref_init = None
    if ref_export:
        ref = load_pretrained(ref_export).to(device)
        ref_init = init if _same_init(cfg, ref_cfg) else build_init_model(ref_cfg, device)
    result = diagnose_model(model, init, loaded, tokenizer, cfg, settings, ref, ref_init, compare_features,
                            show_progress)
    head = {"checkpoint": os.path.abspath(export), "split": os.path.abspath(split) if isinstance(split, str) else split,
            "init": {"seed": cfg.train.seed, "rebuilt_as": "torch.manual_seed(train.seed); build_model(model)",
                     "init_text": cfg.model.init_text, "init_vision": cfg.model.init_vision}}
    if ref_export:
        head["reference_checkpoint"] = os.path.abspath(ref_export)
        head["reference_init_shared"] = ref_init is init
    result = {**head, **result}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, RESULT_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite(result), f, indent=1)
        os.replace(tmp, path)
    return result


def _finite(x):
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def summary_lines(result: dict) -> list[str]:
    """A few human-readable lines of a diagnose result."""
    def fmt(v, ci=None):
        if v is None:
            return "n/a"
        s = f"{v:+.2f}"
        if ci and ci[0] is not None:
            s += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        return s
    g, ci = result.get("probe_gain", {}), result.get("probe_gain_ci", {})
    lines = [f"probe gain over init ({result.get('features')} features, balanced accuracy, pp, 95% CI):",
             f"  vision (all {len(result['headline_targets']['vision'])} targets): {fmt(g.get('vision'), ci.get('vision'))}",
             f"  text (computed targets): {fmt(g.get('text'), ci.get('text'))}",
             f"  text (caption-word targets, not in the headline): "
             f"{fmt(result['probe_gain_caption_words'].get('text'), result['probe_gain_caption_words_ci'].get('text'))}"]
    if "relative_gain" in result:
        rg = result["relative_gain"]
        lines.append("  relative to the reference: " + ", ".join(
            f"{b} {rg[b]:.2f}" if rg.get(b) is not None else f"{b} n/a" for b in BRANCHES))
    rel = result.get("reliance")
    if rel and rel.get("image") is not None:
        rci = result["reliance_ci"]
        lines.append(f"fusion reliance (Shapley, accuracy points): image {fmt(rel['image'], rci['image'])}, "
                     f"text {fmt(rel['text'], rci['text'])}")
    lines.append(f"modality gap {result['modality_gap']:.3f}, alignment {result['alignment']:.3f}, uniformity "
                 f"image {result['uniformity']['image']:.3f} text {result['uniformity']['text']:.3f}")
    return lines


# --------------------------------------------------------------- during training
class TrainingDiagnostics:
    """The cheap diagnostics every ``diagnose.every`` optimizer steps, on rank 0.

    Set-up (once): the first ``diagnose.samples`` images of ``diagnose.split`` (default
    ``data.val_split``); with ``diagnose.probes`` and probe targets in the split, the
    initialisation is rebuilt from the config and seed and its out-of-fold probe predictions
    are kept (they never change). Each call: one pass of the live model over the subset
    (features, fusion reliance, ITC features), the run's probes, and a metrics row of
    ``diag/*`` values. The model's feature API only: no collective, queues untouched."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        d = cfg.diagnose
        self.settings = DiagnoseSettings(features=d.features, folds=d.folds, bootstrap=d.bootstrap,
                                         batch_size=cfg.eval.batch_size, seed=0)

    def setup(self, device: torch.device) -> "TrainingDiagnostics":
        from ..data import build_tokenizer, load_retrieval_split
        d, cfg = self.cfg.diagnose, self.cfg
        path = d.split or cfg.data.val_split
        root = d.image_root if d.split else cfg.data.val_image_root
        try:
            split = load_retrieval_split(path, root, cfg.data.max_words)
        except (OSError, ValueError) as e:
            raise ConfigError(f"diagnose.split: cannot read {path}: {e}") from None
        self.split = subsplit(split, range(min(d.samples, len(split))))
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.targets = None
        if d.probes:
            try:
                self.targets = {k: v.numpy() for k, v in probe_targets(self.split).items()}
            except ValueError as e:
                log.warning("diagnose: no probe gains during training (%s)", e)
        if self.targets is not None:
            self.words = caption_word_targets(self.split.source, self.targets)
            self.folds = _folds_for(self.targets, self.settings.folds, self.settings.seed)
            init = build_init_model(cfg, device)
            feats = collect(init, self.split, self.tokenizer, cfg, self.settings, reliance=False)["features"]
            self.init_preds = probe_predictions(feats, self.targets, self.folds, self.settings)
            del init
        self.idx = bootstrap_indices(len(self.split.images), self.settings.bootstrap, self.settings.seed)
        log.info("diagnose: every %d steps on %d images of %s%s", d.every, len(self.split.images), path,
                 "" if self.targets is not None else " (no probe gains)")
        return self

    def run(self, model) -> dict[str, float]:
        t0 = time.time()
        with torch.random.fork_rng(devices=[]):  # the image loader draws a seed from the global RNG
            got = collect(model, self.split, self.tokenizer, self.cfg, self.settings, reliance=True)
        row: dict[str, float] = {}
        if self.targets is not None:
            preds = {"run": probe_predictions(got["features"], self.targets, self.folds, self.settings),
                     "init": self.init_preds}
            rep = probe_report(self.targets, preds, self.words, self.idx)
            for b in BRANCHES:
                for key, name in (("probe_gain", f"probe_gain_{b}"),
                                  ("probe_gain_caption_words", f"probe_gain_caption_words_{b}")):
                    if rep[key][b] is not None:
                        row[f"diag/{name}"] = rep[key][b]
                        lo, hi = rep[key + "_ci"][b]
                        row[f"diag/{name}_lo"], row[f"diag/{name}_hi"] = lo, hi
        rel = reliance_report(got["reliance"], self.idx)
        for who in ("image", "text"):
            if rel["reliance"][who] is not None:
                row[f"diag/reliance_{who}"] = rel["reliance"][who]
        geo = geometry_report(got["itc"], self.settings.uniformity_max, self.settings.seed)
        row["diag/modality_gap"] = geo["modality_gap"]
        row["diag/alignment"] = geo["alignment"]
        row["diag/uniformity_image"] = geo["uniformity"]["image"]
        row["diag/uniformity_text"] = geo["uniformity"]["text"]
        row["diag/seconds"] = time.time() - t0
        return {k: float(v) for k, v in row.items() if v is not None and np.isfinite(v)}
