#!/usr/bin/env python
"""Describe WebDataset shards: sample count, caption length and image size distributions.

    python data_tools/shard_stats.py SHARDS [SHARDS ...] [--workers N] [--json] [--decode]

Only image headers are read (fast); --decode decodes every image as check_shards.py does.
Samples that the training pipeline would skip are counted but left out of the distributions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_shards import print_stats, run_checks  # noqa: E402

from albef_bal.data.checks import ShardStats  # noqa: E402
from albef_bal.data.shards import ShardSpecError, expand_urls  # noqa: E402
from albef_bal.data.skips import add_counts, empty_counts, format_counts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--decode", action="store_true", help="decode every image instead of reading headers")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.getLogger("albef_bal.data").setLevel(logging.ERROR)
    try:
        urls = expand_urls(a.shards, "shards")
    except ShardSpecError as e:
        print(f"shard_stats: error: {e}", file=sys.stderr)
        return 2
    reports = run_checks(urls, a.workers, a.max_words, decode=a.decode, desc="shard_stats")
    stats, skipped = ShardStats(), empty_counts()
    for r in reports:
        stats.merge(r.stats)
        add_counts(skipped, r.skipped)
    summary = {"shards": len(reports), "samples_total": sum(r.samples for r in reports), **stats.summary(),
               "skipped": skipped}
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['shards']} shards, {summary['samples_total']} samples ({format_counts(skipped)} skipped)")
        print_stats(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
