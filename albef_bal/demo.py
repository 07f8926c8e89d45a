"""``albef-bal demo``: the whole system on a laptop CPU in minutes.

1. writes (or reuses) the synthetic coloured-shapes corpus,
2. pretrains a small ALBEF from scratch through the DeepSpeed engine, with two CPU ranks
   when the machine has two cores or more,
3. evaluates zero-shot retrieval on the held-out test split (ITC ranking, then ITM
   re-ranking of the top k),
4. writes plots, and prints the result table with the chance level beside it.

Everything lands in one run directory (``--output-dir``, default ``runs/demo``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from math import comb
from typing import Optional, Sequence

from .config import load_config, save_config

# a shipped preset (configs/demo/tiny.yaml), found in an installed package as in a checkout
DEFAULT_CONFIG = "demo/tiny"
# the corpus the demo trains on; 1-2 objects per image keeps it learnable in minutes
CORPUS = dict(train=20000, val=500, test=1000, max_objects=2, seed=0)


def chance_recall(img2txt: Sequence[Sequence[int]], num_texts: int, k: int) -> tuple[float, float]:
    """Expected R@k (percent) of a random ranking: (text retrieval, image retrieval).

    Text retrieval hits when any of the image's c captions is in the top k of T texts:
    1 - C(T - c, k) / C(T, k); image retrieval when the one image is in the top k of N."""
    n = len(img2txt)
    txt = sum(1 - comb(num_texts - len(c), k) / comb(num_texts, k) for c in img2txt) / n
    return 100 * txt, 100 * min(1.0, k / n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_corpus(data_dir: str, log, preset: str = "none") -> dict:
    """The synthetic corpus in ``data_dir`` (imbalance ``preset``), written unless an
    identical one is already there."""
    from dataclasses import asdict
    from .data.synthetic import CORPUS_VERSION, preset_config
    from .data.synthetic_corpus import read_manifest, write_corpus
    try:
        want = preset_config(preset, seed=CORPUS["seed"], max_objects=CORPUS["max_objects"])
    except ValueError as e:
        from .config import ConfigError
        raise ConfigError(str(e)) from None
    have = read_manifest(data_dir)
    counts = {k: CORPUS[k] for k in ("train", "val", "test")}
    if have and have.get("counts") == counts and have.get("seed") == want.seed \
            and have.get("objects_per_image") == [want.min_objects, want.max_objects] \
            and have.get("knobs") == asdict(want.knobs) \
            and have.get("knobs_on_eval_splits") == want.corrupt_eval \
            and have.get("version") == CORPUS_VERSION:
        log(f"corpus: reusing {data_dir}")
        return have
    log(f"corpus: writing {sum(counts.values())} synthetic image-text pairs to {data_dir}"
        + (f" (imbalance preset {preset})" if preset != "none" else ""))
    return write_corpus(data_dir, want, shard_size=1000, workers=min(4, os.cpu_count() or 1), **counts)


def corpus_overrides(data_dir: str) -> list[str]:
    """Config overrides that point a run at the synthetic corpus in ``data_dir``."""
    return [f"data.train_shards={data_dir}/train", f"data.val_split={data_dir}/val.json",
            f"data.test_split={data_dir}/test.json", f"data.tokenizer={data_dir}/vocab.txt"]


def default_ranks(ranks: Optional[int] = None) -> int:
    return ranks or (2 if (os.cpu_count() or 1) >= 2 else 1)


def launch_pretrain(config_paths: Sequence[str], ranks: Optional[int], log, overrides: Sequence[str] = ()) -> float:
    """``albef-bal pretrain`` on ``ranks`` CPU processes (default: two when the machine has two
    cores or more) under torchrun, exactly as a user would start it; returns its seconds."""
    n = default_ranks(ranks)
    threads = max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(_free_port()), "-m", "albef_bal", "pretrain"]
    for path in config_paths:
        cmd += ["--config", path]
    for o in (f"train.threads={threads}", *overrides):
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log(f"pretraining on {n} CPU rank(s) x {threads} thread(s): {' '.join(cmd[1:])}")
    t0 = time.time()
    res = subprocess.run(cmd, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"pretraining failed (exit status {res.returncode}); see the output above")
    return time.time() - t0


def run_demo(output_dir: str = "runs/demo", data_dir: str = "data/synthetic", config: Optional[str] = None,
             overrides: Sequence[str] = (), ranks: Optional[int] = None) -> dict:
    t_start = time.time()
    os.makedirs(output_dir, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[demo {time.time() - t_start:5.0f}s] {msg}", flush=True)

    ensure_corpus(data_dir, log)
    cfg_path = config or DEFAULT_CONFIG
    cfg = load_config(cfg_path, [*corpus_overrides(data_dir), f"train.output_dir={output_dir}", *overrides])
    resolved = os.path.join(output_dir, "demo_config.yaml")
    save_config(cfg, resolved)

    # ---- pretraining: two CPU ranks on two cores, through the same CLI users run
    train_s = launch_pretrain([resolved], ranks, log)

    # ---- zero-shot retrieval on the held-out split: ITC ranking alone (k = 0), then ALBEF's
    # protocol (ITC top k re-ranked by the ITM head)
    from .checkpoints import load_pretrained
    from .data import load_retrieval_split
    from .eval.report import evaluate_checkpoint
    log(f"evaluating zero-shot retrieval on {cfg.data.test_split}")
    model = load_pretrained(os.path.join(output_dir, "export"))
    split = load_retrieval_split(cfg.data.test_split)
    itc = evaluate_checkpoint(model, split, out_dir=os.path.join(output_dir, "retrieval_itc"), k_test=0)["metrics"]
    metrics = evaluate_checkpoint(model, split, out_dir=os.path.join(output_dir, "retrieval"),
                                  k_test=cfg.eval.k_test)["metrics"]

    # ---- plots
    from .plots import plot_run
    pngs = plot_run(output_dir)

    # ---- summary
    chance = {k: chance_recall(split.img2txt, len(split.texts), k) for k in (1, 5, 10)}
    mean_r1 = (metrics["txt_r1"] + metrics["img_r1"]) / 2
    itc_mean_r1 = (itc["txt_r1"] + itc["img_r1"]) / 2
    chance_r1 = (chance[1][0] + chance[1][1]) / 2
    k = cfg.eval.k_test
    lines = ["", f"Zero-shot retrieval on the held-out split ({len(split.image_ids)} images, {len(split.texts)} captions)",
             "", "| direction | ranking | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
    for name, key, ci in (("image -> text", "txt", 0), ("text -> image", "img", 1)):
        for label, m in (("ITC similarity", itc), (f"ITC top-{k}, ITM re-ranked", metrics)):
            lines.append(f"| {name} | {label} | " + " | ".join(f"{m[f'{key}_r{j}']:.1f}" for j in (1, 5, 10)) + " |")
        lines.append(f"| {name} | chance | " + " | ".join(f"{chance[j][ci]:.2f}" for j in (1, 5, 10)) + " |")
    lines += ["", f"mean R@1: {itc_mean_r1:.2f} (ITC), {mean_r1:.2f} (re-ranked) = "
              f"{itc_mean_r1 / chance_r1:.0f} x and {mean_r1 / chance_r1:.0f} x chance ({chance_r1:.2f});"
              f" r_mean {itc['r_mean']:.2f} and {metrics['r_mean']:.2f}"]
    summary = {"mean_r1": mean_r1, "chance_mean_r1": chance_r1, "times_chance": mean_r1 / chance_r1,
               "metrics": metrics, "itc_mean_r1": itc_mean_r1, "itc_times_chance": itc_mean_r1 / chance_r1,
               "itc_metrics": itc, "ranks": default_ranks(ranks), "train_seconds": round(train_s, 1),
               "total_seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(output_dir, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))
    print(f"\nwritten to {output_dir}/:\n"
          f"  demo_config.yaml, metrics.jsonl, tensorboard/    the run's config and training curves\n"
          f"  export/model.safetensors, export/config.yaml     the pretrained model (albef_bal.load_pretrained)\n"
          f"  retrieval/, retrieval_itc/                       retrieval reports, re-ranked and ITC only\n"
          f"                                                   (JSON, Markdown, per-query ranks)\n"
          + "".join(f"  {os.path.relpath(p, output_dir)}\n" for p in pngs)
          + f"  demo_summary.json\n"
          f"pretraining took {train_s / 60:.1f} min, the whole demo {(time.time() - t_start) / 60:.1f} min")
    return summary
