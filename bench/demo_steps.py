#!/usr/bin/env python
"""Steps per second of the demo's pretraining, launched exactly as ``albef-bal demo`` does.

    python bench/demo_steps.py [--steps 300] [--repeat 1] [--base REV] [--ranks 2]
        [--config configs/demo/tiny.yaml] [--data-dir data/synthetic] [--set KEY=VALUE ...]

The demo-size model is the imbalance study's model, and at that size a step's time is
mostly per-step overhead (Python, DeepSpeed bookkeeping, gloo collectives, logging, the
data loader) rather than matmuls, which ``train_step.py`` (one process, fixed batch) does
not see. This script runs ``albef-bal pretrain`` through ``albef_bal.demo.launch_pretrain``
(torchrun, two CPU ranks of one thread each on two cores, ZeRO 2 over gloo, the real shard
loader, checkpoints every ``save_every`` steps) for ``--steps`` optimizer steps and reads the
run's metrics log:

- ``steady_steps_per_s``: 1 / median of the logged ``step_time_s`` windows (every
  ``train.log_every`` steps), the first window (start-up) left out;
- ``fast_steps_per_s``: 1 / the 10th percentile of the same windows' step times, which moves
  less than the median with the CPU time that a shared VM's neighbours take (in episodes
  that slow several windows in a row by 20-40%);
- ``wall_s``: the whole command, start-up and checkpoints included.

With ``--base REV`` the same command also runs with ``albef_bal/`` taken from git revision
REV (exported to a temporary directory and put first on PYTHONPATH, with REV's ``configs/``
beside it, so that the base also runs REV's own preset: a change of the demo preset is part of
the comparison), alternating the two ``--repeat`` times (base, this, base, this, ...) so that
a shared machine's load falls on both alike; the ratio this/base of the medians is printed.
The corpus is written by the demo's own code when ``--data-dir`` has none. Prints one JSON
object.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)


def read_windows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "step_time_s" in row:
                rows.append(row)
    return rows


def run_once(args, code_dir: str | None, out_dir: str, config: str) -> dict:
    env_backup = dict(os.environ)
    try:
        if code_dir:
            os.environ["PYTHONPATH"] = code_dir + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from albef_bal.demo import corpus_overrides, launch_pretrain
        os.makedirs(out_dir, exist_ok=True)
        overrides = [*corpus_overrides(args.data_dir), f"train.output_dir={out_dir}",
                     f"train.max_steps={args.steps}", *args.set]
        # run from the output directory: `python -m albef_bal` would otherwise import the
        # checkout in the current directory ahead of PYTHONPATH
        cwd = os.getcwd()
        os.chdir(out_dir)
        quiet = open(os.path.join(out_dir, "launch.log"), "w")  # noqa: SIM115
        t0 = time.time()
        # launch_pretrain's child inherits this process's stdout/stderr: send them to a file
        saved = os.dup(1), os.dup(2)
        os.dup2(quiet.fileno(), 1)
        os.dup2(quiet.fileno(), 2)
        try:
            launch_pretrain([config], args.ranks, lambda m: None, overrides)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            quiet.close()
            os.chdir(cwd)
        wall = time.time() - t0
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    windows = read_windows(os.path.join(out_dir, "metrics.jsonl"))
    steady = [w["step_time_s"] for w in windows[args.steady_from:]] or [w["step_time_s"] for w in windows]
    med = statistics.median(steady)
    fast = fast_window(steady)
    return {"wall_s": round(wall, 2), "steady_step_s": round(med, 4), "steady_steps_per_s": round(1 / med, 3),
            "fast_step_s": round(fast, 4), "fast_steps_per_s": round(1 / fast, 3),
            "windows": len(windows), "losses": [w.get("loss") for w in windows]}


def fast_window(step_times: list[float]) -> float:
    """The 10th percentile of the log windows' step times: on a VM whose neighbours take CPU
    time in episodes of several windows, the median moves with how many of them a run
    catches, the fast windows much less."""
    if len(step_times) < 2:
        return step_times[0]
    return statistics.quantiles(step_times, n=10, method="inclusive")[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--ranks", type=int, default=None, help="default: as the demo (2 on 2 cores or more)")
    p.add_argument("--base", default=None, help="git revision to compare against, alternated")
    p.add_argument("--config", default=None,
                   help="default: configs/demo/tiny.yaml of each side (the base's from REV)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "synthetic"))
    p.add_argument("--steady-from", type=int, default=1, help="log windows left out at the start")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    from albef_bal.demo import ensure_corpus
    ensure_corpus(args.data_dir, lambda m: print(m, file=sys.stderr))
    demo_preset = os.path.join("configs", "demo", "tiny.yaml")
    variants = [("this", None, args.config or os.path.join(ROOT, demo_preset))]
    if args.base:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ab_step import export_base
        # the base runs in the child processes: exported under its own name, first on their
        # PYTHONPATH, with the presets of the same revision beside it
        code = export_base(args.base, name="albef_bal", import_here=False)
        data = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", args.base, "configs"],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(code, filter="data")
        variants.insert(0, ("base", code, args.config or os.path.join(code, demo_preset)))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    root = tempfile.mkdtemp(prefix="albef_demo_steps_")
    for i in range(args.repeat):
        order = variants if i % 2 == 0 else variants[::-1]
        for name, code, config in order:
            r = run_once(args, code, os.path.join(root, f"{name}{i}"), config)
            results[name].append(r)
            print(json.dumps({"variant": name, "run": i, **{k: v for k, v in r.items() if k != "losses"}}),
                  file=sys.stderr, flush=True)
    summary = {"steps": args.steps, "repeat": args.repeat, "base_rev": args.base, "set": args.set}
    for name, rs in results.items():
        summary[name] = {"steady_steps_per_s": statistics.median(r["steady_steps_per_s"] for r in rs),
                         "fast_steps_per_s": statistics.median(r["fast_steps_per_s"] for r in rs),
                         "wall_s": statistics.median(r["wall_s"] for r in rs),
                         "runs": [r["steady_steps_per_s"] for r in rs],
                         "runs_fast": [r["fast_steps_per_s"] for r in rs]}
    if args.base:
        summary["speedup_steady"] = round(summary["this"]["steady_steps_per_s"]
                                          / summary["base"]["steady_steps_per_s"], 3)
        summary["speedup_fast"] = round(summary["this"]["fast_steps_per_s"] / summary["base"]["fast_steps_per_s"], 3)
        summary["speedup_wall"] = round(summary["base"]["wall_s"] / summary["this"]["wall_s"], 3)
        pairs = [t["steady_steps_per_s"] / b["steady_steps_per_s"] for b, t in zip(results["base"], results["this"])]
        summary["speedup_steady_pairs"] = [round(x, 3) for x in pairs]
        # same seed, same data: the logged losses tell whether the numbers changed (they do
        # when the two sides' presets or numerics differ)
        summary["max_logged_loss_diff"] = max(abs(x - y) for b, t in zip(results["base"], results["this"])
                                              for x, y in zip(b["losses"], t["losses"]))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
