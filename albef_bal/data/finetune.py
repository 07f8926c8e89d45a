"""Retrieval fine-tuning loader over an ALBEF-format training annotation JSON.

COCO/Flickr ``*_train.json`` has one entry per caption: ``{"image": path, "caption": str,
"image_id": ...}`` (an entry whose caption is a list yields one pair per caption). Every
pair gets ``idx``, the index of its image in order of first appearance, so pairs of the
same image share an idx (the retrieval model treats them as positives of each other).

Each epoch is a permutation of all pairs seeded by (train.seed, epoch). Rank r takes the
pairs at permutation positions r, r + W, r + 2W, ... and cuts them into batches of
``micro_batch_size``; the incomplete tail is dropped so that every rank has the same number
of full batches (the model gathers equal-size batches across ranks). A pair's
augmentation is seeded by (seed, epoch, pair index), so resuming with ``skip_batches``
just starts later in the same list, without reading anything.

An image that cannot be read is replaced by a deterministic substitute pair (drawn from
the same seed), counted under ``bad_image`` and logged, so batches keep their size.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from .batching import BatchCollator, Prepared
from .captions import captions_from_json, clean_caption
from .seeding import derive_seed, sample_rng
from .skips import SkipCounter, SkipSample, add_counts, empty_counts
from .transforms import TrainTransform, decode_image
from .webdataset import DataLoaderWithSkips, DataPipelineError, loader_options, train_transform

log = logging.getLogger("albef_bal.data")
MAX_SUBSTITUTES = 20
_FINETUNE_STREAM = 0x46494E45  # separates the fine-tuning seeds from the other streams


def load_pairs(path: str, image_root: Optional[str], max_words: int) -> tuple[list[tuple[str, str, int]], int]:
    """``([(image path, clean caption, image index)], number of images)``."""
    from ..config import ConfigError
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train_json={path!r}: cannot read it: {e}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"data.train_json={path!r}: expected a JSON list of {{'image', 'caption', 'image_id'}}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    index: dict[Any, int] = {}
    pairs, dropped = [], 0
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ConfigError(f"data.train_json={path!r}: entry {n} needs 'image' and 'caption', got {str(e)[:120]}")
        ident = e.get("image_id", e["image"])
        i = index.setdefault(ident, len(index))
        for c in captions_from_json({"caption": e["caption"]}):
            c = clean_caption(c, max_words)
            if c:
                pairs.append((os.path.join(root, e["image"]), c, i))
            else:
                dropped += 1
    if dropped:
        log.warning("%s: %d caption(s) empty after cleaning were left out", path, dropped)
    if not pairs:
        raise ConfigError(f"data.train_json={path!r} has no usable pair")
    return pairs, len(index)


class PairDataset(Dataset):
    """Item = (epoch position, pair index) -> (Prepared, skip counts)."""

    def __init__(self, pairs: list[tuple[str, str, int]], transform: TrainTransform, stream_seed: int):
        self.pairs = pairs
        self.transform = transform
        self.stream_seed = stream_seed
        # one counter per process (each DataLoader worker has its copy), so the log keeps to
        # the first few failures of each reason; items are processed one at a time, so
        # take() right after an item returns that item's counts
        self.counter = SkipCounter("[finetune]")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int):
        path = self.pairs[i][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SkipSample("bad_image", f"{path}: {e}") from None
        return decode_image(data, self.transform.decode_min_side)

    def __getitem__(self, i: int) -> tuple[Prepared, dict]:
        rng = sample_rng(self.stream_seed, i)
        counter = self.counter
        counter.take()
        for _ in range(MAX_SUBSTITUTES):
            try:
                img = self._load(i)
                break
            except SkipSample as e:
                counter.add(e.reason, e.detail, url=self.pairs[i][0])
                i = rng.randrange(len(self.pairs))
        else:
            raise DataPipelineError(f"{MAX_SUBSTITUTES} images in a row failed to load (last: {self.pairs[i][0]}); "
                                    "check data.train_json and data.train_image_root")
        _, caption, idx = self.pairs[i]
        return Prepared(self.transform(img, rng), caption, idx, str(i)), counter.take()


class EpochBatches(Sampler):
    """This rank's batches of pair indices for one epoch (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 skip_batches: int = 0):
        perm = np.random.default_rng(derive_seed(seed, epoch, _FINETUNE_STREAM)).permutation(n)
        self.num_batches = n // (world_size * batch_size)
        mine = perm[rank::world_size][:self.num_batches * batch_size]
        self.batches = [mine[b * batch_size:(b + 1) * batch_size].tolist()
                        for b in range(min(skip_batches, self.num_batches), self.num_batches)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    def __init__(self, collator: BatchCollator):
        self.collator = collator

    def __call__(self, items):
        skipped = empty_counts()
        for _, s in items:
            add_counts(skipped, s)
        return self.collator([p for p, _ in items], skipped)


def build_finetune_loader(cfg: Any, tokenizer: Any, rank: int, world_size: int, epoch: int = 0,
                          skip_batches: int = 0) -> DataLoaderWithSkips:
    """Batches as in pretraining (``idx`` always present) over ``cfg.data.train_json``."""
    from ..config import ConfigError
    d = cfg.data
    if not d.train_json:
        raise ConfigError("data.train_json is not set: fine-tuning reads an ALBEF-format annotation JSON")
    pairs, n_images = load_pairs(d.train_json, d.train_image_root, d.max_words)
    B = cfg.train.micro_batch_size
    batches = EpochBatches(len(pairs), B, rank, world_size, cfg.train.seed, epoch, skip_batches)
    if batches.num_batches == 0:
        raise ConfigError(f"data.train_json has {len(pairs)} pairs, fewer than one step "
                          f"(train.micro_batch_size {B} x {world_size} ranks)")
    stream_seed = derive_seed(cfg.train.seed, epoch, _FINETUNE_STREAM, 1)
    dataset = PairDataset(pairs, train_transform(cfg, d.finetune_crop_scale_min), stream_seed)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=d.num_workers,
                        collate_fn=_Collate(BatchCollator(tokenizer, d.max_len, d.add_sep)),
                        pin_memory=False, **loader_options(derive_seed(stream_seed, rank)))
    log.info("finetune loader: %s, %d pairs of %d images; rank %d/%d epoch %d: %d batches of %d",
             d.train_json, len(pairs), n_images, rank, world_size, epoch, len(batches), B)
    return DataLoaderWithSkips(loader, len(batches), f"finetune epoch {epoch} rank {rank}")
