#!/usr/bin/env python
"""Verify WebDataset shards: decode every image, check every caption, report what is bad.

    python data_tools/check_shards.py SHARDS [SHARDS ...] [--workers N] [--max-words 30]
        [--show N] [--stats] [--json]

SHARDS: paths, brace patterns ('shards/{00000..00099}.tar'), directories or pipe: URLs.
Prints one line per shard (samples, good, bad by reason), the bad samples with their
reasons, and the totals; --stats adds caption-length and image-size distributions.
Exit status: 0 when every sample of every shard is good, 1 when anything was bad or a
shard could not be read or was truncated, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from multiprocessing import get_context

from tqdm import tqdm

from albef_bal.data.checks import ShardStats, check_shard
from albef_bal.data.shards import ShardSpecError, expand_urls
from albef_bal.data.skips import add_counts, empty_counts, format_counts


def _check(args):
    url, max_words, decode = args
    return check_shard(url, max_words=max_words, decode=decode)


def run_checks(urls, workers: int, max_words: int, decode: bool, desc: str):
    """Reports in shard order, checked in parallel."""
    jobs = [(u, max_words, decode) for u in urls]
    with tqdm(total=len(jobs), unit="shard", desc=desc, disable=None, file=sys.stderr) as bar:
        if workers <= 1 or len(jobs) == 1:
            reports = []
            for j in jobs:
                reports.append(_check(j))
                bar.update(1)
            return reports
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            reports = []
            for r in pool.imap(_check, jobs):
                reports.append(r)
                bar.update(1)
            return reports


def print_stats(summary: dict) -> None:
    print(f"samples: {summary['samples']}")
    for name in ("caption_words", "captions_per_sample", "image_width", "image_height", "image_short_side"):
        d = summary[name]
        if d:
            print(f"  {name:20s} mean {d['mean']:8.2f}  min {d['min']:g}  p5 {d['p5']:g}  p25 {d['p25']:g}  "
                  f"p50 {d['p50']:g}  p75 {d['p75']:g}  p95 {d['p95']:g}  max {d['max']:g}")
    print("  caption words histogram: " + ", ".join(f"{k}: {v}" for k, v in summary["caption_words_histogram"].items()))
    print("  image formats: " + ", ".join(f"{k}: {v}" for k, v in summary["image_formats"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-words", type=int, default=30, help="caption cleaning as in training")
    p.add_argument("--show", type=int, default=50, help="bad samples to list (default 50; -1 for all)")
    p.add_argument("--stats", action="store_true", help="also print caption and image size distributions")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = p.parse_args(argv)
    logging.getLogger("albef_bal.data").setLevel(logging.ERROR)  # the report lists every problem
    try:
        urls = expand_urls(a.shards, "shards")
    except ShardSpecError as e:
        print(f"check_shards: error: {e}", file=sys.stderr)
        return 2
    reports = run_checks(urls, a.workers, a.max_words, decode=True, desc="check_shards")

    totals, stats = empty_counts(), ShardStats()
    for r in reports:
        add_counts(totals, r.skipped)
        stats.merge(r.stats)
    n_samples = sum(r.samples for r in reports)
    n_good = sum(r.good for r in reports)
    bad = [(r.url, *b) for r in reports for b in r.bad]
    ok = not any(totals.values())
    if a.json:
        out = {"ok": ok, "shards": len(reports), "samples": n_samples, "good": n_good, "skipped": totals,
               "per_shard": [{"url": r.url, "samples": r.samples, "good": r.good, "skipped": r.skipped}
                             for r in reports],
               "bad": [{"url": u, "key": k, "reason": why, "detail": d} for u, k, why, d in bad]}
        if a.stats:
            out["stats"] = stats.summary()
        print(json.dumps(out, indent=2))
        return 0 if ok else 1
    for r in reports:
        print(f"{r.url}: {r.samples} samples, {r.good} good" + ("" if r.ok else f", bad: {format_counts(r.skipped)}"))
    if bad:
        limit = len(bad) if a.show < 0 else a.show
        print(f"\nbad samples ({len(bad)}{'' if limit >= len(bad) else f', first {limit} shown'}):")
        for url, key, why, detail in bad[:limit]:
            print(f"  {url} {key or '-'}: {why}" + (f" ({detail})" if detail else ""))
    print(f"\ntotal: {len(reports)} shards, {n_samples} samples, {n_good} good, bad: {format_counts(totals)}")
    if a.stats:
        print()
        print_stats(stats.summary())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
