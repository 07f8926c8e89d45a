"""Weakening the leading modality's input (data-side balancing; new here).

When the branch scores say one modality leads, the next optimizer step's input of that
modality is made harder for the *online* encoders only, with a strength that grows with the
imbalance; the momentum encoders, and so the ITC and MLM distillation targets and the
queues, see the clean batch. The nearest published relatives act elsewhere: OPM (Wei et al.,
TPAMI 2024) drops the leading modality's *features*; FLIP (Li et al., CVPR 2023) drops image
patch tokens at random to train faster, not to balance.

Strength, from the global batch's branch scores s_v, s_t (``BalanceHooks.global_scores``):

    r = s_lead / s_lag >= 1,   s = max_strength * tanh(beta * max(0, r - 1 - margin))

for the leading modality, 0 for the other (:func:`weaken_strengths`); 0 at equal scores,
continuous, saturating at ``max_strength``. What s means per operation:

- images, ``patch_drop`` (FLIP-style): each image keeps ``P - round(s * P)`` of its P patch
  tokens (at least one), a random subset per image; the online ViT runs on the CLS token and
  the kept patches only, so the step gets cheaper (:func:`patch_keep_indices`);
- images, ``blur``: Gaussian blur with sigma = s * ``blur_sigma`` pixels (:func:`gaussian_blur`);
- images, ``downsample``: down to ``round((1 - s) * R)`` pixels a side (antialiased) and back
  up to R (bilinear) (:func:`down_up_sample`);
- captions, ``mask``: each content word is replaced by [MASK] with probability s;
- captions, ``drop``: each content word is hidden with probability s (attention mask 0; its
  position stays, so MLM labels and distillation targets line up) (:func:`content_word_mask`).

A content word is a vocabulary entry that is not a special token, not punctuation and
not an English function word (:data:`FUNCTION_WORDS`); wordpiece continuations (``##x``)
follow their word. ``stopwords: false`` counts every non-special token.

Training hooks (:class:`WeakenHooks`, below the operations)
-----------------------------------------------------------

- ``loss``: records the micro batch's branch scores (``record_scores``).
- ``before_step``: the global batch's scores (every micro step of every rank) give the
  strengths for the *next* optimizer step, identical on every rank.
- ``before_forward``: weakens the leading modality of each micro batch of that step into the
  batch's ``"online"`` inputs. Its randomness comes from a generator seeded by (run seed,
  step, micro step * world size + rank): a resumed run draws the same, and 1 rank x 4
  accumulation steps draws what 2 ranks x 2 steps draw for the same global micro batch
  (the global training RNG is not touched).

``constant: [s_v, s_t]`` fixes the strengths instead (an ablation control: the same input
weakening, both modalities at once if both are positive, without the balancing decision).

The scores are measured on the weakened batch, so weakening the leader lowers its score and
with it the next strength (a feedback loop that settles where the weakened leader and the
laggard score alike); the strengths and scores are logged (``weaken/*``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed as D
from ..config import ConfigError
from ..engine.hooks import StepContext
from .common import BalanceHooks

# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries,
# quantifiers): never weakened, as they carry little of what the image shows
FUNCTION_WORDS = frozenset("""
a an the this that these those there here it its it's they them their he she his her him we us our
you your i me my of in on at to from by with without for about above below under over into onto off
out up down near next behind between beside besides through across around along among against
and or but nor so yet if than then as while because
is are was were be been being am do does did has have had will would can could shall should may
might must not no yes some any each every all both either neither many much more most few several
other another such very too also just only again once own same which who whom whose what when where
why how one
""".split())


def weaken_strengths(score_v: float, score_t: float, max_strength: float, beta: float,
                     margin: float = 0.0) -> tuple[float, float]:
    """``(strength_v, strength_t)``: ``max_strength * tanh(beta * max(0, r - 1 - margin))`` for
    the modality with the higher score, ``r = s_lead / s_lag``, and 0 for the other. Equal
    scores, two zero scores or a NaN give (0, 0); a zero laggard with a positive leader gives
    the leader ``max_strength``."""
    if not (0.0 <= max_strength <= 1.0) or beta < 0 or margin < 0:
        raise ValueError(f"need 0 <= max_strength <= 1, beta >= 0, margin >= 0; got {max_strength}, {beta}, {margin}")
    s_v, s_t = float(score_v), float(score_t)
    if math.isnan(s_v) or math.isnan(s_t) or s_v == s_t:
        return 0.0, 0.0
    lead, lag = max(s_v, s_t), min(s_v, s_t)
    r = math.inf if lag <= 0 else lead / lag
    s = max_strength * math.tanh(beta * max(0.0, r - 1.0 - margin))
    return (s, 0.0) if s_v > s_t else (0.0, s)


def patch_keep_indices(batch: int, num_patches: int, drop: float, generator: torch.Generator,
                       device=None) -> torch.Tensor:
    """[batch, K] indices of the patches each image keeps, ``K = num_patches -
    round(drop * num_patches)`` (at least 1), a uniformly random subset per image in
    increasing order."""
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"drop must be in [0, 1], got {drop}")
    keep = max(1, num_patches - int(round(drop * num_patches)))
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)[:, :keep]
    return order.sort(dim=1).values.to(device)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] images with ``sigma`` pixels (kernel radius
    ceil(3 sigma), reflected borders); sigma <= 0 returns the images unchanged."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def down_up_sample(images: torch.Tensor, strength: float) -> torch.Tensor:
    """[B, C, R, R] images down-sampled to ``round((1 - strength) * R)`` pixels a side
    (antialiased bilinear, at least 1) and back up to R (bilinear): the detail of a smaller
    image at the model's resolution. ``strength`` 0 returns the images unchanged."""
    if strength <= 0:
        return images
    h, w = images.shape[-2:]
    small = (max(1, round((1.0 - strength) * h)), max(1, round((1.0 - strength) * w)))
    if small == (h, w):
        return images
    down = F.interpolate(images, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def content_token_tables(vocab: dict[str, int], special_ids: Sequence[int], stopwords: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """From a wordpiece vocabulary: ``(content [V] bool, continuation [V] bool)``. A token is
    content unless it is special, punctuation only, or (``stopwords``) a function word;
    ``##`` pieces are continuations (they follow the word they belong to)."""
    size = max(vocab.values()) + 1
    content = torch.zeros(size, dtype=torch.bool)
    cont = torch.zeros(size, dtype=torch.bool)
    special = set(int(i) for i in special_ids)
    for token, i in vocab.items():
        if token.startswith("##"):
            cont[i] = True
            continue
        if i in special or (token.startswith("[") and token.endswith("]")):
            continue
        if not any(ch.isalnum() for ch in token):
            continue
        if stopwords and token.lower() in FUNCTION_WORDS:
            continue
        content[i] = True
    return content, cont


def content_word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, content: torch.Tensor,
                      continuation: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """[B, L] bool: the positions of the content words chosen for weakening, each word (its
    first piece and the ``##`` pieces after it) with probability ``prob``; never a padded
    position or a non-content word. Ids beyond the tables count as non-content."""
    ids = input_ids.detach().cpu()
    in_vocab = ids < content.numel()
    safe = ids.clamp(max=content.numel() - 1)
    is_cont = continuation[safe] & in_vocab
    is_content = content[safe] & in_vocab
    # word index of every position: a new word starts at every non-continuation token
    word = torch.cumsum((~is_cont).long(), dim=1) - 1
    draw = torch.rand(ids.shape, generator=generator) < prob  # one draw per word start
    chosen_start = (draw & is_content & ~is_cont).long()
    # by word index: whether the word's first token was chosen; every piece of the word
    # (its ``##`` continuations) then follows that decision
    per_word = torch.zeros_like(chosen_start).scatter_reduce(1, word, chosen_start, reduce="amax")
    chosen = torch.gather(per_word, 1, word).bool()
    return (chosen & (attention_mask.detach().cpu() > 0)).to(input_ids.device)


# ------------------------------------------------------------------ training hooks
class WeakenHooks(BalanceHooks):
    name = "weaken"

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.wcfg = w = trainer.cfg.balance.weaken
        self.world = max(1, trainer.world)
        self.rank = trainer.rank
        self.strength = {"vision": 0.0, "text": 0.0}
        self._hidden = torch.zeros(2, dtype=torch.float64)  # caption tokens weakened / attended, since the last log
        if w.constant is not None:  # ablation: fixed strengths from the first step on
            self.strength = {"vision": float(w.constant[0]), "text": float(w.constant[1])}
        vit = self.module.visual_encoder
        if w.image == "patch_drop":
            if trainer.cfg.model.vision.backbone != "vit":
                raise ConfigError("balance.weaken.image=patch_drop needs the built-in ViT "
                                  f"(model.vision.backbone='vit'), not '{trainer.cfg.model.vision.backbone}'")
            self.patch_size = vit.patch_embed.patch_size
        t = trainer.cfg.model.text
        self.mask_token_id = t.mask_token_id
        special = (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id)
        self.content, self.continuation = self._tables(trainer.cfg, special)

    def _tables(self, cfg, special) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.wcfg.stopwords:  # every non-special token is a word of its own
            v = cfg.model.text.vocab_size
            content = torch.ones(v, dtype=torch.bool)
            content[list(special)] = False
            return content, torch.zeros(v, dtype=torch.bool)
        from ..data import build_tokenizer
        try:
            vocab = build_tokenizer(cfg.data.tokenizer).vocab()
        except Exception as e:  # noqa: BLE001 -- any loader failure is a config problem here
            raise ConfigError(f"balance.weaken.stopwords=true reads the vocabulary of data.tokenizer="
                              f"{cfg.data.tokenizer!r}: {e} (or set balance.weaken.stopwords=false)") from None
        return content_token_tables(vocab, special, stopwords=True)

    # ------------------------------------------------------------ the decision
    def loss(self, out, ctx: StepContext) -> torch.Tensor:
        self.record_scores(out, ctx)
        return super().loss(out, ctx)

    def before_step(self, ctx: StepContext) -> None:
        w = self.wcfg
        if w.constant is not None:
            st_v, st_t = float(w.constant[0]), float(w.constant[1])
        else:
            s_v, s_t = self.global_scores()  # collective: every rank decides alike
            if self.trainer.window_skipped:
                st_v, st_t = 0.0, 0.0  # no trustworthy scores this window
            else:
                st_v, st_t = weaken_strengths(s_v, s_t, w.max_strength, w.beta, w.margin)
        self.strength = {"vision": st_v, "text": st_t}
        self.means.add(**{"weaken/strength_v": st_v, "weaken/strength_t": st_t})

    # -------------------------------------------------------------- the inputs
    def _generator(self, ctx: StepContext) -> torch.Generator:
        g = torch.Generator()
        index = ctx.micro * self.world + self.rank  # the global micro batch of this step
        g.manual_seed(((self.cfg.train.seed * 1_000_003 + ctx.step) * 1_009 + index) % (2 ** 63))
        return g

    @torch.no_grad()
    def before_forward(self, batch: dict, ctx: StepContext) -> dict:
        s_v, s_t = self.strength["vision"], self.strength["text"]
        if s_v <= 0 and s_t <= 0:
            return batch
        gen = self._generator(ctx)
        online = dict(batch.get("online") or {})
        image = batch["image"]
        if s_v > 0:
            kind = self.wcfg.image
            if kind == "patch_drop":
                patches = (image.shape[-2] // self.patch_size) * (image.shape[-1] // self.patch_size)
                online["patch_keep"] = patch_keep_indices(image.shape[0], patches, s_v, gen, image.device)
            elif kind == "blur":
                online["image"] = gaussian_blur(image, s_v * self.wcfg.blur_sigma)
            else:
                online["image"] = down_up_sample(image, s_v)
        if s_t > 0:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            chosen = content_word_mask(ids, mask, self.content, self.continuation, s_t, gen)
            if self.wcfg.text == "mask":
                online["input_ids"] = ids.masked_fill(chosen, self.mask_token_id)
            else:
                online["attention_mask"] = mask.masked_fill(chosen, 0)
            self._hidden += torch.stack([chosen.sum(), (mask > 0).sum()]).double().cpu()
        return {**batch, "online": online}

    def metrics(self) -> dict:
        out = super().metrics()
        counts = self._hidden.clone()
        if D.get_world_size() > 1:  # every rank's micro batches (metrics() runs on every rank)
            counts = counts.to(self.device)
            dist.all_reduce(counts)
        if counts[0] > 0:
            out["weaken/words_hidden"] = float(counts[0] / counts[1].clamp_min(1.0))
        self._hidden.zero_()
        return out

    def state_dict(self) -> dict:
        return {"strength": dict(self.strength)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.strength = dict(state.get("strength", self.strength))
