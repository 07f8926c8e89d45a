"""The retrieval fine-tuning loader over an ALBEF-format training JSON."""
import json
import os

import pytest
import torch

from albef_bal.config import ConfigError
from albef_bal.data import build_finetune_loader, build_tokenizer


@pytest.fixture
def train_json(data_corpus, tmp_path):
    """COCO-style training annotations: one entry per caption, made from the test split."""
    with open(data_corpus["test"]) as f:
        images = json.load(f)
    entries = [{"image": os.path.join(data_corpus["dir"], e["image"]), "caption": c, "image_id": f"img{e['image_id']}"}
               for e in images for c in e["caption"]]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    return str(path), entries


def _cfg(data_config, path, **kw):
    return data_config(train_json=path, train_image_root="/", **kw)


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_batches_and_image_index(data_config, train_json):
    path, entries = train_json
    cfg = _cfg(data_config, path, batch=6)
    loader = build_finetune_loader(cfg, build_tokenizer(cfg), 0, 1)
    batches = list(loader)
    assert len(loader) == len(batches) == len(entries) // 6
    first_index = {}
    for e in entries:
        first_index.setdefault(e["image_id"], len(first_index))
    for b in batches:
        assert b["image"].shape == (6, 3, 32, 32) and b["idx"].shape == (6,)
        for key, idx in zip(b["keys"], b["idx"].tolist()):
            assert idx == first_index[entries[int(key)]["image_id"]]  # same image -> same idx
    seen = _keys(batches)
    assert len(seen) == len(set(seen))  # a permutation: no pair twice in an epoch


def test_epochs_ranks_and_resume(data_config, train_json):
    path, entries = train_json
    cfg = _cfg(data_config, path, batch=4, num_workers=2)
    tok = build_tokenizer(cfg)
    full = list(build_finetune_loader(cfg, tok, 0, 1, epoch=0))
    again = list(build_finetune_loader(cfg, tok, 0, 1, epoch=0))
    assert _keys(full) == _keys(again) and torch.equal(full[0]["image"], again[0]["image"])
    assert _keys(full) != _keys(list(build_finetune_loader(cfg, tok, 0, 1, epoch=1)))
    resumed = list(build_finetune_loader(cfg, tok, 0, 1, epoch=0, skip_batches=5))
    assert len(resumed) == len(full) - 5
    assert all(a["keys"] == b["keys"] and torch.equal(a["image"], b["image"]) for a, b in zip(full[5:], resumed))
    ranks = [_keys(build_finetune_loader(cfg, tok, r, 3, epoch=0)) for r in range(3)]
    assert len({len(k) for k in ranks}) == 1  # equal number of full batches per rank
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])


def test_bad_image_is_substituted_and_counted(data_config, train_json, tmp_path):
    _, entries = train_json
    entries = [dict(e) for e in entries]
    for e in entries[::5]:
        e["image"] = str(tmp_path / "does_not_exist.jpg")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(entries))
    cfg = _cfg(data_config, str(path), batch=5)
    loader = build_finetune_loader(cfg, build_tokenizer(cfg), 0, 1)
    batches = list(loader)
    assert all(b["image"].shape[0] == 5 for b in batches)
    assert loader.skipped["bad_image"] == sum(b["skipped"]["bad_image"] for b in batches) > 0
    used = _keys(batches)
    assert all(not entries[int(k)]["image"].endswith("does_not_exist.jpg") for k in used)


def test_config_errors(data_config, tmp_path):
    cfg = data_config()
    tok = build_tokenizer(cfg)
    with pytest.raises(ConfigError, match="data.train_json"):
        build_finetune_loader(cfg, tok, 0, 1)
    cfg.data.train_json = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="data.train_json=.*missing.json"):
        build_finetune_loader(cfg, tok, 0, 1)
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"image": "a.jpg", "caption": "one", "image_id": 1}]))
    cfg.data.train_json = str(small)
    with pytest.raises(ConfigError, match="fewer than one step"):
        build_finetune_loader(cfg, tok, 0, 1)
