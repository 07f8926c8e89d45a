#!/usr/bin/env python
"""Convert an ALBEF-format annotation JSON and its image folder into WebDataset shards.

    python data_tools/json_to_wds.py ANNOTATION.json IMAGE_ROOT OUT_DIR
        [--shard-size N | --shard-mb MB] [--group-by-image] [--workers N] [--overwrite]

ANNOTATION.json is a list of {"image": path relative to IMAGE_ROOT, "caption": str or list,
"image_id": optional, ...}. Each entry becomes one sample (--group-by-image merges entries
of the same image into one sample with all its captions, the layout for retrieval splits):

    {key}.jpg|png|webp   the image file's bytes, unchanged
    {key}.txt            the first caption
    {key}.json           {"image", "image_id", "captions": [...], other entry fields}

Shards hold --shard-size samples (default 1000), or as many as fit in --shard-mb. The
assignment of samples to shards is fixed by the input, and each shard appears under its
final name only when complete, so an interrupted run is resumed by running the same command
again: finished shards are kept. Images that are missing or unreadable are left out and
listed at the end (exit status 1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from multiprocessing import get_context

from tqdm import tqdm

from albef_bal.data.tario import ShardWriter

PLAN_FILE = "_plan.json"
PROGRESS_DIR = "_progress"
_OVERHEAD = 1536  # tar headers + txt + json per sample, for --shard-mb planning


def load_samples(path: str, group_by_image: bool) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries")
    samples: list[dict] = []
    by_image: dict = {}
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "caption" not in e:
            raise ValueError(f"{path}: entry {n} needs a string 'image' and a 'caption', got {str(e)[:120]}")
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: entry {n}: 'caption' must be a string or a list of strings")
        ident = e.get("image_id", e["image"])
        if group_by_image and ident in by_image:
            by_image[ident]["captions"].extend(caps)
            continue
        extra = {k: v for k, v in e.items() if k not in ("image", "caption")}
        s = {"image": e["image"], "captions": list(caps), **extra}
        samples.append(s)
        if group_by_image:
            by_image[ident] = s
    return samples


def plan_shards(samples: list[dict], image_root: str, shard_size: int, shard_mb: float) -> list[tuple[int, int]]:
    """[(start, stop)] sample ranges, by count or by the bytes of the image files."""
    if not shard_mb:
        return [(i, min(i + shard_size, len(samples))) for i in range(0, len(samples), shard_size)]
    limit = shard_mb * 1024 * 1024
    ranges, start, size = [], 0, 0
    for i, s in enumerate(samples):
        try:
            n = os.path.getsize(os.path.join(image_root, s["image"])) + _OVERHEAD
        except OSError:
            n = _OVERHEAD
        if i > start and size + n > limit:
            ranges.append((start, i))
            start, size = i, 0
        size += n
    if start < len(samples):
        ranges.append((start, len(samples)))
    return ranges


def _write_shard(job) -> dict:
    out_dir, image_root, shard, start, samples = job
    missing = []
    written = 0
    with ShardWriter(os.path.join(out_dir, f"{shard:05d}.tar")) as w:
        for k, s in enumerate(samples):
            path = os.path.join(image_root, s["image"])
            ext = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                missing.append({"image": s["image"], "error": str(e)})
                continue
            meta = json.dumps(s, ensure_ascii=False).encode("utf-8")
            w.write(f"{start + k:09d}", {ext: data, "txt": s["captions"][0].encode("utf-8"), "json": meta})
            written += 1
    result = {"shard": shard, "written": written, "missing": missing}
    with open(os.path.join(out_dir, PROGRESS_DIR, f"{shard:05d}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotation")
    p.add_argument("image_root")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-mb", type=float, default=0.0, help="shard by size instead: at most this many MiB")
    p.add_argument("--group-by-image", action="store_true", help="one sample per image with all its captions")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="start over if OUT_DIR holds shards of another plan")
    a = p.parse_args(argv)
    if a.shard_size < 1 or a.shard_mb < 0:
        print("json_to_wds: error: --shard-size must be >= 1 and --shard-mb >= 0", file=sys.stderr)
        return 2
    try:
        samples = load_samples(a.annotation, a.group_by_image)
    except (OSError, ValueError) as e:
        print(f"json_to_wds: error: {e}", file=sys.stderr)
        return 2
    ranges = plan_shards(samples, a.image_root, a.shard_size, a.shard_mb)
    digest = hashlib.sha256(json.dumps([samples, ranges], sort_keys=True).encode()).hexdigest()

    os.makedirs(os.path.join(a.out_dir, PROGRESS_DIR), exist_ok=True)
    plan_path = os.path.join(a.out_dir, PLAN_FILE)
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            old = json.load(f).get("digest")
        if old != digest:
            if not a.overwrite:
                print(f"json_to_wds: error: {a.out_dir} holds shards of a different input or sharding; "
                      "use --overwrite to replace them", file=sys.stderr)
                return 2
            for name in os.listdir(a.out_dir):
                if name.endswith(".tar"):
                    os.remove(os.path.join(a.out_dir, name))
            for name in os.listdir(os.path.join(a.out_dir, PROGRESS_DIR)):
                os.remove(os.path.join(a.out_dir, PROGRESS_DIR, name))
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump({"digest": digest, "annotation": os.path.abspath(a.annotation), "shards": len(ranges),
                   "samples": len(samples)}, f)

    def done(shard: int) -> bool:
        return (os.path.exists(os.path.join(a.out_dir, f"{shard:05d}.tar"))
                and os.path.exists(os.path.join(a.out_dir, PROGRESS_DIR, f"{shard:05d}.json")))

    jobs = [(a.out_dir, a.image_root, s, start, samples[start:stop])
            for s, (start, stop) in enumerate(ranges) if not done(s)]
    resumed = len(ranges) - len(jobs)
    if resumed:
        print(f"resuming: {resumed} of {len(ranges)} shards already written")
    with tqdm(total=sum(len(j[4]) for j in jobs), unit="sample", desc="json_to_wds", disable=None) as bar:
        if a.workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                _write_shard(j)
                bar.update(len(j[4]))
        else:
            with get_context("fork").Pool(min(a.workers, len(jobs))) as pool:
                for r, n in zip(pool.imap(_write_shard, jobs), (len(j[4]) for j in jobs)):
                    bar.update(n)

    written, missing = 0, []
    for s in range(len(ranges)):
        with open(os.path.join(a.out_dir, PROGRESS_DIR, f"{s:05d}.json"), encoding="utf-8") as f:
            r = json.load(f)
        written += r["written"]
        missing += r["missing"]
    pattern = os.path.join(a.out_dir, f"{{00000..{len(ranges) - 1:05d}}}.tar")
    manifest = {"annotation": os.path.abspath(a.annotation), "image_root": os.path.abspath(a.image_root),
                "samples": written, "missing_images": len(missing), "shards": len(ranges), "pattern": pattern,
                "group_by_image": a.group_by_image}
    with open(os.path.join(a.out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {written} samples in {len(ranges)} shards: {pattern}")
    if missing:
        print(f"{len(missing)} image(s) missing or unreadable, left out:", file=sys.stderr)
        for m in missing[:20]:
            print(f"  {m['image']}: {m['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
