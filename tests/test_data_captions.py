"""Caption cleaning (ALBEF's pre_caption rules) and caption selection."""
import random

import pytest

from albef_bal.data.captions import CaptionError, captions_from_json, clean_caption, decode_text, pick_caption


@pytest.mark.parametrize("raw, expected", [
    ("A Dog, running!", "a dog running"),
    ("  Two   cats\n\tsleeping.  ", "two cats sleeping"),
    ("black-and-white photo/drawing", "black and white photo drawing"),
    ("it's \"great\" (really) #1: yes; ok~ *star*?", "its great really 1 yes ok star"),
    ("<person> riding a horse", "person riding a horse"),
    ("Café NAÏVE", "café naïve"),  # accents stay; the wordpiece tokenizer strips them
    ("...!!!", ""),
    ("", ""),
])
def test_clean_caption_cases(raw, expected):
    assert clean_caption(raw, 30) == expected


def test_clean_caption_truncates_to_max_words():
    text = " ".join(f"w{i}" for i in range(40))
    assert clean_caption(text, 30).split() == [f"w{i}" for i in range(30)]
    assert clean_caption("a b c", 2) == "a b"


def test_decode_text_rejects_invalid_utf8_and_accepts_bom():
    assert decode_text("\ufeffhello".encode("utf-8")) == "hello"
    with pytest.raises(CaptionError) as e:
        decode_text(b"caf\xe9 au lait")  # latin-1 bytes
    assert e.value.reason == "bad_utf8"


def test_pick_caption_reasons_and_choice():
    with pytest.raises(CaptionError) as e:
        pick_caption([], 30)
    assert e.value.reason == "missing_caption"
    with pytest.raises(CaptionError) as e:
        pick_caption(["  ", "?!"], 30)
    assert e.value.reason == "empty_caption"
    # empty candidates are ignored when another one is usable
    assert pick_caption(["...", "A cat."], 30) == "a cat"
    picks = {pick_caption(["One", "Two", "Three"], 30, random.Random(s)) for s in range(40)}
    assert picks == {"one", "two", "three"}


def test_captions_from_json_layouts():
    assert captions_from_json({"caption": "a"}) == ["a"]
    assert captions_from_json({"caption": ["a", "b", 3]}) == ["a", "b"]
    assert captions_from_json({"captions": ["x"], "caption": "y"}) == ["x"]
    assert captions_from_json({"caption": None}) == []  # img2dataset writes null for no caption
    assert captions_from_json(["not", "a", "dict"]) == []
