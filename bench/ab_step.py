#!/usr/bin/env python
"""A/B step time of this tree against another revision, interleaved in one process.

    python bench/ab_step.py --base REV [--size bench-small] [--batch 16] [--precision fp32]
        [--steps 20] [--warmup 3] [--threads 2] [--set KEY=VALUE ...]

Exports ``albef_bal/`` at git revision REV into a temporary directory as the package
``albef_bal_base`` (the package imports itself relatively, so a renamed copy works), builds
one trainer from each code base with the same seed and batch, and alternates their steps
(A, B, A, B, ...), so that a shared machine's changing load falls on both alike. Prints
one JSON object: both medians and the ratio base/this (> 1: this tree is faster). Ratios
are what to trust on a busy machine; absolute figures come from bench/train_step.py.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import train_step as TS  # noqa: E402


def export_base(rev: str, name: str = "albef_bal_base", import_here: bool = True) -> str:
    """``albef_bal/`` at git revision ``rev`` as the package ``name`` in a temporary
    directory (put first on this process's path unless ``import_here`` is false)."""
    tmp = tempfile.mkdtemp(prefix="albef_ab_")
    data = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "albef_bal"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    if name != "albef_bal":
        os.rename(os.path.join(tmp, "albef_bal"), os.path.join(tmp, name))
    if import_here:
        sys.path.insert(0, tmp)
    return tmp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1)")
    p.add_argument("--size", default="bench-small", choices=sorted(TS.SIZES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="override for this tree only")
    p.add_argument("--set-base", action="append", default=[], help="override for the base only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export_base(args.base)
    batch = args.batch or TS.SIZES[args.size]["batch"]
    trainers = {}
    for name, pkg, extra in (("base", "albef_bal_base", args.set_base), ("this", "albef_bal", args.set)):
        ns = argparse.Namespace(zero=None, threads=args.threads, set=extra)
        cfg = TS.make_config(ns, args.size, batch, args.precision, "none", tempfile.mkdtemp(), pkg=pkg)
        tr = TS.build_trainer(cfg, TS.make_batch(cfg, batch, cfg.data.max_len), None, device, pkg=pkg)
        tr._bench_iter = iter(tr.data.loader(0, 0))
        tr._window = {}
        trainers[name] = tr
    for _ in range(args.warmup):
        for tr in trainers.values():
            TS.timed_step(tr, device)
    times = {k: [] for k in trainers}
    for i in range(args.steps):
        order = list(trainers) if i % 2 == 0 else list(trainers)[::-1]
        for k in order:
            times[k].append(TS.timed_step(trainers[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"base": args.base, "size": args.size, "batch": batch, "precision": args.precision,
                      "threads": args.threads, "steps": args.steps, "set": args.set, "set_base": args.set_base,
                      "base_median_s": round(med["base"], 4), "this_median_s": round(med["this"], 4),
                      "base_min_s": round(min(times["base"]), 4), "this_min_s": round(min(times["this"]), 4),
                      "speedup": round(med["base"] / med["this"], 3),
                      "pairs_per_s": {k: round(batch / v, 2) for k, v in med.items()}}))


if __name__ == "__main__":
    main()
