"""Caption text: decoding, choosing one of several captions, ALBEF's cleaning.

ALBEF cleans every caption before tokenising it (``pre_caption`` in the paper's code):
lower case, drop the punctuation ``, . ' ! ? " ( ) * # : ; ~``, turn ``-`` and ``/`` into
spaces, read ``<person>`` (a placeholder in some web corpora) as ``person``, squeeze runs of
white space and keep at most ``max_words`` words. The same rules are applied here with
``str.translate``, which is several times faster than a chain of regular expressions and
matters at thousands of captions per second per worker.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Sequence

from .skips import SkipSample

# characters removed outright, and characters that separate words
_DROP = ",.'!?\"()*#:;~"
_TO_SPACE = "-/"
_TABLE = str.maketrans({**{c: None for c in _DROP}, **{c: " " for c in _TO_SPACE}})


class CaptionError(SkipSample):
    """A caption that cannot be used (``missing_caption``, ``empty_caption``, ``bad_utf8``)."""


def clean_caption(text: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning; returns "" when nothing is left."""
    text = text.lower().replace("<person>", "person").translate(_TABLE)
    words = text.split()  # splits on any white space, so runs and newlines collapse
    return " ".join(words[:max_words])


def decode_text(data: bytes) -> str:
    """UTF-8 text of a ``.txt`` member (a byte-order mark is tolerated)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError("bad_utf8", f"byte {e.start}: {e.reason}") from None


def captions_from_json(meta: Any) -> list[str]:
    """Captions stored in a sample's JSON: ``caption`` (str or list) or ``captions``.

    img2dataset writes ``caption`` as a string (or null when the source had none); the
    tools here write ``captions`` as a list for images with several captions.
    """
    if not isinstance(meta, dict):
        return []
    for key in ("captions", "caption"):
        value = meta.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return [v for v in value if isinstance(v, str)]
    return []


def pick_caption(candidates: Sequence[str], max_words: int, rng: Optional[random.Random] = None) -> str:
    """Clean the candidates and return one (random if ``rng`` is given, else the first).

    Raises ``CaptionError('missing_caption')`` when there is no candidate and
    ``CaptionError('empty_caption')`` when every candidate is empty after cleaning.
    """
    if not candidates:
        raise CaptionError("missing_caption")
    cleaned = [c for c in (clean_caption(t, max_words) for t in candidates) if c]
    if not cleaned:
        raise CaptionError("empty_caption", repr(candidates[0][:60]))
    if rng is None or len(cleaned) == 1:
        return cleaned[0]
    return cleaned[rng.randrange(len(cleaned))]
