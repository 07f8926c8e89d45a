"""Shard lists and shard reading: URL patterns, opening with retries, the per-worker split.

A shard spec is a local path, a brace pattern (``shards/{00000..00999}.tar``), a directory
(every ``*.tar`` in it), a ``pipe:`` command that writes the tar to stdout (``pipe:aws s3
cp s3://bucket/{00000..00099}.tar -``), any URL WebDataset's ``gopen`` understands, or a
list of these. Opening goes through ``webdataset.gopen`` so that object-store pipes and
HTTP behave as in the rest of the WebDataset ecosystem.
"""
from __future__ import annotations

import glob
import gzip
import logging
import os
import time
from typing import BinaryIO, Iterator, Optional, Sequence, Union

from .skips import SkipCounter
from .tario import BLOCK, CorruptTar, TruncatedTar, iter_samples, read_exact

log = logging.getLogger("albef_bal.data")


class ShardSpecError(ValueError):
    """A shard spec that names no shard."""


def expand_urls(spec: Union[str, Sequence[str]], key: str = "data.train_shards") -> list[str]:
    """All shard URLs of a spec, in order (brace patterns expanded, directories listed)."""
    import braceexpand
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if "://" not in item and not item.startswith("pipe:") and os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")) + glob.glob(os.path.join(item, "*.tar.gz")))
            if not found:
                raise ShardSpecError(f"{key}: directory {item!r} holds no .tar shards")
            urls.extend(found)
        else:
            urls.extend(braceexpand.braceexpand(item))
    if not urls:
        raise ShardSpecError(f"{key} is empty: give a shard path, brace pattern, pipe: command or directory")
    return urls


def is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def check_local_shards(spec: Union[str, Sequence[str]], key: str = "data.train_shards") -> list[str]:
    """``expand_urls``, plus a refusal (:class:`ShardSpecError`, naming the key and the
    value) when local shards of the spec do not exist. Checked at start-up, this takes
    milliseconds; the stream would otherwise retry each missing shard with back-off and
    give up only after minutes. ``pipe:`` and remote URLs are not checked."""
    urls = expand_urls(spec, key)
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u[len("file:"):] if u.startswith("file:") else u)]
    if missing:
        what = ("matches no file" if len(missing) == len(urls)
                else f"names {len(missing)} missing file(s) of {len(urls)}")
        raise ShardSpecError(f"{key}: {spec!r} {what} (e.g. {missing[0]})")
    return urls


def split_for(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Shards of one (rank, worker) when each shard is read exactly once: shard i goes to the
    global worker ``i mod (world_size * num_workers)``, where global worker = rank *
    num_workers + worker. Disjoint, and together they cover every shard."""
    n = world_size * num_workers
    g = rank * num_workers + worker
    return list(urls[g::n])


class _Prefixed:
    """A stream with the bytes already read from it put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        if len(out) < n:
            out += self._stream.read(n - len(out)) or b""
        return out

    def close(self) -> None:
        self._stream.close()


class _Gunzip:
    """Decompresses a ``.tar.gz`` shard; closing it also closes the raw stream."""

    def __init__(self, raw: _Prefixed):
        self._raw = raw
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")

    def read(self, n: int = -1) -> bytes:
        return self._gz.read(n)

    def close(self) -> None:
        try:
            self._gz.close()
        finally:
            self._raw.close()


def _close(stream) -> None:
    try:
        stream.close()
    except Exception as e:  # a pipe whose command failed reports it on close
        log.debug("closing shard stream: %s", e)


def open_shard(url: str, retries: int = 3, delay: float = 1.0) -> BinaryIO:
    """Open a shard and read its first block, retrying with exponential back-off.

    The first block is read here because a ``pipe:`` command that fails (missing object,
    no credentials) still opens fine; only reading shows the failure. Raises ``OSError``
    after ``retries`` retries.
    """
    from webdataset.gopen import gopen
    last: Optional[Exception] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(delay * 2 ** (attempt - 1))
        stream = None
        try:
            stream = gopen(url, "rb")
            head = read_exact(stream, BLOCK)
            if not head and not is_local(url):
                # an empty pipe: its exit status tells a failed command from an empty shard
                stream.close()
                raise OSError(f"{url}: the command produced no data")
            prefixed = _Prefixed(head, stream)
            return _Gunzip(prefixed) if url.endswith((".tar.gz", ".tgz")) else prefixed  # type: ignore[return-value]
        except Exception as e:
            last = e
            if stream is not None:
                _close(stream)
            log.info("opening shard %s failed (attempt %d of %d): %s", url, attempt + 1, retries + 1, e)
    raise OSError(f"cannot open shard {url} after {retries + 1} attempts: {last}")


def read_shard(url: str, counter: SkipCounter, retries: int = 3, delay: float = 1.0) -> Iterator[dict]:
    """Raw samples of one shard; open failures and truncation are counted, never raised."""
    try:
        stream = open_shard(url, retries, delay)
    except OSError as e:
        counter.add("shard_open_failed", str(e), url=url)
        return
    try:
        yield from iter_samples(stream, url)
    except (TruncatedTar, CorruptTar, OSError, EOFError) as e:
        # EOFError/OSError: gzip streams and failing pipes report a cut-off stream this way
        counter.add("truncated_tar", f"{type(e).__name__}: {e}", url=url)
    finally:
        _close(stream)
