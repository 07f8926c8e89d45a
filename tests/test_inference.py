"""load_for_inference: one call from a checkpoint to features, match probabilities and rankings."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from albef_bal import load_for_inference
from albef_bal.checkpoints import convert_albef, export_model
from albef_bal.config import load_config
from albef_bal.data import build_tokenizer, sync_text_config
from albef_bal.inference import ImageReadError
from albef_bal.models import ALBEF
from tiny import TINY, colour_gallery, tiny_config, to_official

# what an official checkpoint's tensor shapes cannot tell: head counts and special-token ids
NOT_IN_SHAPES = [o for o in TINY if o.split("=")[0].endswith(("heads", "_token_id"))]


def _model_and_config(vocab, seed=0, *overrides):
    cfg = tiny_config(f"data.tokenizer={vocab}", "data.max_len=30", "eval.precision=fp32", *overrides)
    sync_text_config(cfg, build_tokenizer(vocab))
    torch.manual_seed(seed)
    return ALBEF(cfg.model).eval(), cfg


def _own_features(model, pixels, ids, mask):
    with torch.no_grad():
        return (model.image_feat(model.encode_image(pixels)).numpy(),
                model.text_feat(model.encode_text(ids, mask)).numpy())


def test_loader_round_trips_an_export_that_was_moved(data_corpus, colour_images, tmp_path):
    gallery = colour_images
    model, cfg = _model_and_config(data_corpus["vocab"])
    export_model(model, cfg, str(tmp_path / "export"))
    # the export carries its tokenizer: it still loads after the run's vocabulary is gone
    shutil.copytree(tmp_path / "export", tmp_path / "moved")
    shutil.rmtree(tmp_path / "export")
    m = load_for_inference(str(tmp_path / "moved"), "cpu")
    assert m.tokenizer.source == str(tmp_path / "moved" / "tokenizer")
    assert (m.tokenizer.max_len, m.tokenizer.add_sep) == (30, True)
    assert m.preprocess.image_res == m.image_res == 32 and m.embed_dim == 16
    assert not m.model.training and m.device == torch.device("cpu")

    paths = [p for p, _ in gallery]
    captions = [c for _, c in gallery]
    ids, mask = build_tokenizer(data_corpus["vocab"]).encode(captions, 30, True)
    assert torch.equal(m.tokenizer(captions)[0], ids)
    img, txt = _own_features(model, m.preprocess.batch(paths), ids, mask)
    np.testing.assert_allclose(m.encode_images(paths), img, atol=1e-6)
    np.testing.assert_allclose(m.encode_texts(captions), txt, atol=1e-6)


def test_loader_reads_official_checkpoints_directly_and_converted(data_corpus, colour_images, tmp_path):
    gallery = colour_images
    model, cfg = _model_and_config(data_corpus["vocab"], 1)
    pth = str(tmp_path / "ALBEF_tiny.pth")
    torch.save({"model": to_official(model), "epoch": 3}, pth)
    paths = [p for p, _ in gallery[:3]]
    captions = ["a red square", "a green square"]
    for_albef = build_tokenizer(data_corpus["vocab"]).encode(captions, 30, add_sep=False)  # ALBEF: no [SEP]

    direct = load_for_inference(pth, "cpu", overrides=NOT_IN_SHAPES, tokenizer=data_corpus["vocab"])
    assert direct.tokenizer.add_sep is False
    assert torch.equal(direct.tokenizer(captions)[0], for_albef[0])
    img, txt = _own_features(model, direct.preprocess.batch(paths), *for_albef)
    np.testing.assert_allclose(direct.encode_images(paths), img, atol=1e-6)
    np.testing.assert_allclose(direct.encode_texts(captions), txt, atol=1e-6)

    base = load_config(None, NOT_IN_SHAPES + [f"data.tokenizer={data_corpus['vocab']}"], validate=False)
    convert_albef(pth, str(tmp_path / "converted"), base)
    converted = load_for_inference(str(tmp_path / "converted"), "cpu")
    assert converted.tokenizer.add_sep is False
    np.testing.assert_allclose(converted.encode_images(paths), img, atol=1e-6)
    np.testing.assert_allclose(converted.encode_texts(captions), txt, atol=1e-6)
    assert converted.fingerprint == direct.fingerprint


def test_pil_image_path_and_tensor_give_the_same_features(data_corpus, tmp_path):
    model, cfg = _model_and_config(data_corpus["vocab"])
    export_model(model, cfg, str(tmp_path / "export"))
    m = load_for_inference(str(tmp_path / "export"))
    png = colour_gallery(str(tmp_path / "png"), size=40)[:3]
    jpg = colour_gallery(str(tmp_path / "jpg"), size=48, ext="jpg")[3:5]
    paths = [p for p, _ in png + jpg]
    from_paths = m.encode_images(paths, batch_size=2)
    pil = [Image.open(p) for p in paths]
    np.testing.assert_allclose(m.encode_images(pil), from_paths, atol=1e-6)
    batch = m.preprocess.batch(paths)
    assert batch.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(m.encode_images(batch), from_paths, atol=1e-6)
    np.testing.assert_allclose(m.encode_images([m.preprocess(p) for p in paths]), from_paths, atol=1e-6)
    np.testing.assert_allclose(m.encode_images(paths[1]), from_paths[1:2], atol=1e-6)  # one item
    assert from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1, atol=1e-5)

    # captions are cleaned as in training; batching does not change features
    a = m.encode_texts(["A RED square!", "a (blue)  square"], batch_size=1)
    np.testing.assert_allclose(a, m.encode_texts(["a red square", "a blue square"]), atol=1e-6)


def test_bad_inputs_are_refused_with_their_name(data_corpus, tmp_path):
    model, cfg = _model_and_config(data_corpus["vocab"])
    export_model(model, cfg, str(tmp_path / "export"))
    m = load_for_inference(str(tmp_path / "export"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        m.encode_images([str(broken)])
    with pytest.raises(ImageReadError, match="nowhere.png"):
        m.encode_images(str(tmp_path / "nowhere.png"))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        m.encode_images(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="2 image.*1 text"):
        m.itm(torch.zeros(2, 3, 32, 32), ["a red square"])
    with pytest.raises(ValueError, match="k=3 is more than the 2 re-ranked"):
        m.rank_images("a red square", torch.zeros(4, 3, 32, 32), k=3, rerank=2)
    # a tokenizer with more words than the model has embeddings is not the checkpoint's
    big = tmp_path / "big_vocab.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]))
    with pytest.raises(Exception, match="more than the model's 64"):
        load_for_inference(str(tmp_path / "export"), tokenizer=str(big))


def test_itm_and_ranking_find_the_planted_matches(colour_trained, colour_images):
    trained, gallery = colour_trained, colour_images
    m = load_for_inference(trained)
    paths = [p for p, _ in gallery]
    captions = [c for _, c in gallery]
    right = m.itm(paths, captions)
    wrong = m.itm(paths, captions[1:] + captions[:1])
    assert right.shape == (8,) and ((right > 0) & (right < 1)).all()
    assert (right > wrong).all(), (right, wrong)
    feats = m.encode_images(paths)
    for i, caption in enumerate(captions):
        hits = m.rank_images(caption, paths, k=3)
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["index"] == i and hits[0]["score"] == hits[0]["itc"]
        assert hits[0]["itc"] >= hits[1]["itc"] >= hits[2]["itc"]
        reranked = m.rank_images(caption, paths, k=4, rerank=4, image_features=feats)
        assert reranked[0]["index"] == i and all("itm" in h for h in reranked)
        assert [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)
        texts = m.rank_texts(paths[i], captions, k=2, rerank=8)
        assert texts[0]["index"] == i
