"""Two-stage image-text retrieval as in ALBEF: ITC top-k candidates, ITM re-ranking.

Stage 1 (align): every image and every caption is encoded once; the ITC similarity
``sim = image_feat @ text_feat.T`` gives, per image, the top ``k`` captions and, per
caption, the top ``k`` images.
Stage 2 (fuse): each candidate pair goes through the fusion layers and the ITM head; its
score is the ITM "match" logit (``score="itm"``, ALBEF) or that logit plus the pair's
similarity (``score="itm+sim"``, LAVIS). Candidates are placed above all other items of
the row, which keep their similarity order (ALBEF sets them to -100, an arbitrary order;
R@1/5/10 are the same whenever k >= 10). ``k = 0`` ranks by similarity alone.

How the work is spread and bounded:
- each rank encodes its share of the images (``iter_images``) and keeps those image
  tokens in host memory; the image features (one 256-d vector each) are all-gathered;
- every rank encodes all captions (cheap) and keeps their tokens on its device;
- rank 0 picks the candidates and broadcasts them. A pair is scored by the rank that owns
  its image, so no image token ever leaves the rank that computed it; a pair that is a
  candidate in both directions is fused once;
- pairs are fused in batches of ``rerank_batch`` (one image's tokens serve all of its
  pairs; ``image_chunk`` images' tokens sit on the device at a time), under bf16/fp16
  autocast on GPUs;
- the (pair, score) lists are gathered on rank 0, which builds the score matrices and the
  metrics; the metrics are broadcast so every rank returns the same numbers.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import distributed as D
from .metrics import recall_from_ranks, retrieval_ranks
from .topk import topk_inner_product

log = logging.getLogger("albef_bal.eval")
SCORES = ("itm", "itm+sim")


@dataclass
class RetrievalResult:
    """Metrics on every rank; matrices, ranks and candidates on rank 0 only (None elsewhere)."""
    metrics: dict
    k: int
    score: str
    num_images: int
    num_texts: int
    pairs_fused: int = 0  # over all ranks
    timings: dict = field(default_factory=dict)  # seconds: encode, topk, rerank, total
    sims: Optional[torch.Tensor] = None  # [N, T] ITC similarity
    scores_i2t: Optional[torch.Tensor] = None  # [N, T]
    scores_t2i: Optional[torch.Tensor] = None  # [T, N]
    ranks_i2t: Optional[torch.Tensor] = None  # [N] 0-based rank of the best right caption
    ranks_t2i: Optional[torch.Tensor] = None  # [T] 0-based rank of the right image
    # (image index, why) of every image that could not be read and was replaced by a
    # mean-colour placeholder, over all ranks, sorted; on every rank
    substituted: list = field(default_factory=list)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None (fp32) or the autocast dtype: ``auto`` = bf16 on GPUs that have it, else fp16
    on GPUs, fp32 on CPU."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"eval.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _comm_device(device: torch.device) -> torch.device:
    if D.get_world_size() > 1 and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def gather_variable(t: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``t`` (same trailing shape, any length), in rank order, on the CPU."""
    if D.get_world_size() == 1:
        return [t.cpu()]
    cd = _comm_device(device)
    n = torch.tensor([t.shape[0]], device=cd)
    sizes = [torch.zeros_like(n) for _ in range(D.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=cd)
    padded[:t.shape[0]] = t.to(cd)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:s].cpu() for o, s in zip(out, sizes)]


def _broadcast(t: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if D.get_world_size() == 1:
        return t
    cd = _comm_device(device)
    buf = t.to(cd).contiguous() if D.get_rank() == 0 else torch.empty(shape, dtype=dtype, device=cd)
    dist.broadcast(buf, 0)
    return buf.cpu()


# ------------------------------------------------------------------- stage 1: encode
@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer, max_len: int, add_sep: bool, batch_size: int,
                 device: torch.device, amp: Optional[torch.dtype]):
    """``(text_feat [T, E] fp32, text tokens [T, L, D], attention mask [T, L])`` on ``device``;
    all captions are tokenised together so they share one padded length."""
    ids, mask = tokenizer.encode(texts, max_len, add_sep)
    feats, tokens = [], []
    store = amp or torch.float32
    for a in range(0, len(texts), batch_size):
        i, m = ids[a:a + batch_size].to(device), mask[a:a + batch_size].to(device)
        with _autocast(device, amp):
            tok = model.encode_text(i, m)
            feats.append(model.text_feat(tok).float())
        tokens.append(tok.to(store))
    return torch.cat(feats), torch.cat(tokens), mask.to(device)


@torch.no_grad()
def encode_images(model, split, batch_size: int, device: torch.device, amp: Optional[torch.dtype],
                  num_workers: int = 0, substituted: Optional[list] = None):
    """This rank's share: ``(image indices [n] sorted, image tokens [n, P, Dv] in host memory,
    image_feat of all images [N, E] fp32 on the CPU, gathered over ranks)``; ``substituted``
    receives the (index, why) of this rank's unreadable images."""
    from ..data import iter_images
    store = amp or torch.float32
    idx_all, tok_all, feat_all = [], [], []
    res = model.cfg.image_res
    for images, idx in iter_images(split, res, batch_size, D.get_rank(), D.get_world_size(), num_workers,
                                   substituted):
        with _autocast(device, amp):
            tok = model.encode_image(images.to(device, non_blocking=True))
            feat = model.image_feat(tok).float()
        idx_all.append(idx)
        tok_all.append(tok.to(store).cpu())
        feat_all.append(feat)
    n_img = len(split)
    if idx_all:
        mine = torch.cat(idx_all)
        tokens = torch.cat(tok_all)
        feats = torch.cat(feat_all)
    else:  # more ranks than images (or shards)
        mine = torch.zeros(0, dtype=torch.long)
        tokens = torch.zeros(0)
        feats = torch.zeros(0, model.cfg.embed_dim, device=device)
    order = mine.argsort()  # shard splits hand a rank its images in no particular order
    mine, feats = mine[order], feats[order.to(feats.device)]
    if len(mine):
        tokens = tokens[order]
    if device.type == "cuda" and tokens.numel():
        tokens = tokens.pin_memory()
    every_idx = gather_variable(mine, device)
    every_feat = gather_variable(feats.float(), device)
    image_feat = torch.zeros(n_img, feats.shape[1])
    seen = torch.zeros(n_img, dtype=torch.bool)
    for i, f in zip(every_idx, every_feat):
        image_feat[i] = f
        seen[i] = True
    if not seen.all():
        missing = (~seen).nonzero().flatten()[:5].tolist()
        raise RuntimeError(f"{split.source}: {int((~seen).sum())} image(s) were not read by any rank "
                           f"(first indices {missing}); a shard listed in the split may be unreadable")
    return mine, tokens, image_feat


# ------------------------------------------------------------------ stage 2: re-rank
@torch.no_grad()
def itm_scores(model, pairs: torch.Tensor, num_texts: int, my_images: torch.Tensor, image_tokens: torch.Tensor,
               text_tokens: torch.Tensor, text_mask: torch.Tensor, device: torch.device,
               amp: Optional[torch.dtype], rerank_batch: int, image_chunk: int,
               both_logits: bool = False) -> torch.Tensor:
    """ITM match logits of ``pairs`` (codes ``image * T + text``, sorted, every image among
    ``my_images``), fusing ``rerank_batch`` pairs per call with ``image_chunk`` images' tokens
    on the device at a time. ``both_logits``: [P, 2] (no match, match) instead of [P]."""
    out = torch.empty((len(pairs), 2) if both_logits else len(pairs), dtype=torch.float32)
    if len(pairs) == 0:
        return out
    img = pairs // num_texts
    txt = pairs % num_texts
    local = torch.searchsorted(my_images, img)  # position of each pair's image in my tokens
    done = 0
    for c in range(0, len(my_images), image_chunk):
        stop = torch.searchsorted(local, torch.tensor(min(c + image_chunk, len(my_images))), right=False)
        stop = int(stop)
        if stop == done:
            continue
        chunk_tokens = image_tokens[c:c + image_chunk].to(device, non_blocking=True)
        for a in range(done, stop, rerank_batch):
            b = min(stop, a + rerank_batch)
            t = txt[a:b].to(device)
            m = text_mask[t]
            length = int(m.sum(1).max())  # trim the padding this batch does not need
            # pairs are sorted by image: the batch names a few distinct images, whose
            # cross-attention keys/values are projected once each (most of a fusion layer's
            # cost at 257-577 image tokens) and shared by their pairs through image_index
            images, which = torch.unique_consecutive(local[a:b] - c, return_inverse=True)
            with _autocast(device, amp):
                fused = model.fuse(text_tokens[t, :length], m[:, :length], chunk_tokens[images.to(device)],
                                   image_index=which.to(device))
                logits = model.itm_logits(fused)
                out[a:b] = (logits if both_logits else logits[:, 1]).float().cpu()
        done = stop
    if done != len(pairs):
        raise RuntimeError("internal error: re-ranking pairs name images this rank does not hold")
    return out


def _place(sims: torch.Tensor, cand: torch.Tensor, cand_scores: torch.Tensor) -> torch.Tensor:
    """Score matrix whose row r has ``cand_scores[r]`` at columns ``cand[r]`` and, below all
    of them, the other columns in their similarity order."""
    row_max = sims.amax(dim=1, keepdim=True)
    row_min_cand = cand_scores.amin(dim=1, keepdim=True)
    scores = sims + (row_min_cand - row_max - 1.0)
    scores.scatter_(1, cand, cand_scores)
    return scores


@torch.no_grad()
def evaluate_retrieval(model, split, tokenizer, *, k: int = 256, score: str = "itm", batch_size: int = 64,
                       rerank_batch: int = 256, image_chunk: int = 64, max_len: int = 30, add_sep: bool = True,
                       topk_backend: str = "auto", faiss_index: str = "flat", precision: str = "auto",
                       device: Optional[torch.device] = None, num_workers: int = 0,
                       keep_matrices: bool = True) -> RetrievalResult:
    """Two-stage retrieval of ``split`` (a :class:`~albef_bal.data.RetrievalSplit`) with
    ``model`` (an ALBEF, pretraining or retrieval kind). Collective when several ranks run:
    every rank must call it. See the module docstring for the algorithm."""
    if score not in SCORES:
        raise ValueError(f"eval.score must be one of {list(SCORES)}, got {score!r}")
    if k < 0:
        raise ValueError(f"eval.k_test must be >= 0, got {k}")
    device = device or next(model.parameters()).device
    amp = autocast_dtype(precision, device)
    was_training = model.training
    model.eval()
    rank = D.get_rank()
    N, T = len(split), split.num_texts
    t0 = time.perf_counter()
    try:
        text_feat, text_tokens, text_mask = encode_texts(model, split.texts, tokenizer, max_len, add_sep,
                                                         batch_size, device, amp)
        substituted: list = []
        my_images, image_tokens, image_feat = encode_images(model, split, batch_size, device, amp, num_workers,
                                                            substituted)
        if D.get_world_size() > 1:
            every: list = [None] * D.get_world_size()
            dist.all_gather_object(every, substituted)
            substituted = [x for part in every for x in part]
        t_encode = time.perf_counter()
        sims = (image_feat.to(device) @ text_feat.float().T).float().cpu()  # [N, T]
        k_i2t, k_t2i = min(k, T), min(k, N)
        cand_i2t = cand_t2i = None
        if k > 0:
            if rank == 0:
                _, cand_i2t = topk_inner_product(image_feat.to(device), text_feat, k_i2t, topk_backend, faiss_index)
                _, cand_t2i = topk_inner_product(text_feat, image_feat.to(device), k_t2i, topk_backend, faiss_index)
                cand_i2t, cand_t2i = cand_i2t.cpu(), cand_t2i.cpu()
            cand_i2t = _broadcast(cand_i2t, (N, k_i2t), torch.long, device)
            cand_t2i = _broadcast(cand_t2i, (T, k_t2i), torch.long, device)
        t_topk = time.perf_counter()
        pairs_fused = 0
        if k > 0:
            codes = torch.cat([(torch.arange(N)[:, None] * T + cand_i2t).flatten(),
                               (cand_t2i * T + torch.arange(T)[:, None]).flatten()]).unique()  # sorted
            mine = torch.isin(codes // T, my_images)
            my_codes = codes[mine]
            my_scores = itm_scores(model, my_codes, T, my_images, image_tokens, text_tokens, text_mask, device,
                                   amp, rerank_batch, image_chunk)
            all_codes = torch.cat(gather_variable(my_codes, device))
            all_scores = torch.cat(gather_variable(my_scores, device))
            pairs_fused = len(all_codes)
        t_rerank = time.perf_counter()
    finally:
        model.train(was_training)

    result = RetrievalResult(metrics={}, k=k, score=score, num_images=N, num_texts=T, pairs_fused=pairs_fused,
                             substituted=sorted(dict(substituted).items()))
    if rank == 0:
        if k == 0:
            s_i2t, s_t2i = sims, sims.T.contiguous()
        else:
            order = all_codes.argsort()
            all_codes, all_scores = all_codes[order], all_scores[order]

            def lookup(c: torch.Tensor) -> torch.Tensor:
                pos = torch.searchsorted(all_codes, c.flatten()).clamp(max=len(all_codes) - 1)
                if not torch.equal(all_codes[pos], c.flatten()):
                    raise RuntimeError("internal error: a candidate pair was not scored by any rank")
                return all_scores[pos].view(c.shape)

            itm_i2t = lookup(torch.arange(N)[:, None] * T + cand_i2t)
            itm_t2i = lookup(cand_t2i * T + torch.arange(T)[:, None])
            if score == "itm+sim":
                itm_i2t = itm_i2t + sims.gather(1, cand_i2t)
                itm_t2i = itm_t2i + sims.T.gather(1, cand_t2i)
            s_i2t = _place(sims, cand_i2t, itm_i2t)
            s_t2i = _place(sims.T.contiguous(), cand_t2i, itm_t2i)
        r_i2t, r_t2i = retrieval_ranks(s_i2t, s_t2i, split.img2txt, split.txt2img)
        result.metrics = recall_from_ranks(r_i2t, r_t2i)
        result.ranks_i2t, result.ranks_t2i = r_i2t, r_t2i
        if keep_matrices:
            result.sims, result.scores_i2t, result.scores_t2i = sims, s_i2t, s_t2i
    if D.get_world_size() > 1:
        box = [result.metrics]
        dist.broadcast_object_list(box, 0)
        result.metrics = box[0]
    t_end = time.perf_counter()
    result.timings = {"encode_s": t_encode - t0, "topk_s": t_topk - t_encode, "rerank_s": t_rerank - t_topk,
                      "total_s": t_end - t0}
    return result
