"""Tiny model configurations and batches shared by the tests (CPU, milliseconds per step)."""
from __future__ import annotations

import torch

from albef_bal.config import Config, load_config

TINY = [
    "model.image_res=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.depth=2",
    "model.vision.heads=2", "model.text.vocab_size=64", "model.text.width=48", "model.text.layers=3",
    "model.text.fusion_layer=1", "model.text.heads=2", "model.text.intermediate=96",
    "model.text.max_position=32", "model.text.pad_token_id=0", "model.text.cls_token_id=1",
    "model.text.sep_token_id=2", "model.text.mask_token_id=3", "model.embed_dim=16",
    "model.queue_size=32", "data.max_len=16",
]
SPECIAL = 4  # ids below this are special tokens in the tiny vocabulary


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def tiny_batch(cfg: Config, batch: int = 4, length: int = 10, seed: int = 0, pad_last: bool = True):
    """Random images and token ids shaped like a tokenised batch: [CLS] words [SEP] [PAD]..."""
    g = torch.Generator().manual_seed(seed)
    res = cfg.model.image_res
    t = cfg.model.text
    images = torch.randn(batch, 3, res, res, generator=g)
    ids = torch.randint(SPECIAL, t.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 0] = t.cls_token_id
    ids[:, -1] = t.sep_token_id
    if pad_last and batch > 1:  # the last text is shorter: [CLS] w w w [SEP] [PAD] ...
        ids[-1, 5] = t.sep_token_id
        ids[-1, 6:] = t.pad_token_id
        mask[-1, 6:] = 0
    return images, ids, mask


class RandomPairs:
    """A data source of random tiny batches whose content is a pure function of
    (seed, epoch, rank, batch index): what the trainer's resume contract asks of real data.
    With ``repeat=True`` every batch is the same one (for "the loss goes down" checks)."""

    def __init__(self, cfg: Config, batches_per_epoch: int = 8, length: int = 10, repeat: bool = False,
                 retrieval: bool = False):
        self.cfg = cfg
        self.batches_per_epoch = batches_per_epoch
        self.length = length
        self.repeat = repeat
        self.retrieval = retrieval

    def batch(self, epoch: int, index: int) -> dict:
        import os
        rank = int(os.environ.get("RANK", 0))
        seed = 0 if self.repeat else (self.cfg.train.seed * 7919 + epoch) * 104729 + rank * 1009 + index
        images, ids, mask = tiny_batch(self.cfg, self.cfg.train.micro_batch_size, self.length, seed=seed)
        out = {"image": images, "input_ids": ids, "attention_mask": mask}
        if self.retrieval:
            out["idx"] = torch.arange(len(ids)) + 100 * rank
        return out

    def loader(self, epoch: int, skip_batches: int):
        for i in range(skip_batches, self.batches_per_epoch):
            yield self.batch(epoch, i)


def export_tiny(out: str, vocab: str, *overrides: str) -> str:
    """A randomly initialised (seed 0) tiny ALBEF with the vocabulary ``vocab`` and captions of
    up to 30 tokens, exported to ``out`` as a checkpoint directory."""
    from albef_bal.checkpoints import export_model
    from albef_bal.data import build_tokenizer, sync_text_config
    from albef_bal.models import ALBEF
    cfg = tiny_config(f"data.tokenizer={vocab}", "data.max_len=30", *overrides)
    sync_text_config(cfg, build_tokenizer(cfg.data.tokenizer))
    torch.manual_seed(0)
    export_model(ALBEF(cfg.model), cfg, out)
    return out


def to_official(model, retrieval: bool = False) -> dict:
    """This project's state dict in the official ALBEF key layout (as ALBEF.pth / mscoco.pth)."""
    out = {}
    for k, v in model.state_dict().items():
        if not retrieval:
            k = k.replace("text_encoder.", "text_encoder.bert.", 1).replace("text_encoder_m.", "text_encoder_m.bert.", 1)
            for suffix in ("", "_m"):
                k = k.replace(f"mlm_head{suffix}.", f"text_encoder{suffix}.cls.predictions.", 1)
        out[k] = v.clone()
    out["temp"] = out["temp"].reshape(())  # ALBEF's temperature is 0-dim
    prefixes = ["text_encoder", "text_encoder_m"] if retrieval else ["text_encoder.bert", "text_encoder_m.bert"]
    for p in prefixes:
        out[f"{p}.embeddings.position_ids"] = torch.arange(model.cfg.text.max_position)[None]
    if not retrieval:
        for s in ("", "_m"):
            emb = out[f"text_encoder{s}.bert.embeddings.word_embeddings.weight"]
            out[f"text_encoder{s}.cls.predictions.decoder.weight"] = emb.clone()
            out[f"text_encoder{s}.cls.predictions.decoder.bias"] = out[f"text_encoder{s}.cls.predictions.bias"].clone()
    return out


# a gallery whose captions a tiny model can learn in seconds: one solid colour per image
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (10, 10, 10)}


def colour_gallery(folder: str, size: int = 32, ext: str = "png", seed: int = 0) -> list[tuple[str, str]]:
    """One noisy solid-colour image per colour in ``folder``: ``[(path, "a <colour> square")]``."""
    import os
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for name, rgb in COLOURS.items():
        pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{name}.{ext}")
        Image.fromarray(pixels).save(path)
        out.append((path, f"a {name} square"))
    return out


def overfit_tiny(out: str, vocab: str, pairs: list[tuple[str, str]], steps: int = 100, *overrides: str) -> str:
    """A tiny ALBEF trained on ``pairs`` (image path, caption) until ITC and ITM tell them apart,
    through the same preprocessing and tokenisation as inference; exported to ``out``."""
    from albef_bal.checkpoints import export_model
    from albef_bal.data import build_tokenizer, sync_text_config
    from albef_bal.inference import ImagePreprocess, TextTokenizer
    from albef_bal.models import ALBEF
    import torch.nn.functional as F
    # no dropout: memorising the pairs should not depend on which masks a seed draws
    cfg = tiny_config(f"data.tokenizer={vocab}", "data.max_len=30", "model.text.init_std=0.1",
                      "model.text.dropout=0.0", "eval.num_workers=0", "eval.precision=fp32", *overrides)
    tok = build_tokenizer(cfg.data.tokenizer)
    sync_text_config(cfg, tok)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    images = ImagePreprocess(cfg.model.image_res).batch([p for p, _ in pairs])
    ids, mask = TextTokenizer(tok, cfg.data.max_len, cfg.data.add_sep, cfg.data.max_words)([c for _, c in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    n = len(pairs)
    target = torch.arange(n)
    # ITM on every (text, image) pair, the n positives weighted as much as the n(n-1) negatives
    text_of, image_of = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    itm_target = (text_of == image_of).long()
    itm_weight = torch.tensor([1.0, n - 1.0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits for a second thread on a busy machine
    try:
        for _ in range(steps):
            it, tt = model.encode_image(images), model.encode_text(ids, mask)
            logits = model.image_feat(it) @ model.text_feat(tt).T / 0.1
            itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            fused = model.fuse(tt[text_of], mask[text_of], it[image_of])
            loss = itc + F.cross_entropy(model.itm_logits(fused), itm_target, weight=itm_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    export_model(model.eval(), cfg, out)
    return out
