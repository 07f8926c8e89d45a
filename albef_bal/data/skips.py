"""Counting and logging the samples and shards that the pipelines skip.

Bad input never stops a run; instead each skip is counted under a reason and logged on the
``albef_bal.data`` logger (the first few of each reason at WARNING with the shard and key,
the rest at DEBUG so that a corpus with many broken images does not flood the log).

Reasons:
  bad_image          image bytes that do not decode (corrupt, truncated, unsupported)
  missing_image      no jpg/jpeg/png/webp member in the sample
  missing_caption    no .txt member and no caption in the .json
  empty_caption      the caption is empty after cleaning
  bad_utf8           the .txt member is not valid UTF-8
  bad_json           the .json member does not parse
  truncated_tar      a shard that ended early or had a corrupt header (the sample that
                     was cut is dropped with it; counted once per shard read)
  shard_open_failed  a shard URL that could not be opened after the retries
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

SKIP_REASONS = ("bad_image", "missing_image", "missing_caption", "empty_caption", "bad_utf8", "bad_json",
                "truncated_tar", "shard_open_failed")
LOG_FIRST = 5  # per reason and process, logged at WARNING; later ones at DEBUG

log = logging.getLogger("albef_bal.data")


class SkipSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def add_counts(total: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
    for k, v in more.items():
        total[k] = total.get(k, 0) + int(v)
    return total


def format_counts(counts: Mapping[str, int]) -> str:
    nonzero = {k: v for k, v in counts.items() if v}
    return ", ".join(f"{k}={v}" for k, v in nonzero.items()) if nonzero else "none"


class SkipCounter:
    """Cumulative counts plus the counts not yet handed out with a batch (``take``)."""

    def __init__(self, where: str = "", keep: int = 0):
        self.where = where
        self.total = empty_counts()
        self._since_take = empty_counts()
        self.keep = keep  # remember the first ``keep`` events as (reason, url, key, detail)
        self.events: list[tuple[str, Optional[str], Optional[str], str]] = []

    def add(self, reason: str, detail: str = "", url: Optional[str] = None, key: Optional[str] = None) -> None:
        if reason not in self.total:
            raise KeyError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.total[reason] += 1
        self._since_take[reason] += 1
        if len(self.events) < self.keep:
            self.events.append((reason, url, key, detail))
        n = self.total[reason]
        level = logging.WARNING if n <= LOG_FIRST else logging.DEBUG
        if log.isEnabledFor(level):
            at = " ".join(x for x in (self.where, url or "", f"key={key}" if key else "") if x)
            more = f" (further '{reason}' skips of this process are logged at DEBUG)" if n == LOG_FIRST else ""
            log.log(level, "skipped (%s) %s: %s%s", reason, at, detail, more)

    def take(self) -> dict[str, int]:
        """Counts since the previous ``take`` (every reason present, zeros included)."""
        out, self._since_take = self._since_take, empty_counts()
        return out


def counts_tensor(counts: Mapping[str, int], reasons: Iterable[str] = SKIP_REASONS):
    """Counts as a LongTensor in ``SKIP_REASONS`` order (for an all-reduce over ranks)."""
    import torch
    return torch.tensor([int(counts.get(r, 0)) for r in reasons], dtype=torch.long)


def counts_from_tensor(t) -> dict[str, int]:
    return {r: int(v) for r, v in zip(SKIP_REASONS, t.tolist())}
