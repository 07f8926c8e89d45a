"""Decoding and augmentation without torchvision."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from albef_bal.data.transforms import (CLIP_MEAN, RAND_AUGMENT_OPS, EvalTransform, ImageDecodeError, TrainTransform,
                                       decode_image, denormalize, rand_augment, random_resized_crop_box,
                                       to_normalized_tensor)


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_decode_formats_and_modes():
    assert decode_image(_encode(_photo(), "JPEG")).mode == "RGB"
    assert decode_image(_encode(Image.new("L", (8, 8), 90), "PNG")).mode == "RGB"
    assert decode_image(_encode(Image.new("RGBA", (8, 8), (1, 2, 3, 0)), "PNG")).getpixel((0, 0)) == (1, 2, 3)
    assert decode_image(_encode(Image.new("P", (8, 8)), "PNG")).mode == "RGB"
    assert decode_image(_encode(_photo(), "WEBP")).size == (96, 64)
    jpg = _encode(_photo(), "JPEG")
    for bad in (b"", b"not an image", jpg[: len(jpg) // 3]):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(bad)
        assert e.value.reason == "bad_image"


def test_jpeg_draft_keeps_min_side():
    big = _encode(_photo(1024, 768), "JPEG")
    img = decode_image(big, min_side=256)
    assert min(img.size) >= 256 and img.size[0] < 1024  # decoded at a reduced scale
    assert decode_image(big).size == (1024, 768)


def test_random_resized_crop_box_bounds():
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_crop_box(300, 200, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
        area = (x1 - x0) * (y1 - y0) / (300 * 200)
        assert 0.19 <= area <= 1.0
    # an impossible request falls back to the largest centred box within the ratio range
    assert random_resized_crop_box(400, 50, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (166, 0, 233, 50)


def test_rand_augment_ops_keep_size_and_mode():
    img = _photo(40, 40).convert("RGB")
    rng = random.Random(1)
    for name, op in RAND_AUGMENT_OPS.items():
        out = op(img, 0.7, rng)
        assert out.size == img.size and out.mode == "RGB", name
    changed = [np.abs(np.asarray(rand_augment(img, 2, 7, random.Random(s)), dtype=int) - np.asarray(img)).sum() > 0
               for s in range(20)]
    assert 5 < sum(changed) < 20  # each op applies with probability 0.5 and identity is an op


def test_train_transform_is_seeded_and_shaped():
    img = _photo(120, 90)
    t = TrainTransform(res=32, scale=(0.5, 1.0))
    a = t(img, random.Random(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, t(img, random.Random(3)))
    assert not np.array_equal(a, t(img, random.Random(4)))
    square = _photo(96, 96)
    flat = TrainTransform(res=32, scale=(1.0, 1.0), hflip=False, rand_aug_n=0)
    assert np.array_equal(flat(square, random.Random(0)), EvalTransform(32)(square))  # full crop = resize
    e = EvalTransform(16)(img)
    assert e.shape == (16, 16, 3)


def test_normalisation_round_trip():
    mean_rgb = np.array([round(255 * m) for m in CLIP_MEAN], dtype=np.uint8)
    arrays = [np.broadcast_to(mean_rgb, (8, 8, 3)).copy(), np.full((8, 8, 3), 255, np.uint8)]
    x = to_normalized_tensor(arrays)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x[0].abs().max() < 0.01
    assert torch.allclose(denormalize(x)[1], torch.ones(3, 8, 8), atol=1e-5)
