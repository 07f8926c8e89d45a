"""A synthetic, learnable image-text corpus: coloured shapes and captions that describe them.

Each image shows one to three objects on a grey background. An object has a shape (4), a
colour (8), a size (2) and one of 5 positions (distinct within an image), plus a little
jitter of place and size so that no two images are pixel-identical. Captions are generated
from the objects with a few templates, e.g.

    a small red circle on the left and a large blue square at the top
    a small red circle left of a large blue square
    on the left there is a small red circle

Every sample carries its ground truth in JSON: the objects and integer probe targets
(:data:`PROBE_TARGETS`). The objects are listed in generation order, which the image does
not show; every target that names one object therefore refers to the *anchor*, the object
that comes first in reading order (left, top, center, bottom, right), which both the image
and the caption determine. ``cls`` = the anchor's shape (4 balanced classes) is the label of
labelled diagnostics.

Which probe targets a caption spells out (:data:`CAPTION_WORD_TARGETS`): the anchor's shape,
colour, size and position are words of the caption (in a one-object caption verbatim), so a
text probe can read them off the input without any learning. The others
(:data:`COMPUTED_TARGETS`: number of objects, shared colour, shared shape, where the anchor is
relative to the other object) must be computed from the caption by counting, comparing or
relating words, and from the image by seeing.

Imbalance presets (:data:`PRESETS`) make one modality harder on purpose, in two families:

- *information* presets ``vision-{mild,medium,strong}`` and ``text-{mild,medium,strong}``
  make the modality less informative in every split alike: a share of the images is reduced
  to low resolution, has an object covered or is heavily blurred; caption attribute phrases
  are dropped or replaced by wrong ones. The clean concepts can no longer be recovered from
  that modality alone, during training or at test time.
- *shift* presets ``vision-shift-*`` and ``text-shift-*`` corrupt the training split only
  (pixel noise and mild blur; caption dropout and word noise) and leave the evaluation
  splits clean: a train/test shift rather than a loss of information.

Everything is a pure function of (seed, split, index): a sample does not depend on which
process generated it or on how many there were.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .seeding import derive_seed
from .tokenizer import SPECIAL_TOKENS

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 215, 40),
    "purple": (145, 60, 195), "orange": (250, 140, 20), "white": (248, 248, 248), "black": (15, 15, 15),
}
SIZES = {"small": 0.085, "large": 0.14}  # radius as a share of the image side
POSITIONS = {"left": (0.19, 0.5), "right": (0.81, 0.5), "top": (0.5, 0.19), "bottom": (0.5, 0.81),
             "center": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
RELATIONS = ("left of", "right of", "above", "below")
_JITTER = 0.015  # of the image side
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
# written into the manifest; bumped when the records change (2: anchor-based cls and probe
# targets), so that an older corpus on disk is rewritten rather than reused
CORPUS_VERSION = 2


@dataclass
class Knobs:
    """Graded ways to make one modality harder (0 = off)."""
    image_noise: float = 0.0  # std of Gaussian pixel noise, as a share of the 0-255 range
    image_blur: float = 0.0  # Gaussian blur radius in pixels of the output image
    corrupt_fraction: float = 1.0  # share of images that get the image knobs
    # information loss on the corrupted images: each gets ONE of the enabled degradations,
    # chosen at random (low resolution, an occluded object, a heavy blur)
    image_lowres: int = 0  # side in pixels the image is reduced to and enlarged back from
    image_occlude: bool = False  # one object covered by a square of the background colour
    image_heavy_blur: float = 0.0  # Gaussian blur radius in pixels (one of the choices)
    caption_dropout: float = 0.0  # chance that each size / colour / position phrase is left out
    caption_replace: float = 0.0  # chance that each size / colour word is replaced by a wrong one
    caption_noise: float = 0.0  # chance that each caption word is replaced by a random corpus word

    def validate(self) -> None:
        for name in ("corrupt_fraction", "caption_dropout", "caption_replace", "caption_noise"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("image_noise", "image_blur", "image_heavy_blur"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_lowres and not 2 <= self.image_lowres <= 64:
            raise ValueError(f"image_lowres must be 0 (off) or 2..64 pixels, got {self.image_lowres}")

    @property
    def degradations(self) -> list[str]:
        """The enabled information-loss degradations of an image, in a fixed order."""
        return [name for name, on in (("lowres", self.image_lowres > 0), ("occlude", self.image_occlude),
                                      ("heavy_blur", self.image_heavy_blur > 0)) if on]

    @property
    def touches_images(self) -> bool:
        return self.corrupt_fraction > 0 and (self.image_noise > 0 or self.image_blur > 0
                                              or bool(self.degradations))

    @property
    def touches_captions(self) -> bool:
        return bool(self.caption_dropout or self.caption_replace or self.caption_noise)


# The degradations of the information presets, at 64 px: a 12 px reduction loses shapes and
# sizes (a small object is 2 px across), an occluder removes one object, a blur of 2.5 px
# leaves colour blobs only. The presets differ in how many images or phrases they touch.
_VISION_LOSS = dict(image_lowres=12, image_occlude=True, image_heavy_blur=2.5)

# Graded presets: information presets (every split, see ALL_SPLIT_PRESETS) and the train-only
# shift presets. For scale: noise 0.35 with blur 1.6 kept a tiny ALBEF at chance for six
# minutes of CPU training, so the shift presets stay well below that.
PRESETS = {
    "none": Knobs(),
    "vision-mild": Knobs(corrupt_fraction=0.25, **_VISION_LOSS),
    "vision-medium": Knobs(corrupt_fraction=0.5, **_VISION_LOSS),
    "vision-strong": Knobs(corrupt_fraction=0.75, **_VISION_LOSS),
    "text-mild": Knobs(caption_dropout=0.25, caption_replace=0.05),
    "text-medium": Knobs(caption_dropout=0.5, caption_replace=0.1),
    "text-strong": Knobs(caption_dropout=0.75, caption_replace=0.2),
    "vision-shift-mild": Knobs(image_noise=0.06, image_blur=0.5),
    "vision-shift-medium": Knobs(image_noise=0.12, image_blur=0.9),
    "vision-shift-strong": Knobs(image_noise=0.2, image_blur=1.2),
    "text-shift-mild": Knobs(caption_dropout=0.25),
    "text-shift-medium": Knobs(caption_dropout=0.5, caption_noise=0.05),
    "text-shift-strong": Knobs(caption_dropout=0.75, caption_noise=0.15),
}
# presets that make a modality less informative everywhere: their knobs apply to the
# validation and test splits too (the shift presets touch the training split only)
ALL_SPLIT_PRESETS = frozenset(f"{m}-{g}" for m in ("vision", "text") for g in ("mild", "medium", "strong"))


def preset_config(preset: str, **kwargs) -> "SyntheticConfig":
    """The :class:`SyntheticConfig` of an imbalance preset (``kwargs``: seed, sizes...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown imbalance preset {preset!r}; choose from {', '.join(PRESETS)}")
    return SyntheticConfig(knobs=replace(PRESETS[preset]), corrupt_eval=preset in ALL_SPLIT_PRESETS, **kwargs)


@dataclass
class SyntheticConfig:
    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    image_format: str = "jpg"  # jpg or png
    knobs: Knobs = field(default_factory=Knobs)
    corrupt_eval: bool = False  # also apply the knobs to the val and test splits

    def validate(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {self.min_objects}, {self.max_objects}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be jpg or png, got {self.image_format!r}")
        self.knobs.validate()


# ------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> list[dict]:
    """Objects with shape, colour, size, named position and the jittered centre/radius."""
    n = rng.randint(min_objects, max_objects)
    places = rng.sample(list(POSITIONS), n)
    objects = []
    for place in places:
        size = rng.choice(list(SIZES))
        x, y = POSITIONS[place]
        objects.append({
            "shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": size, "position": place,
            "x": round(x + rng.uniform(-_JITTER, _JITTER), 4), "y": round(y + rng.uniform(-_JITTER, _JITTER), 4),
            "radius": round(SIZES[size] * rng.uniform(0.95, 1.05), 4),
        })
    return objects


def relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``, from their named positions (horizontal wins ties)."""
    ax, ay = POSITIONS[a["position"]]
    bx, by = POSITIONS[b["position"]]
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


READING_ORDER = ("left", "top", "center", "bottom", "right")  # by x, then y, of the named positions
# anchor relative to the other object of a two-object scene (a one-object scene has none);
# the anchor comes first in reading order, so it is left of or above the other object
ANCHOR_RELATIONS = ("none", "left of", "above")
# integer probe targets, by what a caption shows of them
CAPTION_WORD_TARGETS = ("anchor_shape", "anchor_colour", "anchor_size", "anchor_position")
COMPUTED_TARGETS = ("num_objects", "same_colour", "same_shape", "anchor_relation")
PROBE_TARGETS = COMPUTED_TARGETS + CAPTION_WORD_TARGETS
PROBE_CLASSES = {"num_objects": 3, "same_colour": 2, "same_shape": 2, "anchor_relation": len(ANCHOR_RELATIONS),
                 "anchor_shape": len(SHAPES), "anchor_colour": len(COLOURS), "anchor_size": len(SIZES),
                 "anchor_position": len(POSITIONS)}


def anchor_index(objects: list[dict]) -> int:
    """Index of the anchor object: the first in reading order (the image shows which it is)."""
    return min(range(len(objects)), key=lambda i: READING_ORDER.index(objects[i]["position"]))


def attributes(objects: list[dict]) -> dict:
    """Ground truth and probe targets of a scene."""
    colours = [o["colour"] for o in objects]
    shapes = [o["shape"] for o in objects]
    rel = relation(objects[0], objects[1]) if len(objects) > 1 else None
    a = anchor_index(objects)
    anchor = objects[a]
    if len(objects) == 2:
        anchor_rel = relation(anchor, objects[1 - a])
        assert anchor_rel in ANCHOR_RELATIONS, anchor_rel
    else:  # one object, or three (where "the other" is not one object)
        anchor_rel = "none"
    return {
        "objects": objects,
        "num_objects": len(objects),
        "same_colour": len(set(colours)) < len(colours),
        "same_shape": len(set(shapes)) < len(shapes),
        "relation": rel,  # of the first two objects as generated (what the relational caption says)
        "anchor": a,
        "cls": SHAPES.index(anchor["shape"]),
        "probe": {
            "num_objects": len(objects) - 1,
            "same_colour": int(len(set(colours)) < len(colours)),
            "same_shape": int(len(set(shapes)) < len(shapes)),
            "anchor_relation": ANCHOR_RELATIONS.index(anchor_rel),
            "anchor_shape": SHAPES.index(anchor["shape"]),
            "anchor_colour": list(COLOURS).index(anchor["colour"]),
            "anchor_size": list(SIZES).index(anchor["size"]),
            "anchor_position": list(POSITIONS).index(anchor["position"]),
        },
    }


# ------------------------------------------------------------------------ captions
def _phrase(o: dict, rng: Optional[random.Random], dropout: float, replace_p: float = 0.0) -> str:
    words = ["a"]
    for kind, choices in (("size", SIZES), ("colour", COLOURS)):
        if rng and dropout and rng.random() < dropout:
            continue
        word = o[kind]
        if rng and replace_p and rng.random() < replace_p:  # a wrong word of the same kind
            word = rng.choice([w for w in choices if w != word])
        words.append(word)
    words.append(o["shape"])
    return " ".join(words)


def _where(o: dict, rng: Optional[random.Random], dropout: float) -> str:
    if rng and dropout and rng.random() < dropout:
        return ""
    return " " + POSITION_PHRASES[o["position"]]


def captions_for(objects: list[dict], rng: Optional[random.Random] = None, knobs: Optional[Knobs] = None
                 ) -> list[str]:
    """The distinct captions of a scene (positional list, relational, reversed order).

    With ``rng`` and ``knobs``, attribute dropout, attribute replacement and word noise are
    applied."""
    p = knobs.caption_dropout if (knobs and rng) else 0.0
    r = knobs.caption_replace if (knobs and rng) else 0.0

    def phrase(o: dict) -> str:
        return _phrase(o, rng, p, r)

    out = [" and ".join(phrase(o) + _where(o, rng, p) for o in objects)]
    if len(objects) == 1:
        o = objects[0]
        where = _where(o, rng, p).strip()
        out.append(f"{where} there is {phrase(o)}" if where else f"there is {phrase(o)}")
    else:
        a, b = objects[0], objects[1]
        rel = "and" if (rng and p and rng.random() < p) else relation(a, b)
        text = f"{phrase(a)} {rel} {phrase(b)}"
        if len(objects) == 3:
            text += f" and {phrase(objects[2])}{_where(objects[2], rng, p)}"
        out.append(text)
        out.append(" and ".join(phrase(o) + _where(o, rng, p) for o in reversed(objects)))
    if knobs and rng and knobs.caption_noise:
        words = corpus_words()
        out = [" ".join(rng.choice(words) if rng.random() < knobs.caption_noise else w for w in c.split())
               for c in out]
    return list(dict.fromkeys(out))  # distinct, in order


def corpus_words() -> list[str]:
    """Every word a caption can contain, sorted."""
    words = {"a", "and", "there", "is", *SHAPES, *COLOURS, *SIZES}
    for text in (*POSITION_PHRASES.values(), *RELATIONS):
        words.update(text.split())
    return sorted(words)


def write_vocab(path: str) -> int:
    """A wordpiece vocabulary of the corpus words after BERT's special tokens; returns its size."""
    tokens = [*SPECIAL_TOKENS, *corpus_words()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens)


# -------------------------------------------------------------------------- images
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        R = 1.15 * r  # inscribed in a slightly larger circle so it looks as big as the others
        return [(cx, cy - R), (cx + 0.866 * R, cy + 0.5 * R), (cx - 0.866 * R, cy + 0.5 * R)]
    R = 1.1 * r  # diamond
    return [(cx, cy - R), (cx + R, cy), (cx, cy + R), (cx - R, cy)]


def render(objects: list[dict], size: int, background: int, knobs: Optional[Knobs] = None,
           noise_rng: Optional[np.random.Generator] = None, degradation: Optional[str] = None,
           occluded: int = 0) -> Image.Image:
    """Draw the scene; small images are drawn at twice the size and reduced (smooth edges).

    ``degradation`` (one of ``knobs.degradations``) removes information: ``lowres`` reduces
    the image to ``knobs.image_lowres`` pixels and enlarges it back, ``occlude`` covers
    object number ``occluded`` with a grey square, ``heavy_blur`` blurs by
    ``knobs.image_heavy_blur`` pixels."""
    ss = 2 if size < 128 else 1
    side = size * ss
    img = Image.new("RGB", (side, side), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(objects):
        if degradation == "occlude" and i == occluded:
            # a visible occluder the size of the largest shape's bounding box, not the object
            h = 1.2 * o["radius"] * side
            cx, cy = o["x"] * side, o["y"] * side
            grey = background + 45 if background < 130 else background - 45
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=(grey,) * 3)
            continue
        cx, cy, r = o["x"] * side, o["y"] * side, o["radius"] * side
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            h = 0.85 * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=fill)
    if ss > 1:
        img = img.reduce(ss)
    if degradation == "lowres":
        img = img.resize((knobs.image_lowres,) * 2, Image.BOX).resize((size, size), Image.BILINEAR)
    elif degradation == "heavy_blur":
        img = img.filter(ImageFilter.GaussianBlur(knobs.image_heavy_blur))
    if knobs is not None:
        if knobs.image_blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(knobs.image_blur))
        if knobs.image_noise > 0:
            rng = noise_rng if noise_rng is not None else np.random.default_rng(0)
            noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 255.0 * knobs.image_noise, (size, size, 3))
            img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 chroma: the default 4:2:0 smears the colour of small shapes at 64 px
        img.save(buf, "JPEG", quality=92, subsampling=0)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------- samples
def make_sample(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """One sample: ``image`` (encoded bytes), ``captions`` (what training reads), and the
    JSON record with attributes, probe targets and the clean captions."""
    rng = random.Random(derive_seed(cfg.seed, _SPLIT_CODES[split], index))
    objects = sample_scene(rng, cfg.min_objects, cfg.max_objects)
    background = rng.randint(95, 165)
    clean = captions_for(objects)
    knobs = cfg.knobs if (split == "train" or cfg.corrupt_eval) else Knobs()
    captions = captions_for(objects, rng, knobs) if knobs.touches_captions else clean
    corrupted = knobs.touches_images and rng.random() < knobs.corrupt_fraction
    noise_rng = np.random.default_rng(derive_seed(cfg.seed, _SPLIT_CODES[split], index, 1)) \
        if corrupted and knobs.image_noise > 0 else None
    degradation, occluded = None, 0
    if corrupted and knobs.degradations:  # its own generator: the scene's draws stay as they were
        pick = random.Random(derive_seed(cfg.seed, _SPLIT_CODES[split], index, 2))
        degradation = pick.choice(knobs.degradations)
        occluded = pick.randrange(len(objects))
    img = render(objects, cfg.image_size, background, knobs if corrupted else None, noise_rng, degradation,
                 occluded)
    record = {"image_id": index, **attributes(objects), "background": background, "corrupted": corrupted,
              "degradation": degradation, "clean_captions": clean}
    return {"image": encode_image(img, cfg.image_format), "captions": captions, "record": record}


def shard_members(sample: dict, fmt: str) -> dict[str, bytes]:
    """WebDataset members of a training sample: image, txt (first caption), json, cls."""
    record = dict(sample["record"], captions=sample["captions"])
    return {
        fmt: sample["image"],
        "txt": sample["captions"][0].encode("utf-8"),
        "json": json.dumps(record, separators=(",", ":")).encode("utf-8"),
        "cls": str(record["cls"]).encode("ascii"),
    }


def manifest(cfg: SyntheticConfig, counts: dict[str, int], shard_size: int, num_shards: int, vocab_size: int) -> dict:
    return {
        "generator": "albef_bal.data.synthetic", "version": CORPUS_VERSION, "seed": cfg.seed, "image_size": cfg.image_size,
        "image_format": cfg.image_format, "objects_per_image": [cfg.min_objects, cfg.max_objects],
        "counts": counts, "shard_size": shard_size,
        "train_shards": f"train/{{00000..{num_shards - 1:05d}}}.tar" if num_shards else None,
        "val": "val.json", "test": "test.json", "vocab": "vocab.txt", "vocab_size": vocab_size,
        "knobs": asdict(cfg.knobs), "knobs_on_eval_splits": cfg.corrupt_eval,
        "cls": {"meaning": "shape of the anchor object (first in reading order: left, top, center, bottom, "
                           "right)", "names": list(SHAPES)},
        "probe_targets": {"computed": list(COMPUTED_TARGETS), "caption_words": list(CAPTION_WORD_TARGETS)},
        "attributes": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                       "positions": list(POSITIONS), "relations": list(RELATIONS)},
    }
