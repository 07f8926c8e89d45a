"""Two-stage retrieval (ITC top-k, ITM re-ranking) of a tiny model on the synthetic corpus."""
import json
import os

import pytest
import torch

from albef_bal.checkpoints import load_pretrained
from albef_bal.data import build_tokenizer, load_retrieval_split
from albef_bal.eval import evaluate_checkpoint, retrieval_metrics
from tiny import export_tiny


@pytest.fixture(scope="module")
def tiny_export(data_corpus, tmp_path_factory):
    """A randomly initialised tiny ALBEF (32 px) exported with the corpus vocabulary."""
    return export_tiny(str(tmp_path_factory.mktemp("tiny_export")), data_corpus["vocab"], "eval.num_workers=0",
                       "eval.precision=fp32", "model.text.init_std=0.1")


@pytest.fixture(scope="module")
def split(data_corpus):
    return load_retrieval_split(data_corpus["test"])


def _features(export, split):
    model = load_pretrained(export)
    tok = build_tokenizer(model.config.data.tokenizer)
    with torch.no_grad():
        ids, mask = tok.encode(split.texts, model.config.data.max_len, model.config.data.add_sep)
        tf = model.text_feat(model.encode_text(ids, mask))
        from albef_bal.data import iter_images
        images = torch.cat([x for x, _ in iter_images(split, model.cfg.image_res, 64)])
        it = model.encode_image(images)
    return model, tok, ids, mask, it, model.image_feat(it), tf


def test_k0_ranks_by_similarity_alone(tiny_export, split):
    report = evaluate_checkpoint(tiny_export, split, k_test=0)
    _, _, _, _, _, image_feat, text_feat = _features(tiny_export, split)
    sims = image_feat @ text_feat.T
    assert torch.allclose(report["result"].scores_i2t, sims, atol=1e-5)
    assert report["metrics"] == retrieval_metrics(sims, sims.T, split.img2txt, split.txt2img)
    assert report["pairs_fused"] == 0


@pytest.mark.parametrize("score", ["itm", "itm+sim"])
def test_reranking_changes_only_the_top_k(tiny_export, split, score):
    k = 4
    res = evaluate_checkpoint(tiny_export, split, k_test=k, score=score)["result"]
    sims = res.sims
    for scores, s in ((res.scores_i2t, sims), (res.scores_t2i, sims.T)):
        order, sim_order = scores.argsort(1, descending=True), s.argsort(1, descending=True)
        # the first k items are the ITC top k (in a new order); the rest keep the ITC order
        assert torch.equal(order[:, :k].sort(1).values, sim_order[:, :k].sort(1).values)
        assert torch.equal(order[:, k:], sim_order[:, k:])
    # a candidate's score is the ITM match logit (+ similarity), computed pair by pair here
    model, _, ids, mask, image_tokens, _, _ = _features(tiny_export, split)
    i = 3
    cand = sims[i].topk(k).indices
    with torch.no_grad():
        text_tokens = model.encode_text(ids[cand], mask[cand])
        logits = model.itm_logits(model.fuse(text_tokens, mask[cand], image_tokens[i:i + 1].expand(k, -1, -1)))[:, 1]
    expect = logits + (sims[i, cand] if score == "itm+sim" else 0)
    assert torch.allclose(res.scores_i2t[i, cand], expect, atol=1e-4)
    # re-ranking did change something: the ITM order differs from the ITC order somewhere
    assert not torch.equal(res.scores_i2t.argsort(1, descending=True)[:, :k], sims.argsort(1, descending=True)[:, :k])


def test_reranking_batches_do_not_change_scores(tiny_export, split):
    small = evaluate_checkpoint(tiny_export, split, k_test=5, overrides=["eval.rerank_batch=7", "eval.image_chunk=3",
                                                                          "eval.topk_backend=faiss"])
    large = evaluate_checkpoint(tiny_export, split, k_test=5, overrides=["eval.topk_backend=torch"])
    assert torch.allclose(small["result"].scores_i2t, large["result"].scores_i2t, atol=1e-5)
    assert small["metrics"] == large["metrics"]
    # a pair that is a candidate both ways is fused once
    assert small["pairs_fused"] <= 5 * (split.num_texts + len(split))


def test_report_files_and_topk(tiny_export, split, tmp_path):
    report = evaluate_checkpoint(tiny_export, split, out_dir=str(tmp_path), k_test=3, save_topk=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["metrics.json", "metrics.md", "ranks_i2t.jsonl", "ranks_t2i.jsonl", "topk_i2t.jsonl",
                     "topk_t2i.jsonl"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == report["metrics"] and saved["k_test"] == 3
    md = (tmp_path / "metrics.md").read_text()
    assert f"{report['metrics']['txt_r1']:.2f}" in md and "| image retrieval" in md
    ranks = [json.loads(l)["rank"] for l in (tmp_path / "ranks_t2i.jsonl").read_text().splitlines()]
    assert ranks == report["result"].ranks_t2i.tolist()
    top = [json.loads(l) for l in (tmp_path / "topk_i2t.jsonl").read_text().splitlines()]
    assert len(top) == len(split) and all(len(r["retrieved"]) == 2 for r in top)
    first = top[0]["retrieved"][0]
    assert first["caption"] == split.texts[first["text"]]
    assert first["correct"] == (first["text"] in split.img2txt[0]) and (first["correct"] == (top[0]["rank"] == 0))


def test_resolution_change_resizes_position_embeddings(tiny_export, split):
    report = evaluate_checkpoint(tiny_export, split, k_test=2, overrides=["model.image_res=48"])
    assert report["image_res"] == 48
    res = report["result"]
    assert res.scores_i2t.shape == (len(split), split.num_texts) and torch.isfinite(res.sims).all()
    model = load_pretrained(tiny_export, overrides=["model.image_res=48"])
    assert "visual_encoder.pos_embed" in model.load_report.resized
    assert model.visual_encoder.pos_embed.shape[1] == (48 // 8) ** 2 + 1


def test_model_object_and_config_errors(tiny_export, split):
    model = load_pretrained(tiny_export)
    a = evaluate_checkpoint(model, split, k_test=2)
    b = evaluate_checkpoint(tiny_export, split, k_test=2)
    assert a["metrics"] == b["metrics"]
    from albef_bal.config import ConfigError
    with pytest.raises(ConfigError, match="model.image_res"):
        evaluate_checkpoint(model, split, overrides=["model.image_res=48"])
    with pytest.raises(ConfigError, match="eval.score"):
        evaluate_checkpoint(model, split, overrides=["eval.score=itc"])


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny_export, data_corpus, tmp_path):
    """`albef-bal evaluate` under torchrun with 2 gloo ranks, on a shard split (each rank reads
    different shards, so image ownership is not contiguous), equals one in-process rank."""
    from workers import torchrun_module
    out = tmp_path / "two"
    res = torchrun_module(["evaluate", "--checkpoint", tiny_export, "--split", data_corpus["shards"], "--k", "5",
                           "--out", str(out), "--set", "eval.num_workers=0"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "| text retrieval" in res.stdout
    two = json.loads((out / "metrics.json").read_text())
    one = evaluate_checkpoint(tiny_export, data_corpus["shards"], out_dir=str(tmp_path / "one"), k_test=5)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_images"] == one["num_images"] == data_corpus["train"]
    assert two["pairs_fused"] == one["pairs_fused"]
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-9)
    for name in ("ranks_i2t.jsonl", "ranks_t2i.jsonl"):
        assert (out / name).read_text() == (tmp_path / "one" / name).read_text()


def test_unreadable_images_are_substituted_counted_and_listed(tiny_export, data_corpus, tmp_path):
    """`albef-bal evaluate` on a split with a corrupt and a missing image: both are replaced
    by the mean-colour image, and metrics.json, metrics.md and the printed table say how
    many and which, each once."""
    import subprocess
    import sys
    root = os.path.dirname(data_corpus["test"])
    entries = json.load(open(data_corpus["test"]))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not an image" * 10)
    for e in entries:
        e["image"] = os.path.join(root, e["image"])
    entries[1]["image"] = str(garbage)
    entries[4]["image"] = str(tmp_path / "missing.jpg")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(entries))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "albef_bal", "evaluate", "--checkpoint", tiny_export, "--split",
                          str(split_file), "--k", "2", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["images_substituted"] == 2
    assert [(x["image"], x["path"]) for x in report["substituted_images"]] == [(1, str(garbage)),
                                                                              (4, str(tmp_path / "missing.jpg"))]
    assert "cannot read the file (No such file or directory)" in report["substituted_images"][1]["reason"]
    summary = f"Unreadable images: 2 of {len(entries)} could not be read and were replaced by a mean-colour image"
    assert summary in (out / "metrics.md").read_text() and summary in res.stdout
    assert str(garbage) in (out / "metrics.md").read_text()
    assert res.stderr.count(f"evaluation image {garbage}") == 1  # logged once per image
