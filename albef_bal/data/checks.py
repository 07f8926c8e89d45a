"""Verifying shards and describing their contents (used by data_tools/check_shards.py and
data_tools/shard_stats.py).

A check reads a shard exactly as the training pipeline does (same tar reader, same caption
rules, full image decode), so a shard that passes here yields all its samples in training.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from .captions import clean_caption
from .samples import caption_candidates, image_member, parse_json, parse_sample
from .shards import read_shard
from .skips import SkipCounter, SkipSample, add_counts, empty_counts
from .transforms import decode_image


@dataclass
class ShardStats:
    """Distributions over the good samples of one or more shards."""
    caption_words: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    captions_per_sample: list[int] = field(default_factory=list)

    def add(self, words: int, size: tuple[int, int], fmt: str, n_captions: int) -> None:
        self.caption_words.append(words)
        self.widths.append(size[0])
        self.heights.append(size[1])
        self.formats[fmt] = self.formats.get(fmt, 0) + 1
        self.captions_per_sample.append(n_captions)

    def merge(self, other: "ShardStats") -> None:
        self.caption_words += other.caption_words
        self.widths += other.widths
        self.heights += other.heights
        self.captions_per_sample += other.captions_per_sample
        for k, v in other.formats.items():
            self.formats[k] = self.formats.get(k, 0) + v

    def summary(self) -> dict:
        def dist(values: list[int]) -> Optional[dict]:
            if not values:
                return None
            a = np.asarray(values)
            q = np.percentile(a, [0, 5, 25, 50, 75, 95, 100])
            return {"mean": round(float(a.mean()), 2),
                    **{k: round(float(v), 1) for k, v in zip(("min", "p5", "p25", "p50", "p75", "p95", "max"), q)}}

        words = np.asarray(self.caption_words or [0])
        buckets = {"1-5": 0, "6-10": 0, "11-20": 0, "21-30": 0, ">30": 0}
        for lo, hi, name in ((1, 5, "1-5"), (6, 10, "6-10"), (11, 20, "11-20"), (21, 30, "21-30"), (31, 10**9, ">30")):
            buckets[name] = int(((words >= lo) & (words <= hi)).sum()) if self.caption_words else 0
        short = [min(w, h) for w, h in zip(self.widths, self.heights)]
        return {
            "samples": len(self.caption_words),
            "caption_words": dist(self.caption_words), "caption_words_histogram": buckets,
            "captions_per_sample": dist(self.captions_per_sample),
            "image_width": dist(self.widths), "image_height": dist(self.heights), "image_short_side": dist(short),
            "image_formats": dict(sorted(self.formats.items())),
        }


@dataclass
class ShardReport:
    url: str
    samples: int = 0  # samples found (good + bad)
    good: int = 0
    skipped: dict = field(default_factory=empty_counts)
    bad: list = field(default_factory=list)  # (key or "", reason, detail)
    stats: ShardStats = field(default_factory=ShardStats)

    @property
    def ok(self) -> bool:
        return not any(self.skipped.values())


def _raw_caption_words(raw: dict) -> tuple[int, int]:
    """(words of the first caption before truncation to max_words, number of captions)."""
    captions = caption_candidates(raw, parse_json(raw))
    return len(clean_caption(captions[0], 10**9).split()), len(captions)


def check_shard(url: str, max_words: int = 30, decode: bool = True, retries: int = 1) -> ShardReport:
    """Read every sample of a shard; with ``decode`` every image is fully decoded, otherwise
    only its header is read (enough for the size statistics, much faster)."""
    report = ShardReport(url)
    counter = SkipCounter(keep=10**9)
    for raw in read_shard(url, counter, retries=retries, delay=0.5):
        report.samples += 1
        try:
            if decode:
                _, data, _, _ = parse_sample(raw, max_words)
                img = decode_image(data)
                size, fmt = img.size, image_member(raw)[0]
            else:
                fmt, data = image_member(raw)
                parse_sample(raw, max_words)
                try:
                    size = Image.open(io.BytesIO(data)).size
                except Exception as e:
                    raise SkipSample("bad_image", f"{type(e).__name__}: {e}") from None
            words, n_captions = _raw_caption_words(raw)
        except SkipSample as e:
            counter.add(e.reason, e.detail, url=url, key=raw["__key__"])
            continue
        report.good += 1
        report.stats.add(words, size, fmt, n_captions)
    add_counts(report.skipped, counter.total)
    report.bad = [(key or "", reason, detail) for reason, _, key, detail in counter.events]
    return report
