"""Evaluation: image-text retrieval (ITC top-k, ITM re-ranking, ALBEF's recall metrics),
linear probes of the frozen encoders, and the imbalance diagnostics.

    retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img)   metrics.py (pure function)
    evaluate_retrieval(model, split, tokenizer, k=..., ...)        retrieval.py (two stages)
    evaluate_checkpoint(checkpoint_or_model, split, out_dir, ...)  report.py (load, run, write)
    topk_inner_product(queries, gallery, k, backend, index)        topk.py (torch / faiss)
    diagnose_checkpoint(checkpoint, split, reference, out_dir)     diagnostics.py (albef-bal diagnose)
    diagnose_model(model, init_model, split, tokenizer, cfg)       diagnostics.py (built models)

Importing this package is cheap; the heavier modules load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "retrieval_metrics": "metrics", "retrieval_ranks": "metrics", "recall_from_ranks": "metrics",
    "METRIC_KEYS": "metrics",
    "evaluate_retrieval": "retrieval", "RetrievalResult": "retrieval",
    "evaluate_checkpoint": "report", "write_report": "report", "markdown_table": "report",
    "topk_inner_product": "topk",
    "diagnose_checkpoint": "diagnostics", "diagnose_model": "diagnostics", "build_init_model": "diagnostics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'albef_bal.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
