"""Evaluation reading: disjoint shards per rank and worker, every sample exactly once;
retrieval splits with their ground truth both ways."""
import json
import os
from collections import Counter

import pytest
import torch
from PIL import Image

from albef_bal.data import build_eval_loader, build_tokenizer, iter_images, iter_texts, load_retrieval_split
from albef_bal.data.retrieval import SplitError, image_indices_for_rank
from albef_bal.data.shards import split_for
from albef_bal.data.webdataset import EvalShardStream


def test_shard_split_is_a_partition():
    urls = [f"s{i}.tar" for i in range(11)]
    for world, workers in ((1, 1), (2, 3), (4, 2), (3, 5)):
        parts = [split_for(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))


@pytest.mark.parametrize("world, workers", [(2, 2), (4, 2)])  # 6 shards: 4 and 8 readers
def test_every_eval_sample_exactly_once(data_config, data_corpus, world, workers):
    cfg = data_config(num_workers=workers)
    tok = build_tokenizer(cfg)
    seen = Counter()
    shards_of_rank = []
    for rank in range(world):
        loader = build_eval_loader(cfg, tok, data_corpus["shards"], rank, world, batch_size=5)
        keys = [k for b in loader for k in b["keys"]]
        seen.update(keys)
        # keys are global sample indices and shards hold 32 consecutive ones
        shards_of_rank.append({int(k) // data_corpus["shard_size"] for k in keys})
        stream = EvalShardStream(data_corpus["urls"], None, batch_size=5, rank=rank, world_size=world)
        mine = [stream.shards_of(w, workers) for w in range(workers)]
        assert all(not set(a) & set(b) for i, a in enumerate(mine) for b in mine[i + 1:])
    assert set(seen) == {f"{i:08d}" for i in range(data_corpus["train"])}
    assert max(seen.values()) == 1
    for i, a in enumerate(shards_of_rank):  # ranks read disjoint shards
        for b in shards_of_rank[i + 1:]:
            assert not a & b


def test_eval_batches_are_deterministic_and_unaugmented(data_config, data_corpus):
    cfg = data_config()
    tok = build_tokenizer(cfg)
    a = next(iter(build_eval_loader(cfg, tok, data_corpus["urls"][0], 0, 1, batch_size=4)))
    b = next(iter(build_eval_loader(cfg, tok, data_corpus["urls"][0], 0, 1, batch_size=4)))
    assert a["keys"] == ["00000000", "00000001", "00000002", "00000003"]  # shard order, no shuffle
    assert torch.equal(a["image"], b["image"])


def test_load_json_split_and_ground_truth(tmp_path):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    ann = [
        {"image": "a.png", "caption": ["A red one.", "Red!"], "image_id": 10},
        {"image": "b.png", "caption": "Green, very green", "image_id": 11},
        {"image": "b.png", "caption": "another green caption", "image_id": 11},  # train-style layout
        {"image": "c.png", "caption": ["blue"], "extra": 1},  # no image_id: the path identifies it
    ]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(ann))
    split = load_retrieval_split(str(path))
    assert len(split) == 3 and split.image_ids == [10, 11, "c.png"]
    assert split.texts == ["a red one", "red", "green very green", "another green caption", "blue"]
    assert split.img2txt == [[0, 1], [2, 3], [4]]
    assert split.txt2img == [0, 0, 1, 1, 2]
    assert split.meta[2] == {"extra": 1}
    assert split.images[0] == os.path.join(str(tmp_path), "a.png")

    # three ranks, each image once, contiguous blocks
    got = {}
    for rank in range(3):
        assert list(image_indices_for_rank(3, rank, 3)) == [rank]
        for images, idx in iter_images(split, 16, batch_size=2, rank=rank, world_size=3):
            assert images.shape[1:] == (3, 16, 16)
            for i, img in zip(idx.tolist(), images):
                assert i not in got
                got[i] = img
    assert sorted(got) == [0, 1, 2]
    red = got[0].mean(dim=(1, 2))
    assert red[0] > 1.5 and red[1] < -1.0  # normalised pure red

    ids, mask, t_idx = next(iter_texts(split, build_tokenizer_for_tests(tmp_path), 30, True, batch_size=4))
    assert ids.shape[0] == 4 and t_idx.tolist() == [0, 1, 2, 3]


def build_tokenizer_for_tests(tmp_path):
    words = "a red one green very another caption blue".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"x{i}" for i in range(10)]))
    return build_tokenizer(str(vocab))


def test_split_errors_and_missing_image(tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(SplitError, match=r"bad.json: entry 0 needs 'image' and 'caption'"):
        load_retrieval_split(str(bad))
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"image": "missing.png", "caption": "gone"}]))
    split = load_retrieval_split(str(ok))
    (images, idx), = list(iter_images(split, 8, batch_size=4))
    assert idx.tolist() == [0] and images.abs().max() < 0.02  # a mean-colour stand-in
    assert "missing.png" in caplog.text


def test_synthetic_split_json_and_shards_agree(data_corpus, data_tool, tmp_path):
    split = load_retrieval_split(data_corpus["test"])
    assert len(split) == 24 and split.num_texts >= 48  # two or three captions per image
    assert all(split.txt2img[t] == i for i, ts in enumerate(split.img2txt) for t in ts)
    assert split.meta[0]["cls"] == split.meta[0]["attributes"]["probe"]["anchor_shape"]
    out = str(tmp_path / "shards")
    assert data_tool("json_to_wds").main([data_corpus["test"], data_corpus["dir"], out, "--shard-size", "5",
                                          "--workers", "1"]) == 0
    from_shards = load_retrieval_split(out)
    assert from_shards.texts == split.texts and from_shards.img2txt == split.img2txt
    assert from_shards.image_ids == split.image_ids and from_shards.meta == split.meta

    by_json = {}
    for images, idx in iter_images(split, 32, batch_size=7):
        by_json.update(zip(idx.tolist(), images))
    by_shards = Counter()
    for rank in range(2):
        for images, idx in iter_images(from_shards, 32, batch_size=4, rank=rank, world_size=2, num_workers=2):
            for i, img in zip(idx.tolist(), images):
                by_shards[i] += 1
                assert torch.allclose(img, by_json[i])  # same pixels from the file and the shard
    assert sorted(by_shards) == list(range(24)) and max(by_shards.values()) == 1
