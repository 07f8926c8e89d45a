"""Turning a list of prepared samples into the batch dict the model consumes.

Batch keys:
  image           float [B, 3, R, R], CLIP-normalised
  input_ids       long [B, L], padded to the longest caption of the batch (L <= max_len)
  attention_mask  long [B, L]
  idx             long [B], image ids; present only when every sample of the batch has one
                  (the model treats equal ids as the same image, so made-up ids would
                  turn unrelated pairs into positives)
  keys            list[str], the sample keys (for tracing a batch back to its shard)
  skipped         dict reason -> count: samples and shards skipped since the previous batch
                  of the same worker (see ``skips.py``); the loaders sum them up
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .transforms import to_normalized_tensor


@dataclass
class Prepared:
    """One sample after decoding and augmentation."""
    image: np.ndarray  # uint8 [R, R, 3]
    caption: str
    image_id: Optional[int]
    key: str


class BatchCollator:
    """Tokenises the captions and stacks the images of prepared samples."""

    def __init__(self, tokenizer, max_len: int, add_sep: bool):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.add_sep = add_sep

    def __call__(self, samples: Sequence[Prepared], skipped: dict[str, int]) -> dict:
        input_ids, attention_mask = self.tokenizer.encode([s.caption for s in samples], self.max_len, self.add_sep)
        batch = {
            "image": to_normalized_tensor([s.image for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "keys": [s.key for s in samples],
            "skipped": skipped,
        }
        if all(s.image_id is not None for s in samples):
            batch["idx"] = torch.tensor([s.image_id for s in samples], dtype=torch.long)
        return batch
