"""The synthetic corpus: captions say what the attributes say, images show it, and the
output is a pure function of the seed."""
import io
import json
import os
import re
from collections import Counter

import numpy as np
from PIL import Image

from albef_bal.data import build_tokenizer
from albef_bal.data.shards import read_shard
from albef_bal.data.skips import SkipCounter
from albef_bal.data.synthetic import (ANCHOR_RELATIONS, CAPTION_WORD_TARGETS, COLOURS, COMPUTED_TARGETS, POSITIONS,
                                     PROBE_CLASSES, PROBE_TARGETS, SHAPES, SIZES, Knobs, SyntheticConfig, make_sample,
                                     preset_config)

# an independent reading of the caption grammar
_OBJ = r"a (?:(small|large) )?(?:(red|green|blue|yellow|purple|orange|white|black) )?(circle|square|triangle|diamond)"
_WHERE = r"(on the left|on the right|at the top|at the bottom|in the center)"
_PLACE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
          "in the center": "center"}


def parse_caption(text: str) -> dict:
    """{'objects': [(size, colour, shape, position or None)], 'relation': str or None}."""
    m = re.fullmatch(f"{_WHERE} there is {_OBJ}", text)
    if m:
        return {"objects": [(m[2], m[3], m[4], _PLACE[m[1]])], "relation": None}
    m = re.fullmatch(f"{_OBJ} (left of|right of|above|below) {_OBJ}(?: and {_OBJ} {_WHERE})?", text)
    if m:
        objs = [(m[1], m[2], m[3], None), (m[5], m[6], m[7], None)]
        if m[8]:
            objs.append((m[8], m[9], m[10], _PLACE[m[11]]))
        return {"objects": objs, "relation": m[4]}
    parts = text.split(" and ")
    objs = []
    for p in parts:
        m = re.fullmatch(f"{_OBJ} {_WHERE}", p)
        assert m, f"unparsable caption {text!r}"
        objs.append((m[1], m[2], m[3], _PLACE[m[4]]))
    return {"objects": objs, "relation": None}


def _truth(obj):
    return (obj["size"], obj["colour"], obj["shape"], obj["position"])


def _holds(relation, a, b):
    """Whether the relation is true of the drawn centres (not the generator's position names)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    return {"left of": dx > 0.2, "right of": dx < -0.2, "above": dy > 0.2, "below": dy < -0.2}[relation]


def test_captions_match_attributes_and_images():
    cfg = SyntheticConfig(seed=11, image_size=48, image_format="png")
    for i in range(150):
        s = make_sample(cfg, "val", i)
        rec = s["record"]
        objs = rec["objects"]
        assert s["captions"] == rec["clean_captions"] and len(s["captions"]) >= 2
        for cap in s["captions"]:
            parsed = parse_caption(cap)
            got = parsed["objects"]
            if parsed["relation"] is None:
                assert sorted(got) == sorted(_truth(o) for o in objs)
            else:
                assert [g[:3] for g in got[:2]] == [_truth(o)[:3] for o in objs[:2]]
                assert parsed["relation"] == rec["relation"] and _holds(rec["relation"], objs[0], objs[1])
                assert got[2:] == [_truth(o) for o in objs[2:]]
        # attributes and probe targets are consistent with the objects
        assert rec["num_objects"] == len(objs) == rec["probe"]["num_objects"] + 1
        assert rec["same_colour"] == (len({o["colour"] for o in objs}) < len(objs))
        # cls and the anchor_* targets name the object first in reading order, which the image shows
        order = ("left", "top", "center", "bottom", "right")
        anchor = min(objs, key=lambda o: order.index(o["position"]))
        assert objs[rec["anchor"]] is anchor
        assert rec["cls"] == rec["probe"]["anchor_shape"] == SHAPES.index(anchor["shape"])
        assert rec["probe"]["anchor_position"] == list(POSITIONS).index(anchor["position"])
        if len(objs) == 2:  # left of / above the other object, as drawn
            other = objs[1 - rec["anchor"]]
            rel = ANCHOR_RELATIONS[rec["probe"]["anchor_relation"]]
            assert rel in ("left of", "above") and _holds(rel, anchor, other)
        else:
            assert rec["probe"]["anchor_relation"] == 0
        assert set(rec["probe"]) == set(PROBE_TARGETS)
        assert all(0 <= v < PROBE_CLASSES[k] for k, v in rec["probe"].items())
        # the image shows each object's colour at its centre
        img = np.asarray(Image.open(io.BytesIO(s["image"])).convert("RGB")).astype(int)
        for o in objs:
            px = img[int(o["y"] * 48), int(o["x"] * 48)]
            assert np.abs(px - np.array(COLOURS[o["colour"]])).max() <= 12, (i, o)


def test_deterministic_for_a_seed_and_worker_count(tmp_path, data_tool):
    cfg = SyntheticConfig(seed=4, image_size=32)
    assert make_sample(cfg, "train", 7) == make_sample(cfg, "train", 7)
    assert make_sample(cfg, "train", 7)["image"] != make_sample(SyntheticConfig(seed=5, image_size=32), "train", 7)["image"]
    outs = []
    for workers in ("1", "2"):
        out = str(tmp_path / f"w{workers}")
        args = [out, "--train", "40", "--val", "6", "--test", "6", "--shard-size", "10", "--image-size", "32",
                "--seed", "9", "--workers", workers]
        assert data_tool("make_synthetic").main(args) == 0
        outs.append(out)
    for rel in ["train/00000.tar", "train/00003.tar", "val.json", "test.json", "vocab.txt", "test_images/000005.jpg"]:
        with open(os.path.join(outs[0], rel), "rb") as a, open(os.path.join(outs[1], rel), "rb") as b:
            assert a.read() == b.read(), rel
    manifest = json.load(open(os.path.join(outs[0], "manifest.json")))
    assert manifest["counts"] == {"train": 40, "val": 6, "test": 6} and manifest["seed"] == 9
    assert manifest["train_shards"] == "train/{00000..00003}.tar"


def test_shards_vocab_and_labels(data_corpus):
    tok = build_tokenizer(data_corpus["vocab"])
    assert tok.vocab_size < 64
    classes = Counter()
    n = 0
    for url in data_corpus["urls"]:
        for raw in read_shard(url, SkipCounter()):
            n += 1
            meta = json.loads(raw["json"])
            assert int(raw["cls"]) == meta["cls"]
            classes[meta["cls"]] += 1
            assert raw["txt"].decode() == meta["captions"][0]
            for cap in meta["captions"]:
                ids, _ = tok.encode([cap], 32, True)
                assert tok.unk_token_id not in ids[0].tolist(), cap
                assert ids.shape[1] <= 25  # the longest caption fits ALBEF's max_len
    assert n == data_corpus["train"]
    assert sorted(classes) == [0, 1, 2, 3] and min(classes.values()) >= 0.15 * n  # 4 balanced classes
    cfg = SyntheticConfig(seed=0, knobs=Knobs(caption_noise=0.5))
    for i in range(50):  # even noisy captions use corpus words only
        for cap in make_sample(cfg, "train", i)["captions"]:
            assert tok.unk_token_id not in tok.encode([cap], 40, True)[0][0].tolist()


def test_shift_knobs_are_graded_and_train_only():
    clean = SyntheticConfig(seed=2, image_size=32)
    text_lag = SyntheticConfig(seed=2, image_size=32, knobs=Knobs(caption_dropout=1.0))
    for i in range(20):
        caps = make_sample(text_lag, "train", i)["captions"]
        assert all(not set(c.split()) & {"small", "large", *COLOURS, "left", "right", "top", "bottom", "center"}
                   for c in caps if " of " not in c)
        assert make_sample(text_lag, "test", i)["captions"] == make_sample(clean, "test", i)["captions"]

    def pixels(cfg, split, i):
        return np.asarray(Image.open(io.BytesIO(make_sample(cfg, split, i)["image"]))).astype(float)

    errors = []
    for noise in (0.05, 0.15, 0.3):
        cfg = SyntheticConfig(seed=2, image_size=32, knobs=Knobs(image_noise=noise))
        errors.append(np.mean([np.abs(pixels(cfg, "train", i) - pixels(clean, "train", i)).mean() for i in range(5)]))
        assert np.array_equal(pixels(cfg, "val", 0), pixels(clean, "val", 0))  # eval splits stay clean
    assert errors[0] < errors[1] < errors[2]
    half = SyntheticConfig(seed=2, image_size=32, knobs=Knobs(image_blur=1.0, corrupt_fraction=0.5))
    share = np.mean([make_sample(half, "train", i)["record"]["corrupted"] for i in range(200)])
    assert 0.35 < share < 0.65


def test_probe_target_families_are_disjoint_and_caption_words_are_words():
    assert set(COMPUTED_TARGETS).isdisjoint(CAPTION_WORD_TARGETS)
    cfg = SyntheticConfig(seed=3, image_size=32, max_objects=1)
    names = {"anchor_shape": SHAPES, "anchor_colour": list(COLOURS), "anchor_size": list(SIZES)}
    for i in range(30):  # in a one-object caption every caption-word target is a word of it
        s = make_sample(cfg, "test", i)
        words = set(s["captions"][0].split())
        for target, values in names.items():
            assert values[s["record"]["probe"][target]] in words


def _pixels(cfg, split, i):
    return np.asarray(Image.open(io.BytesIO(make_sample(cfg, split, i)["image"]))).astype(float)


def test_information_presets_degrade_every_split_and_keep_the_scenes():
    clean = preset_config("none", seed=2, image_size=64, max_objects=2)
    for grade, share in (("mild", 0.25), ("medium", 0.5), ("strong", 0.75)):
        cfg = preset_config(f"vision-{grade}", seed=2, image_size=64, max_objects=2)
        assert cfg.corrupt_eval
        for split in ("train", "test"):
            recs = [make_sample(cfg, split, i)["record"] for i in range(200)]
            got = np.mean([r["corrupted"] for r in recs])
            assert abs(got - share) < 0.1, (grade, split, got)
            assert {r["degradation"] for r in recs if r["corrupted"]} == {"lowres", "occlude", "heavy_blur"}
    vision = preset_config("vision-strong", seed=2, image_size=64, max_objects=2)
    for i in range(40):
        a, b = make_sample(vision, "test", i), make_sample(clean, "test", i)
        # the same scene and captions; only the image of a corrupted sample differs
        assert a["captions"] == b["captions"] and a["record"]["objects"] == b["record"]["objects"]
        differs = not np.array_equal(_pixels(vision, "test", i), _pixels(clean, "test", i))
        assert differs == a["record"]["corrupted"]
        if a["record"]["degradation"] == "occlude":  # the covered object's colour is gone from its centre
            o = a["record"]["objects"][0] if len(a["record"]["objects"]) == 1 else None
            if o is not None:
                px = _pixels(vision, "test", i)[int(o["y"] * 64), int(o["x"] * 64)]
                assert np.abs(px - np.array(COLOURS[o["colour"]])).max() > 30
    text = preset_config("text-strong", seed=2, image_size=64, max_objects=2)
    changed = 0
    for i in range(40):
        a, b = make_sample(text, "test", i), make_sample(clean, "test", i)
        assert a["image"] == b["image"] and a["record"]["clean_captions"] == b["captions"]
        changed += a["captions"] != b["captions"]
    assert changed >= 30  # most test captions lose or change attributes


def test_caption_replace_swaps_attribute_words_for_wrong_ones():
    cfg = SyntheticConfig(seed=5, image_size=32, max_objects=1, knobs=Knobs(caption_replace=1.0))
    for i in range(30):
        s = make_sample(cfg, "train", i)
        o = s["record"]["objects"][0]
        words = s["captions"][0].split()
        assert o["shape"] in words and o["size"] not in words and o["colour"] not in words
        assert len(set(words) & set(SIZES)) == 1 and len(set(words) & set(COLOURS)) == 1
