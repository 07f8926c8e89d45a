"""Image decoding and the paper's augmentations, on PIL images, without torchvision.

Per sample, in a DataLoader worker:
  bytes -> ``decode_image`` -> ``TrainTransform`` (RandomResizedCrop, horizontal flip,
  RandAugment N=2 M=7) or ``EvalTransform`` (resize to R x R) -> uint8 array [R, R, 3].
Per batch: ``to_normalized_tensor`` stacks the arrays and applies CLIP's mean/std in one
vectorised step, which is cheaper than normalising image by image.

Why PIL: every op ALBEF uses exists in Pillow (affine warps, enhancers, equalize,
autocontrast) and runs in C on the decoded image, so a CPU worker does not need torch
kernels, and nothing here depends on torchvision (not installable next to every torch
build). Batched GPU augmentation (e.g. kornia) would move work off the CPU but also onto the
training GPU, and it needs fixed-size inputs, while decoding yields images of any size.

All randomness comes from the ``random.Random`` passed in, so an augmentation is a pure
function of the sample's seed: resuming a run reproduces it exactly.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .skips import SkipSample

# CLIP's normalisation constants (ALBEF normalises with the same values)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_FILL = (128, 128, 128)  # colour of the area that geometric ops uncover


class ImageDecodeError(SkipSample):
    """Undecodable, truncated or unsupported image bytes (skip reason ``bad_image``)."""

    def __init__(self, detail: str = ""):
        super().__init__("bad_image", detail)


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode to an RGB PIL image; raise :class:`ImageDecodeError` on any failure.

    ``min_side`` > 0 lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale as long as the
    shorter side stays at least ``min_side`` (``Image.draft``): large photos then decode
    several times faster, at no cost to a crop that is resized down to the model's input.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()  # force the full decode here so truncation is caught now
        if img.mode != "RGB":
            # palette/greyscale/CMYK/alpha images: alpha is dropped, as in the paper's loader
            img = img.convert("RGB")
        return img
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """Box (left, upper, right, lower) covering a random share of the area in ``scale`` with
    an aspect ratio drawn log-uniformly from ``ratio`` (the Inception-style crop the paper
    uses). After 10 failed draws it falls back to the largest centred box within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


# ----------------------------------------------------------------------- RandAugment
# The op list of ALBEF's RandAugment. Each op takes (image, magnitude in [0, 1], rng).
# Magnitude scales: shear 0.3, translation 15% of the side, rotation 30 degrees, enhance
# factor 1 +- 0.9; the geometric ops and enhancers pick their direction at random.
def _sign(rng: random.Random) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _identity(img, mag, rng):
    return img


def _autocontrast(img, mag, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, mag, rng):
    return ImageOps.equalize(img)


def _brightness(img, mag, rng):
    return ImageEnhance.Brightness(img).enhance(1.0 + _sign(rng) * 0.9 * mag)


def _sharpness(img, mag, rng):
    return ImageEnhance.Sharpness(img).enhance(1.0 + _sign(rng) * 0.9 * mag)


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_FILL)


def _shear_x(img, mag, rng):
    return _affine(img, (1.0, _sign(rng) * 0.3 * mag, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img, mag, rng):
    return _affine(img, (1.0, 0.0, 0.0, _sign(rng) * 0.3 * mag, 1.0, 0.0))


def _shift(img, dx, dy):
    # whole-pixel shifts are exact with nearest-neighbour sampling, which Pillow runs about
    # 15x faster than its bilinear affine path
    return img.transform(img.size, Image.AFFINE, (1.0, 0.0, dx, 0.0, 1.0, dy), resample=Image.NEAREST,
                         fillcolor=_FILL)


def _translate_x(img, mag, rng):
    return _shift(img, round(_sign(rng) * 0.15 * mag * img.size[0]), 0)


def _translate_y(img, mag, rng):
    return _shift(img, 0, round(_sign(rng) * 0.15 * mag * img.size[1]))


def _rotate(img, mag, rng):
    return img.rotate(_sign(rng) * 30.0 * mag, resample=Image.BILINEAR, fillcolor=_FILL)


RAND_AUGMENT_OPS = {
    "identity": _identity, "autocontrast": _autocontrast, "equalize": _equalize,
    "brightness": _brightness, "sharpness": _sharpness, "shear_x": _shear_x, "shear_y": _shear_y,
    "translate_x": _translate_x, "translate_y": _translate_y, "rotate": _rotate,
}
_OP_LIST = tuple(RAND_AUGMENT_OPS.values())


def rand_augment(img: Image.Image, n: int, m: int, rng: random.Random, p: float = 0.5) -> Image.Image:
    """``n`` ops drawn with replacement, each applied with probability ``p`` at magnitude
    ``m`` on a 0-10 scale (as ALBEF's RandomAugment(2, 7) does)."""
    mag = m / 10.0
    for _ in range(n):
        op = _OP_LIST[rng.randrange(len(_OP_LIST))]
        if rng.random() < p:
            img = op(img, mag, rng)
    return img


# -------------------------------------------------------------------------- pipelines
@dataclass
class TrainTransform:
    """RandomResizedCrop(res, scale) -> horizontal flip -> RandAugment(n, m); uint8 output."""
    res: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    rand_aug_n: int = 2  # 0 disables RandAugment
    rand_aug_m: int = 7

    @property
    def decode_min_side(self) -> int:
        # keep twice the output side through JPEG draft decoding: crops down to a quarter
        # of the area then still come from at least R x R source pixels
        return 2 * self.res

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        box = random_resized_crop_box(img.size[0], img.size[1], self.scale, self.ratio, rng)
        img = img.resize((self.res, self.res), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_aug_n > 0:
            img = rand_augment(img, self.rand_aug_n, self.rand_aug_m, rng)
        return np.asarray(img, dtype=np.uint8)


@dataclass
class EvalTransform:
    """Resize to res x res (no crop, no augmentation), as the paper evaluates."""
    res: int

    @property
    def decode_min_side(self) -> int:
        return self.res

    def __call__(self, img: Image.Image, rng: random.Random = None) -> np.ndarray:
        return np.asarray(img.resize((self.res, self.res), Image.BICUBIC), dtype=np.uint8)


def to_normalized_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [R, R, 3] arrays -> float [B, 3, R, R], CLIP-normalised."""
    # make the uint8 batch channel-first before the float conversion: the copy then moves
    # a quarter of the bytes
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD]).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation, to [0, 1] (for looking at batches)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp_(0, 1)
