#!/usr/bin/env python
"""Write the synthetic coloured-shapes corpus (see albef_bal/data/synthetic.py).

    python data_tools/make_synthetic.py OUT_DIR [--train N] [--val N] [--test N] [--seed S]
        [--image-size PX] [--shard-size N] [--preset NAME] [--image-noise S] [--image-blur S]
        [--corrupt-fraction F] [--caption-dropout P] [--caption-noise P] [--workers N]

Writes
    OUT_DIR/train/00000.tar ...   shards: {key}.jpg|png, .txt, .json (attributes), .cls
    OUT_DIR/val.json, val_images/     ALBEF-format retrieval split (several captions per image)
    OUT_DIR/test.json, test_images/
    OUT_DIR/vocab.txt             the corpus words after [PAD] [UNK] [CLS] [SEP] [MASK]
    OUT_DIR/manifest.json         counts, seed, knobs, class names

The output depends only on the arguments (not on --workers).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from multiprocessing import get_context

from tqdm import tqdm

from albef_bal.data.synthetic import PRESETS, SyntheticConfig, make_sample, manifest, shard_members, write_vocab
from albef_bal.data.tario import ShardWriter


def _train_shard(args) -> int:
    cfg, out_dir, shard, start, stop = args
    with ShardWriter(os.path.join(out_dir, "train", f"{shard:05d}.tar")) as w:
        for i in range(start, stop):
            w.write(f"{i:08d}", shard_members(make_sample(cfg, "train", i), cfg.image_format))
    return stop - start


def _eval_chunk(args) -> list[dict]:
    cfg, out_dir, split, start, stop = args
    entries = []
    for i in range(start, stop):
        s = make_sample(cfg, split, i)
        rel = f"{split}_images/{i:06d}.{cfg.image_format}"
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(s["image"])
        rec = s["record"]
        entries.append({
            "image": rel, "caption": s["captions"], "image_id": i, "cls": rec["cls"],
            "attributes": {k: v for k, v in rec.items() if k not in ("image_id", "cls", "clean_captions")},
        })
    return entries


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=20000, help="training samples (default 20000)")
    p.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="side in pixels (default 64)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per training shard")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    g = p.add_argument_group("imbalance knobs (training split; --corrupt-eval for all splits)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="none",
                   help="graded settings of the knobs below; explicit knobs override it")
    g.add_argument("--image-noise", type=float, help="std of pixel noise, share of the 0-255 range")
    g.add_argument("--image-blur", type=float, help="Gaussian blur radius in output pixels")
    g.add_argument("--corrupt-fraction", type=float, help="share of images that get noise/blur")
    g.add_argument("--caption-dropout", type=float, help="chance each size/colour/position is left out")
    g.add_argument("--caption-noise", type=float, help="chance each word is replaced by a random one")
    g.add_argument("--corrupt-eval", action="store_true", help="apply the knobs to val and test too")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> SyntheticConfig:
    knobs = dataclasses.replace(PRESETS[a.preset])
    for name in ("image_noise", "image_blur", "corrupt_fraction", "caption_dropout", "caption_noise"):
        if getattr(a, name) is not None:
            setattr(knobs, name, getattr(a, name))
    cfg = SyntheticConfig(seed=a.seed, image_size=a.image_size, min_objects=a.min_objects,
                          max_objects=a.max_objects, image_format=a.format, knobs=knobs,
                          corrupt_eval=a.corrupt_eval)
    cfg.validate()
    return cfg


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 2
    if a.shard_size < 1 or min(a.train, a.val, a.test) < 0:
        print("make_synthetic: error: --shard-size must be >= 1 and counts >= 0", file=sys.stderr)
        return 2
    out = a.out_dir
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    t0 = time.perf_counter()

    shard_jobs = [(cfg, out, s, start, min(start + a.shard_size, a.train))
                  for s, start in enumerate(range(0, a.train, a.shard_size))]
    eval_jobs = {}
    for split, n in (("val", a.val), ("test", a.test)):
        os.makedirs(os.path.join(out, f"{split}_images"), exist_ok=True)
        eval_jobs[split] = [(cfg, out, split, start, min(start + 500, n)) for start in range(0, n, 500)]

    total = a.train + a.val + a.test
    workers = max(1, a.workers)
    with tqdm(total=total, unit="sample", desc="make_synthetic", disable=None) as bar:
        if workers == 1:
            results = {"train": [bar.update(_train_shard(j)) for j in shard_jobs]}
            for split, jobs in eval_jobs.items():
                results[split] = []
                for j in jobs:
                    results[split].extend(_eval_chunk(j))
                    bar.update(j[4] - j[3])
        else:
            # fork shares the already imported modules; the work is pure per index
            with get_context("fork").Pool(workers) as pool:
                for n in pool.imap_unordered(_train_shard, shard_jobs):
                    bar.update(n)
                results = {}
                for split, jobs in eval_jobs.items():
                    results[split] = []
                    for entries in pool.imap(_eval_chunk, jobs):  # imap keeps the index order
                        results[split].extend(entries)
                        bar.update(len(entries))

    for split in ("val", "test"):
        with open(os.path.join(out, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(results[split], f)
    vocab_size = write_vocab(os.path.join(out, "vocab.txt"))
    counts = {"train": a.train, "val": a.val, "test": a.test}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest(cfg, counts, a.shard_size, len(shard_jobs), vocab_size), f, indent=2)
    dt = time.perf_counter() - t0
    print(f"wrote {total} samples to {out} in {dt:.1f}s ({total / max(dt, 1e-9):.0f} samples/s, {workers} workers); "
          f"train shards: {out}/train/{{00000..{max(len(shard_jobs) - 1, 0):05d}}}.tar, vocab: {vocab_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
