"""From a raw shard sample (file extension -> bytes) to (caption, image bytes, image id).

Which caption is used, in order:
  1. ``captions`` (a list) in the ``.json`` member: images with several captions, as the
     tools here write them; one is chosen at random per use;
  2. the ``.txt`` member (img2dataset's layout);
  3. ``caption`` (a string or list) in the ``.json`` member.
The image is the first of ``jpg``, ``jpeg``, ``png``, ``webp`` present. The image id is the
JSON's integer ``image_id`` (digit strings are accepted), if any.
"""
from __future__ import annotations

import json
import random
from typing import Any, Optional

from .captions import captions_from_json, decode_text, pick_caption
from .skips import SkipSample
from .transforms import IMAGE_EXTENSIONS


def image_member(raw: dict) -> tuple[str, bytes]:
    for ext in IMAGE_EXTENSIONS:
        data = raw.get(ext)
        if data is not None:
            return ext, data
    raise SkipSample("missing_image", f"members: {sorted(k for k in raw if not k.startswith('__'))}")


def parse_json(raw: dict) -> Optional[dict]:
    data = raw.get("json")
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    return meta if isinstance(meta, dict) else {"value": meta}


def caption_candidates(raw: dict, meta: Optional[dict]) -> list[str]:
    if meta is not None and isinstance(meta.get("captions"), list) and meta["captions"]:
        return captions_from_json({"captions": meta["captions"]})
    if "txt" in raw:
        return [decode_text(raw["txt"])]
    return captions_from_json(meta) if meta is not None else []


def image_id(meta: Optional[dict]) -> Optional[int]:
    if not meta:
        return None
    value: Any = meta.get("image_id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def parse_sample(raw: dict, max_words: int, rng: Optional[random.Random] = None
                 ) -> tuple[str, bytes, Optional[int], Optional[dict]]:
    """``(clean caption, image bytes, image id or None, json or None)``; raises
    :class:`SkipSample` with the reason when the sample is unusable. Only the cheap checks
    happen here: the image is decoded later."""
    _, img = image_member(raw)
    meta = parse_json(raw)
    caption = pick_caption(caption_candidates(raw, meta), max_words, rng)
    return caption, img, image_id(meta), meta

