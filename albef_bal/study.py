"""``albef-bal study``: does a balancing method help when one modality is made harder?

On a synthetic corpus whose training split is imbalanced on purpose (an imbalance preset
of :mod:`albef_bal.data.synthetic`, e.g. noisy, blurred images), every method in
``--methods`` is pretrained with the same config, budget and seeds through the real
DeepSpeed engine, then measured on the clean held-out split:

- zero-shot retrieval R@1/5/10 both ways (ITC ranking re-ranked by ITM, as the demo);
- a linear probe per encoder: frozen CLS features -> ground-truth attributes, fitted on the
  validation split and scored on the test split (what each branch learned).

Each run writes ``RUN/result.json``; runs that have one are not repeated, so an interrupted
study resumes. The summary is ``study.md`` (mean and standard deviation over seeds),
``study.json`` and ``study.png``.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Optional, Sequence

from .demo import REPO, corpus_overrides, ensure_corpus, launch_pretrain

STUDY_CONFIG = os.path.join(REPO, "configs", "study", "tiny.yaml")
METHODS = ("none", "ogm_ge", "gblend", "mmpareto", "relearn")
RETRIEVAL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def method_overrides(method: str, data_dir: str) -> list[str]:
    """What a method needs from the study corpus: G-Blend and Re-learning measure a training
    subset (the first training shard; it carries the ``cls`` labels) against the validation
    split; G-Blend re-estimates its weights every 100 steps (four windows per run), and
    Re-learning diagnoses at the ends of epochs 1 and 2, not after the last one."""
    subset = f"{data_dir}/train/00000.tar"
    return {"gblend": [f"balance.gblend.train_split={subset}", "balance.gblend.window=100"],
            "relearn": [f"balance.relearn.train_split={subset}", "balance.relearn.max_times=2"]}.get(method, [])


def method_config(method: str) -> Optional[str]:
    """The preset of a study row: a balancing method (``configs/balance/<method>.yaml``, e.g.
    ``mmpareto_ssl``) or a unimodal-loss option (``configs/unimodal/<method>.yaml``, e.g.
    ``image_simsiam``, ``both``); none for the baseline."""
    if method == "none":
        return None
    for folder in ("balance", "unimodal"):
        path = os.path.join(REPO, "configs", folder, f"{method}.yaml")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no preset for study row {method!r}: neither configs/balance/{method}.yaml nor "
                            f"configs/unimodal/{method}.yaml exists")


def measure_run(run_dir: str, val_split: str, test_split: str, tokenizer_path: str, k_test: int) -> dict:
    """Retrieval and per-encoder probes of the model exported to ``run_dir/export``."""
    from .checkpoints import load_pretrained
    from .data import build_tokenizer, load_retrieval_split
    from .eval.probes import probe_encoders
    from .eval.report import evaluate_checkpoint
    model = load_pretrained(os.path.join(run_dir, "export"))
    report = evaluate_checkpoint(model, test_split, out_dir=os.path.join(run_dir, "retrieval"), k_test=k_test)
    probes = probe_encoders(model, load_retrieval_split(val_split), load_retrieval_split(test_split),
                            build_tokenizer(tokenizer_path))
    probe_acc = {attr: {branch: r["test_acc"] * 100 for branch, r in by_branch.items()}
                 for attr, by_branch in probes.items()}
    return {"retrieval": {k: report["metrics"][k] for k in RETRIEVAL_KEYS}, "probes": probe_acc,
            "probe_majority": {attr: by_branch["vision"]["majority"] * 100 for attr, by_branch in probes.items()}}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per method: mean and standard deviation over seeds of every retrieval metric and of
    each encoder's probe accuracy averaged over the attributes."""
    out = {}
    for method, runs in results.items():
        row = {k: _mean_sd([r["retrieval"][k] for r in runs]) for k in RETRIEVAL_KEYS}
        for branch in ("vision", "text"):
            row[f"probe_{branch}"] = _mean_sd([statistics.fmean(a[branch] for a in r["probes"].values())
                                               for r in runs])
        row["seeds"] = len(runs)
        out[method] = row
    return out


def markdown_table(summary: dict, baseline: str = "none") -> str:
    cols = [("TR R@1", "txt_r1"), ("TR R@5", "txt_r5"), ("TR R@10", "txt_r10"), ("IR R@1", "img_r1"),
            ("IR R@5", "img_r5"), ("IR R@10", "img_r10"), ("r_mean", "r_mean"),
            ("probe vision", "probe_vision"), ("probe text", "probe_text")]
    lines = ["| method | seeds | " + " | ".join(c for c, _ in cols) + " | r_mean vs baseline |",
             "|---" * (len(cols) + 3) + "|"]
    base = summary.get(baseline, {}).get("r_mean")
    for method, row in summary.items():
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" for _, k in cols]
        if base is None or method == baseline:
            verdict = "baseline" if method == baseline else "n/a"
        else:
            diff, spread = row["r_mean"][0] - base[0], max(row["r_mean"][1], base[1])
            verdict = f"{diff:+.2f} ({'within seed spread' if abs(diff) <= spread else 'better' if diff > 0 else 'worse'})"
        lines.append(f"| {method} | {row['seeds']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(methods))
    for ax, keys, title in ((axes[0], ("txt_r1", "img_r1", "r_mean"), "zero-shot retrieval (%)"),
                            (axes[1], ("probe_vision", "probe_text"), "linear probe accuracy (%)")):
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            ax.bar([i + j * width for i in x], [summary[m][k][0] for m in methods], width,
                   yerr=[summary[m][k][1] for m in methods], capsize=3, label=k)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in x], methods)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(output_dir: str = "runs/study", data_dir: Optional[str] = None, preset: str = "vision-mild",
              methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1), config: Optional[str] = None,
              overrides: Sequence[str] = (), ranks: Optional[int] = None) -> dict:
    from .config import ConfigError, load_config
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[study {time.time() - t_start:5.0f}s] {msg}", flush=True)

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown balance method(s) {unknown}; choose from {', '.join(METHODS)}")
    presets = {m: method_config(m) for m in methods}  # fail before any training if one is missing
    data_dir = data_dir or os.path.join("data", f"synthetic-{preset}")
    ensure_corpus(data_dir, log, preset=preset)
    base = [config or STUDY_CONFIG]
    results: dict[str, list[dict]] = {}
    total = len(methods) * len(seeds)
    for n, (method, seed) in enumerate(((m, s) for m in methods for s in seeds), 1):
        run_dir = os.path.join(output_dir, method, f"seed{seed}")
        result_path = os.path.join(run_dir, "result.json")
        if os.path.isfile(result_path):
            log(f"[{n}/{total}] {method} seed {seed}: done before, reusing {result_path}")
        else:
            log(f"[{n}/{total}] {method} seed {seed}: pretraining into {run_dir}")
            configs = base + ([presets[method]] if presets[method] else [])
            sets = [*corpus_overrides(data_dir), *method_overrides(method, data_dir), f"train.output_dir={run_dir}",
                    f"train.seed={seed}", "train.resume=auto", *overrides]
            seconds = launch_pretrain(configs, ranks, log, sets)
            cfg = load_config(configs, sets)
            result = measure_run(run_dir, cfg.data.val_split, cfg.data.test_split, cfg.data.tokenizer,
                                 cfg.eval.k_test)
            result.update(method=method, seed=seed, train_seconds=round(seconds, 1))
            with open(result_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            log(f"[{n}/{total}] {method} seed {seed}: r_mean {result['retrieval']['r_mean']:.2f}")
        with open(result_path, encoding="utf-8") as f:
            results.setdefault(method, []).append(json.load(f))

    summary = summarise(results)
    table = markdown_table(summary)
    header = (f"Imbalance study: corpus preset `{preset}` ({data_dir}), methods {', '.join(methods)}, "
              f"seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. Retrieval on the "
              f"clean test split (percent); probe = mean test accuracy of linear probes over the attributes.\n\n")
    with open(os.path.join(output_dir, "study.md"), "w", encoding="utf-8") as f:
        f.write(header + table + "\n")
    with open(os.path.join(output_dir, "study.json"), "w", encoding="utf-8") as f:
        json.dump({"preset": preset, "seeds": list(seeds), "summary": summary, "runs": results}, f, indent=1)
    png = plot_summary(summary, os.path.join(output_dir, "study.png"))
    print("\n" + table)
    print(f"\nwritten to {output_dir}/: study.md, study.json, {os.path.basename(png)}, one directory per run "
          f"({(time.time() - t_start) / 60:.1f} min)")
    return summary
