"""ALBEF: align (ITC) before fusing (ITM, MLM), with momentum distillation.

One class serves pretraining and retrieval fine-tuning (``model.retrieval``): the
retrieval model has an image-id queue, treats same-id pairs as ITC positives and as
forbidden ITM negatives, and has no MLM head.

The forward runs, per batch of B pairs:
  - online image pass; one online text pass over [text ; masked text] (2B);
  - momentum image pass; one momentum text pass over [text ; masked text];
  - ITC against [momentum batch ; queue], distilled from the momentum logits;
  - one fusion pass over 4B pairs: ITM positives, ITM negatives both ways, MLM;
  - MLM heads on the masked positions only (the 30k-way softmax on ~15% of tokens);
  - with ``model.unimodal`` on, last, the unimodal losses (models/unimodal.py): a second
    image view through the online image encoder, and either the unimodal MLM head on the
    text-only states of the masked caption or a second dropout pass of the caption.
Mathematically this is ALBEF's forward; the batching only saves passes. With every
unimodal loss off nothing of that last part exists (no parameters, no work, no random
draws), and with one on everything before it is computed exactly as without it.

Public feature API (evaluation, retrieval indexes, balancing methods):
``encode_image``, ``encode_text``, ``image_feat``, ``text_feat``, ``fuse``, ``itm_head``,
``mlm_head``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .. import distributed as D
from ..losses import (clamp_temperature, itc_positive_mask, itc_targets, mask_tokens, mlm_loss,
                      positive_score, sample_hard_negatives, soft_cross_entropy)
from .text import MLMHead, TextEncoder
from .unimodal import augment_view, build_image_head, build_text_head, view_generator
from .vit import build_vision_encoder

# A branch hook sees each online branch output (``"vision"``: image tokens, ``"text"``: text
# tokens) and returns the tensor to use instead; balancing methods use it for gradient
# scaling identities. It must be an identity in the forward direction.
log = logging.getLogger("albef_bal")

BranchHook = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class ALBEFOutput:
    """Separate losses, the per-branch ITC halves and branch scores, and cheap metrics."""
    loss_itc: torch.Tensor
    loss_i2t: torch.Tensor  # image-to-text half: gradient reaches the vision branch only
    loss_t2i: torch.Tensor  # text-to-image half: gradient reaches the text branch only
    loss_itm: torch.Tensor
    loss_mlm: Optional[torch.Tensor]  # None for the retrieval model
    score_v: torch.Tensor  # mean softmax probability of the positive, image-to-text
    score_t: torch.Tensor  # same, text-to-image
    metrics: dict = field(default_factory=dict)
    # unimodal feature-space losses (model.unimodal); None when off. Each one's gradient
    # reaches only its own branch and its head
    loss_uni_image: Optional[torch.Tensor] = None
    loss_uni_text: Optional[torch.Tensor] = None

    def total(self, itc: float = 1.0, itm: float = 1.0, mlm: float = 1.0, uni_image: float = 1.0,
              uni_text: float = 1.0) -> torch.Tensor:
        loss = itc * self.loss_itc + itm * self.loss_itm
        if self.loss_mlm is not None:
            loss = loss + mlm * self.loss_mlm
        if self.loss_uni_image is None and self.loss_uni_text is None:
            return loss
        return loss + self.unimodal(uni_image, uni_text)

    def unimodal(self, uni_image: float = 1.0, uni_text: float = 1.0):
        """The weighted unimodal losses that are on (0 when none is)."""
        loss = 0.0
        if self.loss_uni_image is not None:
            loss = loss + uni_image * self.loss_uni_image
        if self.loss_uni_text is not None:
            loss = loss + uni_text * self.loss_uni_text
        return loss

    def multimodal(self) -> torch.Tensor:
        """ITM + MLM: the losses that reach both branches through the fusion layers."""
        return self.loss_itm if self.loss_mlm is None else self.loss_itm + self.loss_mlm

    def scalars(self) -> dict[str, float]:
        out = {k: float(getattr(self, k).detach()) for k in
               ("loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "score_v", "score_t")}
        for k in ("loss_mlm", "loss_uni_image", "loss_uni_text"):
            if getattr(self, k) is not None:
                out[k] = float(getattr(self, k).detach())
        out.update({k: float(v.detach()) for k, v in self.metrics.items()})
        return out


class ALBEF(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.text.check_token_ids()
        self.cfg = cfg
        t = cfg.text
        self.retrieval = cfg.retrieval
        self.visual_encoder = build_vision_encoder(cfg.image_res, cfg.vision)
        vision_width = self.visual_encoder.num_features
        self.text_encoder = TextEncoder(t, encoder_width=vision_width)
        self.vision_proj = nn.Linear(vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.width, cfg.embed_dim)
        self.itm_head = nn.Linear(t.width, 2)
        # shape [1], not 0-dim: deepspeed.initialize rejects 0-dim parameters
        self.temp = nn.Parameter(torch.full([1], float(cfg.temp)))
        self.mlm_head = None if cfg.retrieval else MLMHead(
            self.text_encoder.embeddings.word_embeddings, t.layer_norm_eps, t.init_std)

        # momentum copies: same architecture, EMA of the online weights, never trained
        self.visual_encoder_m = build_vision_encoder(cfg.image_res, cfg.vision)
        self.text_encoder_m = TextEncoder(t, encoder_width=vision_width)
        self.vision_proj_m = nn.Linear(vision_width, cfg.embed_dim)
        self.text_proj_m = nn.Linear(t.width, cfg.embed_dim)
        self.mlm_head_m = None if cfg.retrieval else MLMHead(
            self.text_encoder_m.embeddings.word_embeddings, t.layer_norm_eps, t.init_std)
        self.copy_params()

        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if cfg.retrieval:
            self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        # unimodal heads, built last and on a forked RNG: every other weight, the queues and
        # the random stream after construction are those of a model without them
        u = cfg.unimodal
        with torch.random.fork_rng(devices=[]):
            self.uni_image_head = build_image_head(u, vision_width)
            self.uni_text_head = build_text_head(u, t.width, self.text_encoder.embeddings.word_embeddings,
                                                 t.layer_norm_eps, t.init_std)
        self.branch_hook: Optional[BranchHook] = None
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # ----------------------------------------------------------------- structure
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                 (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]
        if self.mlm_head is not None:
            pairs.append((self.mlm_head, self.mlm_head_m))
        return pairs

    def branch_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by role (DESIGN.md section 4): ``vision`` = the image encoder;
        ``text`` = text embeddings + text-only layers; ``shared`` = fusion layers, projections,
        ITM/MLM heads and the temperature. A unimodal head (``model.unimodal``) belongs to the
        branch whose features it reads. Momentum copies are not trainable and not listed."""
        text_prefixes = ("text_encoder.embeddings.", "uni_text_head.") + tuple(
            f"text_encoder.encoder.layer.{i}." for i in range(self.text_encoder.fusion_layer))
        groups: dict[str, list] = {"vision": [], "text": [], "shared": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(("visual_encoder.", "uni_image_head.")):
                groups["vision"].append((name, p))
            elif name.startswith(text_prefixes):
                groups["text"].append((name, p))
            else:
                groups["shared"].append((name, p))
        return groups

    def _param_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online, momentum = [], []
        for a, b in self.momentum_pairs():
            for p, p_m in zip(a.parameters(), b.parameters()):
                online.append(p)
                momentum.append(p_m)
        return online, momentum

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum weights := online weights (at construction and after loading)."""
        online, momentum = self._param_pairs()
        for p, p_m in zip(online, momentum):
            p_m.data.copy_(p.data)
            p_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta, over every momentum pair."""
        m = self.cfg.momentum
        online, momentum = self._param_pairs()
        same = all(p.dtype == p_m.dtype and p.device == p_m.device for p, p_m in zip(online, momentum))
        # lerp: theta_m + (1 - m) (theta - theta_m), one pass over both lists
        if same:
            torch._foreach_lerp_(momentum, online, 1.0 - m)
        else:
            for p, p_m in zip(online, momentum):
                p_m.lerp_(p.to(p_m.dtype), 1.0 - m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                            idx: Optional[torch.Tensor] = None) -> None:
        """Write the momentum features of every rank into the queues at the pointer.

        With several ranks the features are gathered in the background and written when the
        queues are next needed (:meth:`flush_queues`: the next forward, ``state_dict``,
        ``load_state_dict``), so that a rank does not wait here for the others in the middle
        of its forward; the queues' contents at every use are those of an immediate write.
        Code that reads the queue buffers directly between a multi-rank training forward and
        the next one calls :meth:`flush_queues` first. With one process the write is
        immediate. The pointer is used where it lives (on the device): the columns to write
        are an index tensor, so the step never waits for the device to read it back."""
        self.flush_queues()
        n = image_feat.shape[0] * D.get_world_size()
        q = self.cfg.queue_size
        if q % n:
            raise ValueError(f"model.queue_size ({q}) must be a multiple of the global micro batch "
                             f"(micro batch x ranks = {n})")
        # one gather for both modalities (one collective instead of two)
        feats = D.PendingGather(torch.cat([image_feat, text_feat.to(image_feat.dtype)], dim=1))
        ids = D.PendingGather(idx.view(-1)) if self.retrieval else None
        self._pending_queue_write = (image_feat.shape[1], feats, ids)
        if D.get_world_size() == 1:
            self.flush_queues()

    @torch.no_grad()
    def flush_queues(self) -> None:
        """Complete a queue write that :meth:`dequeue_and_enqueue` left in flight (no-op if none)."""
        pending = self.__dict__.pop("_pending_queue_write", None)
        if pending is None:
            return
        e, feats, ids = pending
        feats = feats.wait()
        image_feats, text_feats = feats[:, :e], feats[:, e:]
        n = feats.shape[0]
        # the pointer is a multiple of n and q a multiple of n: the n columns never wrap
        cols = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)
        # a non-finite feature (a batch whose loss will be skipped) must not poison the queue
        # for the next 65k steps: keep the old entries in its place
        ok = (torch.isfinite(image_feats).all(1) & torch.isfinite(text_feats).all(1))[None, :]
        for queue, new in ((self.image_queue, image_feats), (self.text_queue, text_feats)):
            queue.index_copy_(1, cols, torch.where(ok, new.T, queue.index_select(1, cols)).to(queue.dtype))
        if ids is not None:
            self.idx_queue.index_copy_(1, cols, ids.wait().view(1, -1).to(self.idx_queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.cfg.queue_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush_queues()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.flush_queues()  # or the write in flight would land on the loaded queues
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for enc in (self.visual_encoder, self.text_encoder):
            enc.set_grad_checkpointing(enable)

    def compile_layers(self, **kwargs) -> None:
        """``torch.compile`` every transformer layer in place (online and momentum encoders).

        Layers, not the whole forward: the forward has data-dependent steps (hard-negative
        sampling, the masked-position gather, the queue pointer) that would break a whole-model
        graph, while the layers are where the time goes. ``nn.Module.compile`` keeps the
        module tree, so parameter and checkpoint names do not change."""
        for enc in (self.visual_encoder, self.visual_encoder_m):
            for blk in getattr(enc, "blocks", []):
                blk.compile(**kwargs)
        for enc in (self.text_encoder, self.text_encoder_m):
            for layer in enc.encoder.layer:
                layer.compile(**kwargs)

    def temperature(self) -> torch.Tensor:
        return clamp_temperature(self.temp)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the temperature parameter itself (call after optimizer steps)."""
        self.temp.clamp_(0.001, 0.5)

    # ------------------------------------------------------------ feature API
    def _hook(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        return x if self.branch_hook is None else self.branch_hook(branch, x)

    def encode_image(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image tokens [B, 1 + P, Dv] (CLS first); with ``keep`` [B, K] only the CLS token and
        those patches pass the encoder ([B, 1 + K, Dv]; the built-in ViT only)."""
        if keep is None:
            return self._hook("vision", self.visual_encoder.forward_features(images))
        if self.cfg.vision.backbone != "vit":
            raise ValueError(f"patch-token dropout needs the built-in ViT (model.vision.backbone='vit'), "
                             f"not '{self.cfg.vision.backbone}'")
        return self._hook("vision", self.visual_encoder.forward_features(images, keep))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text tokens [B, L, Dt] from the text-only layers."""
        return self._hook("text", self.text_encoder.forward_text(input_ids, attention_mask))

    def image_feat(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of the image CLS token [B, embed_dim]."""
        return F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)

    def text_feat(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of the text CLS token [B, embed_dim]."""
        return F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)

    def fuse(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
             image_mask: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fusion layers (cross-attention to the image tokens) -> fused tokens [B, L, Dt].
        With ``image_index`` [B], text row i attends to ``image_tokens[image_index[i]]``."""
        return self.text_encoder.forward_fusion(text_tokens, attention_mask, image_tokens, image_mask, image_index)

    def itm_logits(self, fused_tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (index 1 = match) from the fused CLS token."""
        return self.itm_head(fused_tokens[:, 0])

    # ---------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float = 0.0, idx: Optional[torch.Tensor] = None, update: bool = True,
                online: Optional[dict] = None, use_queue: bool = True) -> ALBEFOutput:
        """Losses of one batch.

        ``idx`` (image ids, [B]) is required by the retrieval model; in pretraining it is
        optional and only keeps same-image pairs out of the ITM negatives. ``update=False``
        leaves the momentum weights and the queues untouched (held-out loss measurements);
        ``use_queue=False`` scores ITC against the batch's momentum features only, so that a
        measurement does not depend on what the queue holds.

        ``online`` replaces inputs of the *online* encoders only (data-side balancing); the
        momentum passes, and so the ITC and MLM distillation targets and the queues, see the
        clean ``image`` / ``input_ids`` / ``attention_mask``. Keys, each optional:
        ``image`` (same shape as ``image``), ``patch_keep`` ([B, K] patch indices the online
        ViT keeps), ``input_ids`` and ``attention_mask`` (same shape as the clean ones; the
        MLM labels and masking positions come from the clean ids, and a position whose online
        id differs from the clean one keeps the online id in the masked copy too).
        """
        cfg = self.cfg
        if self.retrieval and idx is None:
            raise ValueError("the retrieval model needs image ids (idx) for every pair")
        self.flush_queues()  # the previous step's queue write, if still in flight
        B = image.shape[0]
        online = _check_online(online, image, input_ids)
        image_on = online.get("image", image)
        ids_on = online.get("input_ids", input_ids)
        mask_on = online.get("attention_mask", attention_mask)
        temp = self.temperature()
        distill = cfg.distill

        if self.mlm_head is not None:
            t = cfg.text
            masked_ids, labels = mask_tokens(input_ids, t.vocab_size, t.mask_token_id,
                                             (t.pad_token_id, t.cls_token_id, t.sep_token_id),
                                             cfg.mlm_probability)
            ids_both = torch.cat([input_ids, masked_ids])
            mask_both = torch.cat([attention_mask, attention_mask])
            if ids_on is not input_ids or mask_on is not attention_mask:
                # the online copy: weakened positions stay weakened in the masked text too
                masked_on = torch.where(ids_on != input_ids, ids_on, masked_ids)
                ids_both_on, mask_both_on = torch.cat([ids_on, masked_on]), torch.cat([mask_on, mask_on])
            else:
                ids_both_on, mask_both_on = ids_both, mask_both
        else:
            ids_both, mask_both = input_ids, attention_mask
            ids_both_on, mask_both_on = ids_on, mask_on

        # ---- online unimodal passes
        image_tokens = self.encode_image(image_on, online.get("patch_keep"))
        image_feat = self.image_feat(image_tokens)
        text_tokens_both = self.encode_text(ids_both_on, mask_both_on)
        text_tokens = text_tokens_both[:B]
        text_feat = self.text_feat(text_tokens)

        # ---- momentum passes (no gradient)
        with torch.no_grad():
            if update:
                self.momentum_update()
            image_tokens_m = self.visual_encoder_m.forward_features(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_tokens_m[:, 0]), dim=-1)
            text_tokens_m_both = self.text_encoder_m.forward_text(ids_both, mask_both)
            text_feat_m = F.normalize(self.text_proj_m(text_tokens_m_both[:B, 0]), dim=-1)
            if use_queue:
                # cat copies: the queues may be overwritten below while these are still in use
                image_feat_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)
                text_feat_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
                queue_len, idx_queue = cfg.queue_size, self.idx_queue if self.retrieval else None
            else:
                image_feat_all, text_feat_all = image_feat_m.t(), text_feat_m.t()
                queue_len, idx_queue = 0, self.idx_queue[:, :0] if self.retrieval else None
            pos = itc_positive_mask(B, queue_len, idx if self.retrieval else None, idx_queue, device=image.device)
            if distill:
                i2t_targets = itc_targets(pos, image_feat_m @ text_feat_all / temp, alpha)
                t2i_targets = itc_targets(pos, text_feat_m @ image_feat_all / temp, alpha)
            else:
                i2t_targets = t2i_targets = itc_targets(pos, None, alpha)

        # ---- ITC: each half trains one branch (the other side is momentum + queue)
        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        loss_i2t = soft_cross_entropy(sim_i2t, i2t_targets)
        loss_t2i = soft_cross_entropy(sim_t2i, t2i_targets)
        score_v = positive_score(sim_i2t.detach(), pos)
        score_t = positive_score(sim_t2i.detach(), pos)
        if update:
            self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        # ---- ITM hard negatives from the in-batch similarities
        with torch.no_grad():
            if idx is not None:
                exclude = torch.eq(idx.view(-1, 1), idx.view(1, -1))
            else:
                exclude = torch.eye(B, dtype=torch.bool, device=image.device)
            neg_image, valid_t = sample_hard_negatives(sim_t2i[:, :B].detach(), exclude)  # for each text
            neg_text, valid_i = sample_hard_negatives(sim_i2t[:, :B].detach(), exclude)  # for each image

        # ---- one fusion pass: [pos ; text+neg image ; neg text+image ; masked text+image].
        # The images are not copied: every sequence names its image by index, and each
        # fusion layer projects the B images' keys/values once and gathers them (3-4x fewer
        # key/value FLOPs than projecting the gathered images, the same numbers).
        arange = torch.arange(B, device=image.device)
        text_in = [text_tokens, text_tokens, text_tokens[neg_text]]
        mask_in = [mask_on, mask_on, mask_on[neg_text]]
        image_index = [arange, neg_image, arange]
        if self.mlm_head is not None:
            text_in.append(text_tokens_both[B:])
            mask_in.append(mask_on)
            image_index.append(arange)
        fused = self.fuse(torch.cat(text_in), torch.cat(mask_in), image_tokens, image_index=torch.cat(image_index))

        itm_logits = self.itm_logits(fused[:3 * B])
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=image.device),
                                torch.zeros(2 * B, dtype=torch.long, device=image.device)])
        has_neg = torch.cat([valid_t, valid_i])
        weights = torch.cat([torch.ones(B, device=image.device), has_neg.float()])
        per_pair = F.cross_entropy(itm_logits.float(), itm_labels, reduction="none")
        # a batch of one (or of one image id) has no negative pair: then the loss is zero with
        # a zero gradient. Decided by a multiplication on the device, not by a host branch
        # (x * 1 is x exactly, so batches with negatives are unchanged)
        loss_itm = (per_pair * weights).sum() / weights.sum() * has_neg.any()
        metrics = {"itm_acc": (itm_logits.detach().argmax(1) == itm_labels).float().mean(),
                   "temp": temp.detach().squeeze()}

        # ---- MLM on the masked positions, distilled from the momentum model
        loss_mlm = None
        if self.mlm_head is not None:
            # flat positions of the masked tokens: the step's one unavoidable device-to-host
            # read (their number sizes the MLM head's input); gathered by index from here on
            where = (labels.view(-1) != -100).nonzero().squeeze(1)
            if where.numel():
                width = fused.shape[-1]
                logits = self.mlm_head(fused[3 * B:].reshape(-1, width).index_select(0, where))
                targets = labels.view(-1).index_select(0, where)
                soft = None
                if distill:
                    with torch.no_grad():
                        fused_m = self.text_encoder_m.forward_fusion(text_tokens_m_both[B:], attention_mask,
                                                                     image_tokens_m)
                        hidden_m = fused_m.reshape(-1, fused_m.shape[-1]).index_select(0, where)
                        soft = F.softmax(self.mlm_head_m(hidden_m).float(), dim=-1)
                loss_mlm = mlm_loss(logits, targets, soft, alpha)
                metrics["mlm_acc"] = (logits.detach().argmax(1) == targets).float().mean()
            else:  # nothing was selected for masking (very short texts)
                loss_mlm = fused[3 * B:, 0].sum() * 0.0

        # ---- unimodal losses, after everything else: with them on, the losses above are the
        # same numbers as without them (same masks, negatives and dropout)
        loss_uni_image = loss_uni_text = None
        if self.uni_image_head is not None:
            loss_uni_image = self._uni_image_loss(image, image_tokens)
        if self.uni_text_head is not None:
            loss_uni_text = self._uni_text_loss(input_ids, attention_mask, text_tokens_both,
                                                labels if self.mlm_head is not None else None, metrics)

        return ALBEFOutput(loss_itc=(loss_i2t + loss_t2i) / 2, loss_i2t=loss_i2t, loss_t2i=loss_t2i,
                           loss_itm=loss_itm, loss_mlm=loss_mlm, score_v=score_v, score_t=score_t,
                           metrics=metrics, loss_uni_image=loss_uni_image, loss_uni_text=loss_uni_text)

    # ------------------------------------------------------------- unimodal losses
    def _uni_image_loss(self, image: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """SimSiam / SimCLR between two views of each image (the clean image, whose tokens
        the forward already has, and an augmented one; or two augmented ones)."""
        u = self.cfg.unimodal
        if image.shape[0] < 2:  # batch-norm statistics (and contrastive negatives) need two samples
            return image_tokens[:, 0].sum() * 0.0
        gen = view_generator(image.device)
        view2 = augment_view(image, u.augment, gen)
        if u.views == "aug+aug":
            h1 = self.encode_image(augment_view(image, u.augment, gen))[:, 0]
        else:
            h1 = image_tokens[:, 0]
        h2 = self.encode_image(view2)[:, 0]
        return self.uni_image_head.loss(h1, h2)

    def _uni_text_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       text_tokens_both: torch.Tensor, labels: Optional[torch.Tensor], metrics: dict) -> torch.Tensor:
        """MLM on the text-only states of the masked caption (already computed), or SimCSE
        between the forward's text pass and a second pass of the same caption."""
        B = input_ids.shape[0]
        if self.cfg.unimodal.text == "mlm":
            sel = labels != -100
            if not sel.any():
                return text_tokens_both[B:, 0].sum() * 0.0
            logits = self.uni_text_head(text_tokens_both[B:][sel])
            metrics["uni_mlm_acc"] = (logits.detach().argmax(1) == labels[sel]).float().mean()
            return F.cross_entropy(logits.float(), labels[sel])
        h2 = self.encode_text(input_ids, attention_mask)[:, 0]  # new dropout masks
        return self.uni_text_head.loss(text_tokens_both[:B, 0], h2)


ONLINE_KEYS = ("image", "patch_keep", "input_ids", "attention_mask")


def _check_online(online: Optional[dict], image: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """``online`` as a dict, its keys and shapes checked against the clean batch."""
    if not online:
        return {}
    unknown = sorted(set(online) - set(ONLINE_KEYS))
    if unknown:
        raise ValueError(f"online inputs: unknown key(s) {unknown}; expected some of {list(ONLINE_KEYS)}")
    for key, ref in (("image", image), ("input_ids", input_ids), ("attention_mask", input_ids)):
        if key in online and online[key].shape != ref.shape:
            raise ValueError(f"online {key} has shape {tuple(online[key].shape)}, the clean batch "
                             f"{tuple(ref.shape)}")
    keep = online.get("patch_keep")
    if keep is not None and (keep.dim() != 2 or keep.shape[0] != image.shape[0]):
        raise ValueError(f"online patch_keep must be [B={image.shape[0]}, K], got {tuple(keep.shape)}")
    return online


def prepare_for_training(model: ALBEF, train) -> ALBEF:
    """Apply the ``train`` section's speed switches to a built model before the optimizer
    and the engine see it: ``torch.compile`` of the layers (off by default; parameter names
    unchanged). Activation checkpointing is ``model.grad_checkpointing``, applied at build."""
    if train.compile:
        model.compile_layers()
    return model


def build_model(cfg: ModelConfig) -> ALBEF:
    """ALBEF from ``model`` config, with ``init_text`` (HF BERT directory) and ``init_vision``
    (timm/DeiT/ALBEF ViT weights) loaded when set; the load reports go to the log."""
    from ..checkpoints import check_text_fits, load_hf_bert, load_vision_weights
    model = ALBEF(cfg)
    if cfg.init_text:
        check_text_fits(cfg.text, cfg.init_text)
        log.info("text encoder from %s: %s", cfg.init_text, load_hf_bert(model, cfg.init_text))
    if cfg.init_vision:
        log.info("image encoder from %s: %s", cfg.init_vision, load_vision_weights(model, cfg.init_vision))
    return model
