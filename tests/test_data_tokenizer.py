"""Tokenizer: [CLS] text [SEP] / [CLS] text, padding, loading, and the guard against
tokenizers that do not fit the model."""
import json
import os
import shutil

import pytest
import torch

from albef_bal.config import Config, ConfigError
from albef_bal.data.tokenizer import TokenizerError, build_tokenizer, sync_text_config


def test_encode_with_and_without_sep(data_bert_vocab):
    tok = build_tokenizer(data_bert_vocab)
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 101, 102, 103)
    assert tok.vocab_size == 30522
    texts = ["a dog runs", "two cats are sleeping on the sofa"]
    ids, mask = tok.encode(texts, max_len=25, add_sep=True)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == (2, 9)  # padded to the longest: [CLS] + 7 words + [SEP]
    assert ids[0].tolist() == [101, 1037, 3899, 3216, 102, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1, 0] == 101 and ids[1, -1] == 102 and mask[1].all()
    ids_ns, mask_ns = tok.encode(texts, max_len=25, add_sep=False)
    assert ids_ns.shape == (2, 8)
    assert ids_ns[0].tolist() == [101, 1037, 3899, 3216, 0, 0, 0, 0]
    assert (ids_ns != 102).all()
    assert mask_ns.sum(1).tolist() == [4, 8]


def test_truncation_keeps_special_tokens(data_bert_vocab):
    tok = build_tokenizer(data_bert_vocab)
    long = " ".join(["word"] * 50)
    ids, mask = tok.encode([long, "hi"], max_len=10, add_sep=True)
    assert ids.shape == (2, 10)
    assert ids[0, 0] == 101 and ids[0, 9] == 102
    ids, _ = tok.encode([long], max_len=10, add_sep=False)
    assert ids.shape == (1, 10) and ids[0, 0] == 101 and ids[0, 9] != 102


def test_matches_transformers_bert_tokenizer(data_bert_vocab):
    from transformers import BertTokenizer
    ref = BertTokenizer(vocab=data_bert_vocab)
    tok = build_tokenizer(data_bert_vocab)
    texts = ["a man riding a skateboard down the street", "naïve café owners", "unbelievably xylophonic"]
    ids, mask = tok.encode(texts, max_len=30, add_sep=True)
    expected = ref(texts, padding="longest", truncation=True, max_length=30, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"])


def test_loads_hf_directory_and_respects_lowercase_flag(tmp_path, data_bert_vocab):
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(data_bert_vocab, d / "vocab.txt")
    tok = build_tokenizer(str(d))
    assert tok.tokenize("Hello WORLD") == ["hello", "world"]
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = build_tokenizer(str(d))
    assert cased.tokenize("Hello")[0] != "hello"  # no lowercasing: 'Hello' is not in the uncased vocab
    cfg = Config()
    cfg.data.tokenizer = str(d)
    assert build_tokenizer(cfg).vocab_size == 30522  # a Config works too
    assert build_tokenizer(cfg.data).vocab_size == 30522


def test_loads_tokenizer_json_directory(tmp_path):
    from tokenizers import BertWordPieceTokenizer
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]) + "\n")
    d = tmp_path / "json_only"
    d.mkdir()
    BertWordPieceTokenizer(str(vocab)).save(str(d / "tokenizer.json"))
    tok = build_tokenizer(str(d))
    ids, _ = tok.encode(["w3 w4 nope"], max_len=8, add_sep=True)
    assert ids.tolist() == [[2, 8, 9, 1, 3]]


def test_bad_tokenizer_specs_raise_naming_the_key(tmp_path):
    tiny = tmp_path / "vocab.txt"
    tiny.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(TokenizerError, match="data.tokenizer"):
        build_tokenizer(str(tiny))
    no_specials = tmp_path / "plain.txt"
    no_specials.write_text("\n".join(f"w{i}" for i in range(40)) + "\n")
    with pytest.raises(TokenizerError, match=r"data.tokenizer=.*(special tokens|not found in the vocabulary)"):
        build_tokenizer(str(no_specials))
    with pytest.raises(TokenizerError, match="no such file"):
        build_tokenizer(str(tmp_path / "missing" / "vocab.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither vocab.txt nor tokenizer.json"):
        build_tokenizer(str(tmp_path / "empty"))


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (set by `make test`)")
def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(TokenizerError, match="data.tokenizer='no-such-org/no-such-tokenizer'"):
        build_tokenizer("no-such-org/no-such-tokenizer")


def test_sync_text_config(data_corpus, data_bert_vocab):
    cfg = Config()
    tok = build_tokenizer(data_corpus["vocab"])
    cfg.data.tokenizer = data_corpus["vocab"]
    cfg.model.text.vocab_size = tok.vocab_size
    sync_text_config(cfg, tok)
    t = cfg.model.text
    assert (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id) == (0, 2, 3, 4)
    cfg.validate()

    big = build_tokenizer(data_bert_vocab)
    cfg.data.tokenizer = data_bert_vocab
    with pytest.raises(ConfigError, match=r"data.tokenizer.*model.text.vocab_size"):
        sync_text_config(cfg, big)

    class Tiny:  # what an offline Hub lookup returns: a handful of special tokens
        vocab_size, pad_token_id, cls_token_id, sep_token_id, mask_token_id = 5, 0, 1, 2, 3
    cfg.model.text.vocab_size = 30522
    with pytest.raises(ConfigError, match=r"data.tokenizer.*only 5 tokens.*model.text.vocab_size"):
        sync_text_config(cfg, Tiny())
