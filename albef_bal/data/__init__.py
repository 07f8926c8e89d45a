"""The data layer: WebDataset pipelines, retrieval splits, tokenizer, augmentations, and the
synthetic corpus. Importing this package is cheap; each name loads its module on first use.

Entry points:
  build_tokenizer(path_or_cfg) / sync_text_config(cfg, tokenizer)       tokenizer.py
  build_pretrain_loader(cfg, tokenizer, rank, world_size, epoch, skip_batches)
  build_eval_loader(cfg, tokenizer, shards, rank, world_size)           webdataset.py
  build_finetune_loader(cfg, tokenizer, rank, world_size, epoch, skip_batches)  finetune.py
  load_retrieval_split(path, image_root) / iter_images(...) / iter_texts(...)  retrieval.py
  clean_caption(text, max_words)                                         captions.py
  SKIP_REASONS, counts_tensor, counts_from_tensor                        skips.py
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_tokenizer": "tokenizer", "sync_text_config": "tokenizer", "CaptionTokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "build_pretrain_loader": "webdataset", "build_eval_loader": "webdataset",
    "pretrain_batches_per_epoch": "webdataset", "DataLoaderWithSkips": "webdataset",
    "DataPipelineError": "webdataset",
    "build_finetune_loader": "finetune",
    "load_retrieval_split": "retrieval", "iter_images": "retrieval", "iter_texts": "retrieval",
    "RetrievalSplit": "retrieval", "SplitError": "retrieval",
    "clean_caption": "captions",
    "SKIP_REASONS": "skips", "counts_tensor": "skips", "counts_from_tensor": "skips",
    "TrainTransform": "transforms", "EvalTransform": "transforms", "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "expand_urls": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'albef_bal.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
