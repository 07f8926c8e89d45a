"""Retrieval splits (COCO / Flickr30K style) and reading their images once for evaluation.

Two sources are accepted by :func:`load_retrieval_split`:

- an ALBEF-format annotation JSON: a list of ``{"image": path relative to image_root,
  "caption": str or list of str, "image_id": optional}``. Entries that name the same image
  (same ``image_id``, else same path) are merged, so both the test layout (one entry per
  image with a caption list) and the train layout (one entry per caption) work;
- WebDataset shards (a path, brace pattern, directory or ``pipe:`` URL), one sample per
  image, captions as in the pretraining pipeline (``captions`` list in the json, else
  ``.txt``, else ``caption``).

Captions are cleaned like training captions (ALBEF cleans evaluation captions too).

:func:`iter_images` reads each image exactly once across ranks:
- JSON splits: rank r gets the contiguous block ``[r*N//W, (r+1)*N//W)`` of image indices;
- shard splits: rank r's workers read disjoint subsets of the shards (shard i goes to
  global worker ``i mod (W * workers)``), so the indices a rank gets are not contiguous.
Either way every batch comes with the image indices; scatter the features by them.
An image that cannot be read or decoded is replaced by a mean-colour image (all zeros after
normalisation), so that the split keeps its size and its ground truth; it is logged once and
reported to the caller (``iter_images(..., substituted=[])``), and the evaluation report
counts and lists these images.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .captions import captions_from_json, clean_caption, decode_text
from .samples import image_member, parse_json
from .shards import expand_urls, read_shard
from .skips import SkipCounter, SkipSample
from .transforms import CLIP_MEAN, EvalTransform, decode_image, to_normalized_tensor

log = logging.getLogger("albef_bal.data")


class SplitError(ValueError):
    """An annotation file or split that cannot be read; the message names the file."""


@dataclass
class RetrievalSplit:
    """Images, their captions, and the ground truth both ways.

    ``img2txt[i]`` lists the indices into ``texts`` of image i's captions; ``txt2img[t]``
    is the image index of caption t. ``image_ids[i]`` is the annotation's ``image_id``
    (the image path or shard key when it has none). ``meta[i]`` keeps the annotation's
    other fields (e.g. attributes and ``cls`` labels of the synthetic corpus).
    """
    source: str
    images: list[str]  # file paths (JSON splits) or sample keys (shard splits)
    image_ids: list[Any]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]
    meta: list[dict] = field(default_factory=list)
    shards: Optional[list[str]] = None  # set for shard splits

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.texts)


def _add_image(split: RetrievalSplit, ref: str, image_id: Any, captions: Sequence[str], meta: dict,
               max_words: int) -> None:
    i = len(split.images)
    split.images.append(ref)
    split.image_ids.append(image_id)
    split.meta.append(meta)
    split.img2txt.append([])
    for c in captions:
        split.img2txt[i].append(len(split.texts))
        split.texts.append(clean_caption(c, max_words))
        split.txt2img.append(i)


def _load_json(path: str, image_root: Optional[str], max_words: int) -> RetrievalSplit:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise SplitError(f"{path}: cannot read the annotation JSON: {e}") from None
    if not isinstance(entries, list):
        raise SplitError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries, got {type(entries).__name__}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    grouped: dict[Any, tuple[str, Any, list[str], dict]] = {}
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise SplitError(f"{path}: entry {n} needs 'image' and 'caption' fields, got {str(e)[:120]}")
        captions = captions_from_json({"caption": e["caption"]})
        if not captions:
            raise SplitError(f"{path}: entry {n} ({e['image']}) has no caption string")
        ident = e.get("image_id", e["image"])
        if ident not in grouped:
            meta = {k: v for k, v in e.items() if k not in ("image", "caption", "image_id")}
            grouped[ident] = (os.path.join(root, e["image"]), ident, [], meta)
        grouped[ident][2].extend(captions)
    split = RetrievalSplit(source=path, images=[], image_ids=[], texts=[], img2txt=[], txt2img=[])
    for ref, ident, captions, meta in grouped.values():
        _add_image(split, ref, ident, captions, meta, max_words)
    return split


def _load_shards(spec: Union[str, Sequence[str]], max_words: int) -> RetrievalSplit:
    urls = expand_urls(spec, "retrieval split")
    counter = SkipCounter("[retrieval split]")
    split = RetrievalSplit(source=str(spec), images=[], image_ids=[], texts=[], img2txt=[], txt2img=[],
                           shards=urls)
    for url in urls:
        for raw in read_shard(url, counter):
            try:
                image_member(raw)
                meta = parse_json(raw) or {}
                if isinstance(meta.get("captions"), list) and meta["captions"]:
                    captions = captions_from_json({"captions": meta["captions"]})
                elif "txt" in raw:
                    captions = [decode_text(raw["txt"])]
                else:
                    captions = captions_from_json(meta)
                if not captions:
                    raise SkipSample("missing_caption")
            except SkipSample as e:
                counter.add(e.reason, e.detail, url=url, key=raw["__key__"])
                continue
            ident = meta.get("image_id", raw["__key__"])
            meta = {k: v for k, v in meta.items() if k not in ("image", "caption", "captions", "image_id")}
            _add_image(split, raw["__key__"], ident, captions, meta, max_words)
    if not split.images:
        raise SplitError(f"{spec}: no usable sample in {len(urls)} shard(s)")
    return split


def load_retrieval_split(path: Union[str, Sequence[str]], image_root: Optional[str] = None,
                         max_words: int = 30) -> RetrievalSplit:
    """A :class:`RetrievalSplit` from an annotation JSON (images under ``image_root``,
    default the JSON's directory) or from shards."""
    if isinstance(path, str) and path.endswith(".json"):
        split = _load_json(path, image_root, max_words)
    else:
        split = _load_shards(path, max_words)
    empty = sum(1 for t in split.texts if not t)
    if empty:
        log.warning("%s: %d caption(s) are empty after cleaning", split.source, empty)
    log.info("retrieval split %s: %d images, %d captions", split.source, len(split), split.num_texts)
    return split


# ---------------------------------------------------------------------- images, once
_PLACEHOLDER_RGB = tuple(int(round(255 * m)) for m in CLIP_MEAN)


def _placeholder(res: int) -> np.ndarray:
    return np.broadcast_to(np.array(_PLACEHOLDER_RGB, dtype=np.uint8), (res, res, 3)).copy()


def _decode_or_placeholder(data: Optional[bytes], transform: EvalTransform, where: str,
                           unreadable: str = "cannot read the file") -> tuple[np.ndarray, Optional[str]]:
    """The transformed image and None, or the placeholder and why the image was replaced."""
    try:
        if data is None:
            raise SkipSample("bad_image", unreadable)
        return transform(decode_image(data, transform.decode_min_side)), None
    except SkipSample as e:
        log.warning("evaluation image %s: %s; using a mean-colour image instead", where, e)
        return _placeholder(transform.res), str(e)


class _FileImages(Dataset):
    def __init__(self, paths: Sequence[str], indices: Sequence[int], transform: EvalTransform):
        self.paths, self.indices, self.transform = paths, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int, Optional[str]]:
        i = self.indices[k]
        try:
            with open(self.paths[i], "rb") as f:
                data: Optional[bytes] = f.read()
            unreadable = ""
        except OSError as e:
            data, unreadable = None, f"cannot read the file ({e.strerror or e})"
        image, why = _decode_or_placeholder(data, self.transform, self.paths[i], unreadable)
        return image, i, why


def _collate_images(items: Sequence[tuple[np.ndarray, int, Optional[str]]]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """(images, image indices, [(index, why) of the images replaced by the placeholder])."""
    return (to_normalized_tensor([a for a, _, _ in items]), torch.tensor([i for _, i, _ in items], dtype=torch.long),
            [(i, why) for _, i, why in items if why])


class _ShardImages:
    """Processor for :class:`EvalShardStream`: raw sample -> (array, image index)."""

    def __init__(self, key_to_index: dict[str, int], transform: EvalTransform):
        self.key_to_index, self.transform = key_to_index, transform

    def prepare(self, raw: dict) -> tuple[np.ndarray, int, Optional[str]]:
        i = self.key_to_index.get(raw["__key__"])
        if i is None:  # a sample that the split left out (no usable caption)
            raise SkipSample("missing_caption", "not part of the split")
        try:
            _, data = image_member(raw)
            unreadable = ""
        except SkipSample as e:
            data, unreadable = None, str(e)
        image, why = _decode_or_placeholder(data, self.transform, f"{raw['__url__']}:{raw['__key__']}", unreadable)
        return image, i, why

    def collate(self, items, skipped) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        return _collate_images(items)


def image_indices_for_rank(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of image indices that rank ``rank`` evaluates (JSON splits)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def iter_images(split: RetrievalSplit, transform: Union[int, EvalTransform], batch_size: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, substituted: Optional[list] = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images float [b, 3, R, R], image indices long [b])`` for this rank's share.
    ``substituted``: a list that receives ``(image index, why)`` of every image of this
    share that could not be read and was replaced by the mean-colour placeholder."""
    if isinstance(transform, int):
        transform = EvalTransform(transform)
    if split.shards is None:
        ds = _FileImages(split.images, image_indices_for_rank(len(split), rank, world_size), transform)
        batches = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             collate_fn=_collate_images)
    else:
        from .webdataset import EvalShardStream
        stream = EvalShardStream(split.shards, _ShardImages({k: i for i, k in enumerate(split.images)}, transform),
                                 batch_size=batch_size, rank=rank, world_size=world_size)
        batches = DataLoader(stream, batch_size=None, num_workers=num_workers)
    for batch in batches:
        if isinstance(batch, dict):  # a marker that only carries skip counts
            continue
        images, indices, replaced = batch
        if substituted is not None:
            substituted.extend(replaced)
        yield images, indices


def iter_texts(split: RetrievalSplit, tokenizer: Any, max_len: int, add_sep: bool, batch_size: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, text indices)`` over all captions, in order (texts are
    cheap, so every rank encodes all of them)."""
    for start in range(0, split.num_texts, batch_size):
        texts = split.texts[start:start + batch_size]
        ids, mask = tokenizer.encode(texts, max_len, add_sep)
        yield ids, mask, torch.arange(start, start + len(texts))
