#!/usr/bin/env python
"""This project's training step against the official ALBEF implementation's, side by side in
one process (steps alternated), at the same size, batch and threads.

    python bench/official_step.py --albef PATH [--size bench-small] [--batch 16] [--threads 2]
        [--steps 12] [--warmup 3] [--set KEY=VALUE ...]

PATH is a checkout of the official code (github.com/salesforce/ALBEF, commit b9727e4 was
used; nothing of it is copied here). It was written for transformers 4.8 and timm 0.4, which
this environment does not have, so run it with an overlay of old packages first on the path:

    pip install --target /tmp/albef_official_pkgs --no-deps transformers==4.30.2 \\
        tokenizers==0.13.3 huggingface_hub==0.16.4 requests urllib3 idna charset_normalizer certifi
    PYTHONPATH=/tmp/albef_official_pkgs python bench/official_step.py --albef PATH

What is adapted, and why (none of it changes the arithmetic of a step):
- timm: the official ``models/vit.py`` imports four names from timm 0.4 (``PatchEmbed``,
  ``_cfg``, ``register_model``, ``trunc_normal_``, ``DropPath``); timm imports torchvision,
  which has no build for this torch, so a stand-in package with those names (a strided
  convolution, a dict, an identity decorator, torch's ``trunc_normal_``, stochastic depth) is
  written to a temporary directory;
- transformers 4.30 renamed an argument of a docstring decorator that ``models/xbert.py``
  uses: the decorator is replaced by the identity;
- the official ``ALBEF`` hard-codes ViT-B/16 and loads ``bert-base-uncased`` and DeiT
  weights from the internet: the ViT is built at the ``--size`` widths, BERT from its config,
  no weights are loaded (random initialisation: the cost of a step does not depend on it);
- a one-process gloo group is started (the official queue update all-gathers);
- the step is the official ``Pretrain.py`` step: forward (ITC + ITM + MLM, alpha 0.4),
  ``loss_mlm + loss_ita + loss_itm``, backward, the official ``optim.AdamW`` (lr 1e-4,
  weight decay 0.02). Ours is ``Trainer._micro_step`` as in ``train_step.py`` (the same
  random batch: images, captions of 12-30 tokens padded to 30).

Prints one JSON object: both medians, pairs/s and the ratio official/ours (> 1: ours faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from functools import partial

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step as TS  # noqa: E402

TIMM = {
    "__init__.py": "",
    "models/__init__.py": "",
    "models/registry.py": "def register_model(fn):\n    return fn\n",
    "models/layers.py": (
        "from torch import nn\nfrom torch.nn.init import trunc_normal_  # noqa: F401\n\n\n"
        "class DropPath(nn.Module):\n"
        "    def __init__(self, drop_prob=0.0):\n        super().__init__()\n        self.drop_prob = drop_prob\n\n"
        "    def forward(self, x):\n        if self.drop_prob == 0.0 or not self.training:\n            return x\n"
        "        keep = 1 - self.drop_prob\n"
        "        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)\n"
        "        return x * mask / keep\n"),
    "models/vision_transformer.py": (
        "from torch import nn\n\n\ndef _cfg(url='', **kwargs):\n    return {'url': url, **kwargs}\n\n\n"
        "class PatchEmbed(nn.Module):\n"
        "    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None):\n"
        "        super().__init__()\n        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)\n"
        "        self.num_patches = (img_size // patch_size) ** 2\n"
        "        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)\n"
        "        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()\n\n"
        "    def forward(self, x):\n        return self.norm(self.proj(x).flatten(2).transpose(1, 2))\n"),
}


def official_model(albef_dir: str, cfg):
    """The official ALBEF pretraining model at ``cfg``'s sizes, randomly initialised."""
    shim = tempfile.mkdtemp(prefix="timm_standin_")
    for rel, text in TIMM.items():
        path = os.path.join(shim, "timm", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    sys.path[:0] = [albef_dir, shim]
    import transformers.file_utils as fu
    fu.add_code_sample_docstrings = lambda *a, **k: (lambda f: f)
    import models.model_pretrain as MP
    import models.vit as V
    from models.xbert import BertForMaskedLM
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text

    def vit(img_size, norm_layer, **_):
        return V.VisionTransformer(img_size=img_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                                   num_heads=v.heads, mlp_ratio=v.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
    MP.VisionTransformer = vit
    BertForMaskedLM.from_pretrained = classmethod(lambda cls, name, config: cls(config))
    bert = dict(architectures=["BertForMaskedLM"], attention_probs_dropout_prob=t.dropout, hidden_act="gelu",
                hidden_dropout_prob=t.dropout, hidden_size=t.width, initializer_range=0.02,
                intermediate_size=t.intermediate, layer_norm_eps=1e-12, max_position_embeddings=512,
                model_type="bert", num_attention_heads=t.heads, num_hidden_layers=t.layers, pad_token_id=t.pad_token_id,
                type_vocab_size=2, vocab_size=t.vocab_size, fusion_layer=t.fusion_layer, encoder_width=v.width)
    bert_path = os.path.join(shim, "config_bert.json")
    with open(bert_path, "w") as f:
        json.dump(bert, f)
    config = dict(mlm_probability=m.mlm_probability, embed_dim=m.embed_dim, image_res=m.image_res, vision_width=v.width,
                  bert_config=bert_path, temp=m.temp, queue_size=m.queue_size, momentum=m.momentum)
    tok = types.SimpleNamespace(pad_token_id=t.pad_token_id, cls_token_id=t.cls_token_id, mask_token_id=t.mask_token_id)
    torch.manual_seed(0)
    model = MP.ALBEF(text_encoder="bert-base-uncased", tokenizer=tok, config=config, init_deit=False)
    from optim.adamw import AdamW
    return model, AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--albef", required=True, help="checkout of github.com/salesforce/ALBEF")
    p.add_argument("--size", default="bench-small", choices=["bench-small", "albef-base"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for this project's side only (e.g. model.text.pack=true)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from albef_bal.engine.dist_env import _free_port
        os.environ["MASTER_PORT"] = str(_free_port())
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)

    ns = argparse.Namespace(zero=None, threads=args.threads, set=args.set)
    cfg = TS.make_config(ns, args.size, args.batch, "fp32", "none", tempfile.mkdtemp())
    batch = TS.make_batch(cfg, args.batch, cfg.data.max_len)
    off, off_opt = official_model(args.albef, cfg)
    text = types.SimpleNamespace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tr = TS.build_trainer(cfg, batch, None, torch.device("cpu"))
    tr._bench_iter = iter(tr.data.loader(0, 0))
    tr._window = {}

    def official_step() -> float:
        t = time.perf_counter()
        loss_mlm, loss_ita, loss_itm = off(batch["image"], text, alpha=0.4)
        off_opt.zero_grad()
        (loss_mlm + loss_ita + loss_itm).backward()
        off_opt.step()
        return time.perf_counter() - t

    steps = {"official": official_step, "ours": lambda: TS.timed_step(tr, torch.device("cpu"))}
    for _ in range(args.warmup):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    for i in range(args.steps):
        for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            times[k].append(steps[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"size": args.size, "batch": args.batch, "threads": args.threads, "steps": args.steps,
                      "median_step_s": {k: round(v, 4) for k, v in med.items()},
                      "min_step_s": {k: round(min(v), 4) for k, v in times.items()},
                      "pairs_per_s": {k: round(args.batch / v, 2) for k, v in med.items()},
                      "ratio_official_over_ours": round(med["official"] / med["ours"], 3)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
