"""WebDataset pipelines: the resampled pretraining stream and the read-once evaluation stream.

Pretraining (``build_pretrain_loader``)
---------------------------------------
Every (rank, DataLoader worker) pair runs its own infinite stream:

    shards drawn with replacement -> tar samples -> shuffle buffer -> caption checks
    -> image decode -> augmentation -> batches of B -> tokenised, normalised batch

Its random generators are seeded from (train.seed, epoch, rank, worker), so what a rank
sees is a pure function of (seed, epoch, rank, world_size, num_workers). An epoch is a
sample count: ``data.samples_per_epoch // (micro_batch_size * world_size)`` batches per
rank. Global batch j of a rank comes from logical worker ``j mod W`` (the DataLoader
collects from its workers round-robin), each logical worker producing its share.

Resuming with ``skip_batches=n``: logical worker l skips the batches with index < n that
belong to it. Skipped samples are decoded (to tell good samples from bad ones exactly as
the original run did) but neither augmented nor tokenised, and each sample's augmentation
draws from its own seed, so the batches after the skip are bit-identical to those of an
uninterrupted run. Worker processes are then rotated (process p plays logical worker
``(p + n) mod W``) so that the DataLoader's first batch is global batch n.

Evaluation (``build_eval_loader``, and shard-based retrieval splits)
--------------------------------------------------------------------
No resampling and no shuffling: shard i is read by global worker ``i mod (world_size *
W)`` only, so ranks and workers read disjoint shards and every sample is read exactly once.
With fewer shards than ``world_size * W`` some workers simply have nothing to read.
"""
from __future__ import annotations

import atexit
import logging
import random
import signal
import weakref
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batching import BatchCollator, Prepared
from .samples import parse_sample
from .seeding import derive_seed, sample_rng
from .shards import ShardSpecError, expand_urls, read_shard, split_for
from .skips import SkipCounter, SkipSample, add_counts, empty_counts, format_counts
from .transforms import EvalTransform, TrainTransform, decode_image

log = logging.getLogger("albef_bal.data")

# A stream whose shards keep giving nothing usable is misconfigured, not unlucky: stop with
# a clear error instead of spinning (and logging) forever.
MAX_EMPTY_SHARDS_IN_A_ROW = 64
MAX_BAD_SAMPLES_IN_A_ROW = 100_000


class DataPipelineError(RuntimeError):
    """The data cannot produce batches at all (every shard unreadable, every sample bad)."""


# ----------------------------------------------------------------------- schedules
def worker_schedule(total_batches: int, num_workers: int, skip_batches: int = 0) -> list[tuple[int, int, int]]:
    """For each worker process p: ``(logical worker, batches it skips, batches it yields)``.

    Batch j belongs to logical worker ``j mod W``; process p plays logical worker
    ``(p + skip_batches) mod W`` so that round-robin collection restarts at batch
    ``skip_batches``.
    """
    w = max(1, num_workers)
    skip = min(max(0, skip_batches), total_batches)
    out = []
    for p in range(w):
        logical = (p + skip) % w
        owned = max(0, -(-(total_batches - logical) // w))  # batches j < total with j % w == logical
        skipped = max(0, -(-(skip - logical) // w))  # batches j < skip with j % w == logical
        out.append((logical, skipped, owned - skipped))
    return out


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffled(source: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: each incoming sample replaces a random one of the ``size`` held."""
    if size <= 1:
        yield from source
        return
    buf: list[dict] = []
    for sample in source:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _resampled(urls: Sequence[str], rng: random.Random, counter: SkipCounter, retries: int,
               delay: float) -> Iterator[dict]:
    """Samples of shards drawn with replacement, forever."""
    empty = 0
    while True:
        url = urls[rng.randrange(len(urls))]
        n = 0
        for sample in read_shard(url, counter, retries, delay):
            n += 1
            yield sample
        empty = 0 if n else empty + 1
        if empty >= MAX_EMPTY_SHARDS_IN_A_ROW:
            raise DataPipelineError(f"{empty} shards in a row yielded no sample (skips so far: "
                                    f"{format_counts(counter.total)}); check data.train_shards, e.g. {url}")


# ---------------------------------------------------------------------- pretraining
class PretrainStream(IterableDataset):
    """The per-worker pretraining stream described in the module docstring."""

    def __init__(self, urls: Sequence[str], collate: BatchCollator, transform: TrainTransform, *,
                 batch_size: int, schedule: list[tuple[int, int, int]], seed: int, epoch: int, rank: int,
                 max_words: int, shuffle_buffer: int, retries: int = 3, retry_delay: float = 1.0):
        self.urls = list(urls)
        self.collate = collate
        self.transform = transform
        self.batch_size = batch_size
        self.schedule = schedule
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.max_words = max_words
        self.shuffle_buffer = shuffle_buffer
        self.retries, self.retry_delay = retries, retry_delay

    def __iter__(self) -> Iterator[dict]:
        proc, nproc = _worker()
        if nproc != len(self.schedule):
            raise RuntimeError(f"built for {len(self.schedule)} workers, running in {nproc}")
        logical, skip_batches, n_batches = self.schedule[proc]
        if n_batches <= 0:
            return
        counter = SkipCounter(f"[rank {self.rank} worker {logical}]")
        stream_seed = derive_seed(self.seed, self.epoch, self.rank, logical)
        shards = _resampled(self.urls, random.Random(derive_seed(stream_seed, 1)), counter, self.retries,
                            self.retry_delay)
        raw_samples = _shuffled(shards, self.shuffle_buffer, random.Random(derive_seed(stream_seed, 2)))

        to_skip = skip_batches * self.batch_size
        batch: list[Prepared] = []
        produced = bad_in_a_row = 0
        for pos, raw in enumerate(raw_samples):
            rng = sample_rng(stream_seed, pos)
            try:
                caption, data, iid, _ = parse_sample(raw, self.max_words, rng)
                img = decode_image(data, self.transform.decode_min_side)
            except SkipSample as e:
                counter.add(e.reason, e.detail, url=raw.get("__url__"), key=raw.get("__key__"))
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_BAD_SAMPLES_IN_A_ROW:
                    raise DataPipelineError(f"{bad_in_a_row} samples in a row were unusable (skips: "
                                            f"{format_counts(counter.total)}); check data.train_shards") from None
                continue
            bad_in_a_row = 0
            if to_skip:
                to_skip -= 1
                if not to_skip:
                    # the skips met so far were counted with the batches the checkpoint
                    # already holds; the next batch carries only the ones after this sample
                    counter.take()
                continue
            batch.append(Prepared(self.transform(img, rng), caption, iid, raw["__key__"]))
            if len(batch) == self.batch_size:
                yield self.collate(batch, counter.take())
                batch = []
                produced += 1
                if produced == n_batches:
                    return


# ------------------------------------------------------------------ evaluation stream
class SampleToBatch:
    """Eval-mode sample processing: clean caption, decode, eval transform; bad samples skip."""

    def __init__(self, collate: BatchCollator, transform: EvalTransform, max_words: int):
        self.collate = collate
        self.transform = transform
        self.max_words = max_words

    def prepare(self, raw: dict) -> Prepared:
        caption, data, iid, _ = parse_sample(raw, self.max_words, None)
        img = decode_image(data, self.transform.decode_min_side)
        return Prepared(self.transform(img), caption, iid, raw["__key__"])


class EvalShardStream(IterableDataset):
    """Every sample of every shard exactly once over all ranks and workers, in shard order.

    ``processor.prepare(raw)`` turns a raw sample into an item (raising ``SkipSample`` to
    skip it) and ``processor.collate(items, skipped)`` makes a batch; the last batch of
    each worker may be short.
    """

    def __init__(self, urls: Sequence[str], processor: Any, *, batch_size: int, rank: int, world_size: int,
                 retries: int = 3, retry_delay: float = 1.0):
        self.urls = list(urls)
        self.processor = processor
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.retries, self.retry_delay = retries, retry_delay

    def shards_of(self, worker: int, num_workers: int) -> list[str]:
        return split_for(self.urls, self.rank, self.world_size, worker, num_workers)

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _worker()
        counter = SkipCounter(f"[eval rank {self.rank} worker {worker}]")
        batch: list = []
        for url in self.shards_of(worker, num_workers):
            for raw in read_shard(url, counter, self.retries, self.retry_delay):
                try:
                    batch.append(self.processor.prepare(raw))
                except SkipSample as e:
                    counter.add(e.reason, e.detail, url=url, key=raw.get("__key__"))
                    continue
                if len(batch) == self.batch_size:
                    yield self.processor.collate(batch, counter.take())
                    batch = []
        if batch:
            yield self.processor.collate(batch, counter.take())
        elif any(counter.total.values()):
            # no batch left to carry the last counts: a marker without samples carries them
            yield {"skipped": counter.take(), "__empty__": True}


# ---------------------------------------------------------------------------- loader
class DataLoaderWithSkips:
    """A DataLoader plus a known length and the skip counts summed over its workers.

    Each batch's ``skipped`` entry holds the worker-local counts since that worker's
    previous batch, so summing ``batch["skipped"]`` over the batches of all ranks gives the
    run's totals; ``self.skipped`` is this rank's running sum for this loader.
    """

    def __init__(self, loader: DataLoader, num_batches: Optional[int], name: str):
        self.loader = loader
        self.num_batches = num_batches
        self.name = name
        self.skipped = empty_counts()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"{self.name} has no fixed length (it reads each shard once)")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        # the DataLoader's iterator (its workers and base seed) is created here, when
        # ``iter()`` is called, not at the first ``next()``: callers that create it inside
        # ``torch.random.fork_rng()`` rely on that
        batches = iter(self.loader)
        _LIVE_LOADERS.add(batches)
        return self._batches(batches)

    def _batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            add_counts(self.skipped, batch.get("skipped", {}))
            if batch.get("__empty__"):
                continue  # it only carried skip counts
            yield batch
        if any(self.skipped.values()):
            log.warning("%s: skipped %s", self.name, format_counts(self.skipped))


_LIVE_LOADERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    """At exit, stop the workers of loaders still alive (a run that ended with an error).
    They ignore SIGTERM, so the terminate() of multiprocessing's own exit hook would not end
    them and its join would wait forever; the DataLoader's orderly shutdown (a sentinel,
    then join) does. Registered after torch's own exit hook, so it runs before it."""
    for batches in list(_LIVE_LOADERS):
        stop = getattr(batches, "_shutdown_workers", None)
        if stop is not None:
            stop()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the data workers: SIGTERM and SIGUSR1 are the training
    process's business. Schedulers send them to every process of a job (SLURM's step,
    a container's process group, a launcher killing its process tree); a worker that died
    of it would make the next batch fail before the rank could save its checkpoint. The
    rank shuts its workers down itself when it stops (see ``_stop_live_workers``)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def loader_options(seed: int) -> dict:
    """DataLoader arguments shared by the training loaders: workers that outlive stop
    signals, and a generator of their own for the workers' base seed, so that creating a
    loader never draws from (and shifts) the global torch RNG that training uses."""
    return {"worker_init_fn": ignore_stop_signals, "generator": torch.Generator().manual_seed(seed)}


def _loader(dataset: IterableDataset, num_workers: int, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, **loader_options(seed))


def _config_error(msg: str):
    from ..config import ConfigError
    return ConfigError(msg)


def pretrain_batches_per_epoch(cfg: Any, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.data.samples_per_epoch <= 0:
        raise _config_error("data.samples_per_epoch must be > 0 for pretraining: the resampled shard stream is "
                            "endless, so the epoch length is a sample count")
    n = cfg.data.samples_per_epoch // per_step
    if n == 0:
        raise _config_error(f"data.samples_per_epoch ({cfg.data.samples_per_epoch}) is smaller than one step "
                            f"(train.micro_batch_size {cfg.train.micro_batch_size} x {world_size} ranks)")
    return n


def train_transform(cfg: Any, scale_min: Optional[float] = None) -> TrainTransform:
    d = cfg.data
    return TrainTransform(res=cfg.model.image_res, scale=(d.crop_scale_min if scale_min is None else scale_min, 1.0),
                          hflip=d.hflip, rand_aug_n=d.rand_aug_n if d.rand_aug else 0, rand_aug_m=d.rand_aug_m)


def build_pretrain_loader(cfg: Any, tokenizer: Any, rank: int, world_size: int, epoch: int = 0,
                          skip_batches: int = 0) -> DataLoaderWithSkips:
    """Batches of ``cfg.train.micro_batch_size`` for one rank and one epoch (see module doc)."""
    d = cfg.data
    try:
        urls = expand_urls(d.train_shards, "data.train_shards")
    except ShardSpecError as e:
        raise _config_error(str(e)) from None
    total = pretrain_batches_per_epoch(cfg, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    schedule = worker_schedule(total, d.num_workers, skip_batches)
    stream = PretrainStream(
        urls, BatchCollator(tokenizer, d.max_len, d.add_sep), train_transform(cfg),
        batch_size=cfg.train.micro_batch_size, schedule=schedule, seed=cfg.train.seed, epoch=epoch, rank=rank,
        max_words=d.max_words, shuffle_buffer=d.shuffle_buffer, retries=d.shard_retries,
        retry_delay=d.shard_retry_delay)
    remaining = total - min(max(0, skip_batches), total)
    log.info("pretrain loader: rank %d/%d epoch %d, %d shards, %d batches of %d (%d skipped for resume), "
             "%d workers", rank, world_size, epoch, len(urls), remaining, cfg.train.micro_batch_size,
             total - remaining, d.num_workers)
    return DataLoaderWithSkips(_loader(stream, d.num_workers, derive_seed(cfg.train.seed, epoch, rank, 3)), remaining,
                               f"pretrain epoch {epoch} rank {rank}")


def build_eval_loader(cfg: Any, tokenizer: Any, shards: Any, rank: int, world_size: int,
                      batch_size: Optional[int] = None) -> DataLoaderWithSkips:
    """Every sample of ``shards`` exactly once across ranks and workers, eval transform, in
    batches of ``batch_size`` (default ``cfg.eval.batch_size``; the last one per worker
    may be short). Batches have the keys of pretraining batches. Has no ``len()``."""
    d = cfg.data
    try:
        urls = expand_urls(shards, "eval shards")
    except ShardSpecError as e:
        raise _config_error(str(e)) from None
    workers = max(1, d.num_workers)
    if len(urls) < world_size * workers:
        log.info("eval: %d shards for %d ranks x %d workers; some workers will have no shard",
                 len(urls), world_size, workers)
    processor = SampleToBatch(BatchCollator(tokenizer, d.max_len, d.add_sep), EvalTransform(cfg.model.image_res),
                              d.max_words)
    stream = EvalShardStream(urls, processor, batch_size=batch_size or cfg.eval.batch_size, rank=rank,
                             world_size=world_size, retries=d.shard_retries, retry_delay=d.shard_retry_delay)
    return DataLoaderWithSkips(_loader(stream, d.num_workers), None, f"eval rank {rank}")
