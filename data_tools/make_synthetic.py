#!/usr/bin/env python
"""Write the synthetic coloured-shapes corpus (see albef_bal/data/synthetic.py).

    python data_tools/make_synthetic.py OUT_DIR [--train N] [--val N] [--test N] [--seed S]
        [--image-size PX] [--shard-size N] [--preset NAME] [--image-noise S] [--image-blur S]
        [--corrupt-fraction F] [--image-lowres PX] [--image-occlude] [--image-heavy-blur S]
        [--caption-dropout P] [--caption-replace P] [--caption-noise P] [--corrupt-eval] [--workers N]

Presets: `vision-{mild,medium,strong}` and `text-{mild,medium,strong}` make one modality less
informative in every split; `vision-shift-*` and `text-shift-*` corrupt the training split only.

Writes
    OUT_DIR/train/00000.tar ...   shards: {key}.jpg|png, .txt, .json (attributes), .cls
    OUT_DIR/val.json, val_images/     ALBEF-format retrieval split (several captions per image)
    OUT_DIR/test.json, test_images/
    OUT_DIR/vocab.txt             the corpus words after [PAD] [UNK] [CLS] [SEP] [MASK]
    OUT_DIR/manifest.json         counts, seed, knobs, class names

The output depends only on the arguments (not on --workers).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


from albef_bal.data.synthetic import PRESETS, preset_config
from albef_bal.data.synthetic_corpus import write_corpus


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=20000, help="training samples (default 20000)")
    p.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="side in pixels (default 64)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per training shard")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    g = p.add_argument_group("imbalance knobs (training split, or every split for the information presets "
                             "and with --corrupt-eval)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="none",
                   help="graded settings of the knobs below; explicit knobs override it")
    g.add_argument("--image-noise", type=float, help="std of pixel noise, share of the 0-255 range")
    g.add_argument("--image-blur", type=float, help="Gaussian blur radius in output pixels")
    g.add_argument("--corrupt-fraction", type=float, help="share of images that get the image knobs")
    g.add_argument("--image-lowres", type=int, help="reduce corrupted images to this side (one of the choices)")
    g.add_argument("--image-occlude", action="store_true", default=None,
                   help="cover one object of corrupted images (one of the choices)")
    g.add_argument("--image-heavy-blur", type=float, help="blur radius of corrupted images (one of the choices)")
    g.add_argument("--caption-dropout", type=float, help="chance each size/colour/position is left out")
    g.add_argument("--caption-replace", type=float, help="chance each size/colour word is replaced by a wrong one")
    g.add_argument("--caption-noise", type=float, help="chance each word is replaced by a random one")
    g.add_argument("--corrupt-eval", action="store_true", help="apply the knobs to val and test too")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> SyntheticConfig:
    cfg = preset_config(a.preset, seed=a.seed, image_size=a.image_size, min_objects=a.min_objects,
                        max_objects=a.max_objects, image_format=a.format)
    for f in dataclasses.fields(cfg.knobs):
        if getattr(a, f.name, None) is not None:
            setattr(cfg.knobs, f.name, getattr(a, f.name))
    cfg.corrupt_eval = cfg.corrupt_eval or a.corrupt_eval
    cfg.validate()
    return cfg


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = config_from_args(a)
        t0 = time.perf_counter()
        info = write_corpus(a.out_dir, cfg, a.train, a.val, a.test, a.shard_size, max(1, a.workers))
    except ValueError as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 2
    total = a.train + a.val + a.test
    dt = time.perf_counter() - t0
    print(f"wrote {total} samples to {a.out_dir} in {dt:.1f}s ({total / max(dt, 1e-9):.0f} samples/s, "
          f"{max(1, a.workers)} workers); train shards: {a.out_dir}/{info['train_shards']}, "
          f"vocab: {info['vocab_size']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
