"""Batches from the data layer feed the ALBEF model as they are (pretraining and
retrieval fine-tuning)."""
import json

import torch

from albef_bal.data import build_finetune_loader, build_pretrain_loader, build_tokenizer, sync_text_config
from albef_bal.models.albef import build_model


def _tiny(cfg, retrieval=False):
    m = cfg.model
    m.vision.width, m.vision.depth, m.vision.heads = 32, 1, 2
    t = m.text
    t.width, t.layers, t.fusion_layer, t.heads, t.intermediate, t.max_position = 32, 2, 1, 2, 64, 32
    m.embed_dim, m.queue_size, m.retrieval = 16, 32, retrieval
    tok = build_tokenizer(cfg)
    t.vocab_size = tok.vocab_size
    sync_text_config(cfg, tok)
    cfg.validate()
    torch.manual_seed(0)
    return build_model(m), tok


def test_pretrain_batch_runs_through_the_model(data_config):
    cfg = data_config(batch=8, samples_per_epoch=16)
    model, tok = _tiny(cfg)
    for batch in build_pretrain_loader(cfg, tok, 0, 1):
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4, idx=batch.get("idx"))
        assert torch.isfinite(out.total()) and out.loss_mlm is not None


def test_finetune_batch_runs_through_the_retrieval_model(data_config, data_corpus, tmp_path):
    entries = [{"image": e["image"], "caption": c, "image_id": e["image_id"]}
               for e in json.load(open(data_corpus["test"])) for c in e["caption"]]
    path = tmp_path / "train_pairs.json"
    path.write_text(json.dumps(entries))
    cfg = data_config(batch=8, train_json=str(path), train_image_root=data_corpus["dir"])
    model, tok = _tiny(cfg, retrieval=True)
    batch = next(iter(build_finetune_loader(cfg, tok, 0, 1)))
    out = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4, idx=batch["idx"])
    assert torch.isfinite(out.total()) and out.loss_mlm is None
