"""Evaluate a checkpoint on a retrieval split and write the report.

:func:`evaluate_checkpoint` is what ``albef-bal evaluate``, the demo and fine-tuning call.
It runs in one plain process (no launcher, no DeepSpeed) or, under torchrun / deepspeed /
srun, on every rank together (rank 0 writes the files). Files in ``out_dir``:

- ``metrics.json``: the metrics with what produced them (checkpoint, split, k, score,
  sizes, timings);
- ``metrics.md``: the same as a Markdown table;
- ``ranks_i2t.jsonl`` / ``ranks_t2i.jsonl``: one line per query with its 0-based rank;
- with ``save_topk=N``: ``topk_i2t.jsonl`` / ``topk_t2i.jsonl``, the N best items per
  query with their scores and whether they are right.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional, Sequence, Union

import torch

from ..config import Config, ConfigError, apply_overrides, from_dict, to_dict
from .retrieval import RetrievalResult, evaluate_retrieval

log = logging.getLogger("albef_bal.eval")


def init_eval_distributed() -> torch.device:
    """This process's device; under a launcher (WORLD_SIZE > 1) the process group too (NCCL on
    GPUs, gloo on CPU). One plain process needs no group and its environment is left alone."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "SLURM_NTASKS" in os.environ:
        from ..engine.dist_env import fill_env_from_launcher
        fill_env_from_launcher()
        world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _config_of(model, config: Optional[Config], overrides: Sequence[str]) -> Config:
    cfg = config if config is not None else getattr(model, "config", None)
    if cfg is None:
        raise ConfigError("evaluate_checkpoint got a model without a resolved config: pass config=... "
                          "(load_pretrained attaches one as model.config)")
    overrides = list(overrides)
    if overrides:
        bad = [o for o in overrides if o.strip().startswith("model.")]
        if bad:
            raise ConfigError(f"{bad[0]!r}: model.* overrides change how weights load; pass a checkpoint "
                              "directory (not a built model) to evaluate_checkpoint to use them")
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), overrides), source="--set overrides").validate()
    return copy.deepcopy(cfg)


def evaluate_checkpoint(model_or_export_dir: Union[str, torch.nn.Module], split: Any, out_dir: Optional[str] = None,
                        k_test: Optional[int] = None, batch_size: Optional[int] = None,
                        overrides: Sequence[str] = (), score: Optional[str] = None,
                        save_topk: Optional[int] = None, image_root: Optional[str] = None,
                        config: Optional[Config] = None, tokenizer: Any = None,
                        device: Optional[torch.device] = None, config_file: Optional[str] = None) -> dict:
    """Zero-shot or fine-tuned retrieval of a checkpoint on a split.

    ``model_or_export_dir``: an export directory (``model.safetensors`` + ``config.yaml``), an
    official ALBEF ``.pth`` (sizes inferred; ``config_file``/``overrides`` for the rest), or a
    built ALBEF (its ``model.config``, or ``config``). ``split``: a retrieval split JSON (or
    shards; ``image_root`` as in :func:`~albef_bal.data.load_retrieval_split`) or a loaded
    :class:`~albef_bal.data.RetrievalSplit`. ``overrides`` are ``key=value`` settings, e.g.
    ``model.image_res=384`` (position embeddings are resized on load) or ``eval.score=itm+sim``.
    ``k_test``/``batch_size``/``score``/``save_topk`` override ``eval.*``.

    Returns ``{"metrics": retrieval_metrics dict, "k_test", "score", "num_images",
    "num_texts", "pairs_fused", "timings", "checkpoint", "split", "files", "result"}``;
    ``result`` is the :class:`RetrievalResult` (score matrices and ranks on rank 0)."""
    from .. import distributed as D
    from ..data import RetrievalSplit, build_tokenizer, load_retrieval_split
    dev = init_eval_distributed() if device is None else device
    if isinstance(model_or_export_dir, (str, os.PathLike)):
        from ..checkpoints import load_pretrained
        source = str(model_or_export_dir)
        model = load_pretrained(source, config=config_file, overrides=overrides)
        cfg = copy.deepcopy(model.config)
        log.info("loaded %s: %s", source, str(model.load_report).replace("\n", "; "))
    else:
        model = model_or_export_dir
        source = getattr(model, "source", type(model).__name__)
        cfg = _config_of(model, config, overrides)
    if device is None:
        model.to(dev)
    else:
        dev = next(model.parameters()).device
    e = cfg.eval
    if k_test is not None:
        e.k_test = k_test
    if batch_size is not None:
        e.batch_size = batch_size
    if score is not None:
        e.score = score
    if save_topk is not None:
        e.save_topk = save_topk
    from ..config import EvalConfig
    e = from_dict(EvalConfig, to_dict(e), "eval")
    e.validate("eval")

    if isinstance(split, RetrievalSplit):
        split_name = split.source
    else:
        split_name = str(split)
        if isinstance(split, str) and not split.endswith(".json") and os.path.isfile(split):
            raise ConfigError(f"split {split!r}: expected a retrieval split .json (or shards)")
        split = load_retrieval_split(split, image_root, cfg.data.max_words)
    tokenizer = tokenizer or build_tokenizer(cfg.data.tokenizer)
    result = evaluate_retrieval(model, split, tokenizer, k=e.k_test, score=e.score, batch_size=e.batch_size,
                                rerank_batch=e.rerank_batch, image_chunk=e.image_chunk, max_len=cfg.data.max_len,
                                add_sep=cfg.data.add_sep, topk_backend=e.topk_backend, faiss_index=e.faiss_index,
                                precision=e.precision, device=dev, num_workers=e.num_workers)
    report = {"metrics": result.metrics, "k_test": e.k_test, "score": e.score, "image_res": model.cfg.image_res,
              "num_images": result.num_images, "num_texts": result.num_texts, "pairs_fused": result.pairs_fused,
              "images_substituted": len(result.substituted),
              "substituted_images": [{"image": i, "path": split.images[i], "reason": why}
                                     for i, why in result.substituted],
              "world_size": D.get_world_size(), "timings": {k: round(v, 3) for k, v in result.timings.items()},
              "checkpoint": source, "split": split_name, "files": []}
    if out_dir and D.get_rank() == 0:
        report["files"] = write_report(report, result, split, out_dir, e.save_topk)
    report["result"] = result
    return report


# ------------------------------------------------------------------------ writing
def markdown_table(report: dict) -> str:
    m = report["metrics"]
    how = "ITC similarity only" if report["k_test"] == 0 else \
        f"ITC top-{report['k_test']} re-ranked by {'ITM logit' if report['score'] == 'itm' else 'ITM logit + similarity'}"
    lines = [f"Retrieval on `{report['split']}` ({report['num_images']} images, {report['num_texts']} captions), "
             f"checkpoint `{report['checkpoint']}`, {report['image_res']} px, {how}.", "",
             "| direction | R@1 | R@5 | R@10 | mean |", "|---|---|---|---|---|"]
    for name, key in (("text retrieval (image → text)", "txt"), ("image retrieval (text → image)", "img")):
        lines.append(f"| {name} | " + " | ".join(f"{m[f'{key}_r{k}']:.2f}" for k in (1, 5, 10))
                     + f" | {m[f'{key}_r_mean']:.2f} |")
    lines += ["", f"Mean recall (r_mean): {m['r_mean']:.2f}", ""]
    lines += [substituted_summary(report), ""]
    for item in report.get("substituted_images", []):
        lines.append(f"- image {item['image']} `{item['path']}`: {item['reason']}")
    if report.get("substituted_images"):
        lines.append("")
    return "\n".join(lines)


def substituted_summary(report: dict) -> str:
    """One line: how many images could not be read and were replaced by a placeholder."""
    n = report.get("images_substituted", 0)
    if not n:
        return f"Unreadable images: none (all {report['num_images']} read)."
    return (f"Unreadable images: {n} of {report['num_images']} could not be read and were replaced by a "
            f"mean-colour image (they still count as queries and targets, so recall is lower than with them).")


def _jsonable(x):
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def write_report(report: dict, result: RetrievalResult, split, out_dir: str, save_topk: int = 0) -> list[str]:
    """Write metrics.json, metrics.md, per-query ranks and (save_topk > 0) the top items."""
    os.makedirs(out_dir, exist_ok=True)
    files = []

    def path(name: str) -> str:
        files.append(os.path.join(out_dir, name))
        return files[-1]

    with open(path("metrics.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if k not in ("result", "files")}, f, indent=1)
    with open(path("metrics.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(report))
    with open(path("ranks_i2t.jsonl"), "w", encoding="utf-8") as f:
        for i, r in enumerate(result.ranks_i2t.tolist()):
            f.write(json.dumps({"image": i, "image_id": _jsonable(split.image_ids[i]), "rank": r}) + "\n")
    with open(path("ranks_t2i.jsonl"), "w", encoding="utf-8") as f:
        for t, r in enumerate(result.ranks_t2i.tolist()):
            f.write(json.dumps({"text": t, "image": split.txt2img[t], "caption": split.texts[t], "rank": r}) + "\n")
    if save_topk > 0 and result.scores_i2t is not None:
        n = min(save_topk, split.num_texts)
        vals, idx = result.scores_i2t.topk(n, dim=1)
        with open(path("topk_i2t.jsonl"), "w", encoding="utf-8") as f:
            for i in range(len(split)):
                right = set(split.img2txt[i])
                f.write(json.dumps({"image": i, "image_id": _jsonable(split.image_ids[i]), "path": split.images[i],
                                    "rank": int(result.ranks_i2t[i]), "retrieved": [
                                        {"text": j, "caption": split.texts[j], "score": round(s, 5), "correct": j in right}
                                        for j, s in zip(idx[i].tolist(), vals[i].tolist())]}) + "\n")
        n = min(save_topk, len(split))
        vals, idx = result.scores_t2i.topk(n, dim=1)
        with open(path("topk_t2i.jsonl"), "w", encoding="utf-8") as f:
            for t in range(split.num_texts):
                f.write(json.dumps({"text": t, "caption": split.texts[t], "rank": int(result.ranks_t2i[t]), "retrieved": [
                    {"image": j, "image_id": _jsonable(split.image_ids[j]), "path": split.images[j],
                     "score": round(s, 5), "correct": j == split.txt2img[t]}
                    for j, s in zip(idx[t].tolist(), vals[t].tolist())]}) + "\n")
    log.info("retrieval report written to %s", out_dir)
    return files
