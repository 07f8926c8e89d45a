"""BERT wordpiece tokenisation for captions, batched and padded to the longest text.

The Rust ``tokenizers`` library does the wordpiece split (the same code path that HF's fast
BERT tokenizer uses); the special tokens, truncation and padding are assembled here so that
the two ALBEF variants are explicit:

- ``add_sep=True``:  ``[CLS] w1 .. wn [SEP]``  (BERT, and HF's tokenizer as ALBEF calls it)
- ``add_sep=False``: ``[CLS] w1 .. wn``        (ALBEF's own tokenizer drops the trailing [SEP])

A tokenizer is named by ``data.tokenizer``: a ``vocab.txt`` file, a directory in the HF
layout (``vocab.txt`` and optionally ``tokenizer_config.json``, or ``tokenizer.json``), or a
Hub model name, which is resolved through the local Hugging Face cache (and downloaded when
the Hub is reachable and ``HF_HUB_OFFLINE`` is not set).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence, Union

import torch

log = logging.getLogger("albef_bal.data")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Fewer entries than this cannot be a real wordpiece vocabulary: an offline Hub lookup that
# silently falls back to an empty tokenizer has only its handful of special tokens.
MIN_VOCAB_SIZE = 16


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names ``data.tokenizer``."""


class CaptionTokenizer:
    """Encodes batches of cleaned captions into padded id and mask tensors."""

    def __init__(self, backend: Any, source: str):
        self._tok = backend
        self.source = source
        vocab = backend.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise TokenizerError(f"data.tokenizer={source!r}: the vocabulary lacks the special tokens "
                                 f"{missing}; a BERT wordpiece vocabulary is needed")
        self.pad_token_id = vocab["[PAD]"]
        self.unk_token_id = vocab["[UNK]"]
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.mask_token_id = vocab["[MASK]"]
        self.vocab_size = backend.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        """The vocabulary: token -> id."""
        return dict(self._tok.get_vocab())

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, texts: Sequence[str], max_len: int, add_sep: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both LongTensor ``[B, L]``, L = the longest
        encoded text (at most ``max_len``, special tokens included)."""
        room = max_len - 1 - int(add_sep)
        if room < 1:
            raise ValueError(f"max_len={max_len} leaves no room for text (add_sep={add_sep})")
        # one text at a time: encode_batch would start a thread pool, which does not survive
        # the fork into DataLoader workers and gains nothing on 25-token captions
        rows = []
        for t in texts:
            ids = self._tok.encode(t, add_special_tokens=False).ids[:room]
            rows.append([self.cls_token_id, *ids, self.sep_token_id] if add_sep else [self.cls_token_id, *ids])
        width = max(len(r) for r in rows) if rows else 0
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, :len(r)] = 1
        return input_ids, attention_mask

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (``##``-prefixed for a word continuation)."""
        return self._tok.id_to_token(int(token_id))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"CaptionTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _lowercase_flag(directory: str) -> bool:
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True


def _from_vocab(vocab_path: str, lowercase: bool, source: str) -> CaptionTokenizer:
    from tokenizers import BertWordPieceTokenizer
    try:
        backend = BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
    except Exception as e:  # the Rust loader reports unreadable files as generic exceptions
        raise TokenizerError(f"data.tokenizer={source!r}: cannot read {vocab_path}: {e}") from None
    return CaptionTokenizer(backend, source)


def _from_tokenizer_json(path: str, source: str) -> CaptionTokenizer:
    from tokenizers import Tokenizer
    backend = Tokenizer.from_file(path)
    backend.no_padding()
    backend.no_truncation()
    return CaptionTokenizer(backend, source)


def _looks_like_path(spec: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else that does not exist is a bad path."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
            or spec.endswith((".txt", ".json")))


def _from_hub(name: str) -> CaptionTokenizer:
    try:
        from huggingface_hub import hf_hub_download
        vocab = hf_hub_download(name, "vocab.txt")
    except Exception as e:
        raise TokenizerError(
            f"data.tokenizer={name!r} is not a file or directory, and the Hugging Face Hub lookup failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Point data.tokenizer at a "
            "vocab.txt or a tokenizer directory.") from None
    directory = os.path.dirname(vocab)
    return _from_vocab(vocab, _lowercase_flag(directory), name)


def build_tokenizer(path_or_cfg: Union[str, os.PathLike, Any]) -> CaptionTokenizer:
    """A :class:`CaptionTokenizer` from a path, a Hub name, a :class:`Config` or a
    :class:`DataConfig` (whose ``tokenizer`` field is used)."""
    spec = path_or_cfg
    if hasattr(spec, "data") and hasattr(spec.data, "tokenizer"):
        spec = spec.data.tokenizer
    elif hasattr(spec, "tokenizer"):
        spec = spec.tokenizer
    spec = os.fspath(spec)
    if not spec:
        raise TokenizerError("data.tokenizer is empty; set it to a vocab.txt or a tokenizer directory")
    if os.path.isfile(spec):
        if spec.endswith(".json"):
            tok = _from_tokenizer_json(spec, spec)
        else:
            tok = _from_vocab(spec, _lowercase_flag(os.path.dirname(spec) or "."), spec)
    elif os.path.isdir(spec):
        vocab = os.path.join(spec, "vocab.txt")
        tok_json = os.path.join(spec, "tokenizer.json")
        if os.path.isfile(vocab):
            tok = _from_vocab(vocab, _lowercase_flag(spec), spec)
        elif os.path.isfile(tok_json):
            tok = _from_tokenizer_json(tok_json, spec)
        else:
            raise TokenizerError(f"data.tokenizer={spec!r}: the directory has neither vocab.txt nor tokenizer.json")
    elif _looks_like_path(spec):
        raise TokenizerError(f"data.tokenizer={spec!r}: no such file or directory")
    else:
        tok = _from_hub(spec)
    if tok.vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"data.tokenizer={spec!r} has only {tok.vocab_size} tokens; that is not a usable "
                             "vocabulary (a failed offline Hub lookup looks like this)")
    log.debug("tokenizer %s", tok)
    return tok


def sync_text_config(cfg: Any, tokenizer: CaptionTokenizer) -> None:
    """Copy the tokenizer's special ids into ``cfg.model.text`` and check the vocabulary fits.

    Raises :class:`albef_bal.config.ConfigError` when the tokenizer can emit ids that the
    model's embedding table does not have, or when its vocabulary is implausibly small.
    """
    from ..config import ConfigError
    text = cfg.model.text
    name = getattr(cfg.data, "tokenizer", "?")
    if tokenizer.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"data.tokenizer={name!r} has only {tokenizer.vocab_size} tokens (model.text.vocab_size="
                          f"{text.vocab_size}); the tokenizer did not load a real vocabulary")
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(f"data.tokenizer={name!r} has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
                          f"{text.vocab_size}: set model.text.vocab_size >= {tokenizer.vocab_size}")
    if tokenizer.vocab_size < text.vocab_size:
        log.info("data.tokenizer has %d tokens, model.text.vocab_size is %d: the extra embedding rows stay unused",
                 tokenizer.vocab_size, text.vocab_size)
    text.pad_token_id = tokenizer.pad_token_id
    text.cls_token_id = tokenizer.cls_token_id
    text.sep_token_id = tokenizer.sep_token_id
    text.mask_token_id = tokenizer.mask_token_id
