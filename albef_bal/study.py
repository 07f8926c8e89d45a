"""``albef-bal study``: does a balancing method help when one modality is less informative?

Arms, each pretrained with the same config and budget through the real DeepSpeed engine,
once per seed (a seed fixes the initial weights and the data order, so runs of different
arms with the same seed are *paired*):

- ``balanced``: the clean corpus, no balancing (the reference: what the model learns when
  neither modality is degraded);
- ``imbalanced``: a corpus made imbalanced on purpose (an information preset of
  :mod:`albef_bal.data.synthetic`, e.g. ``vision-medium``), no balancing (the baseline);
- one arm per balancing method on the imbalanced corpus.

The two baselines run first; a gate stops the study when the imbalanced baseline is not
below the balanced one in every seed (the preset does not create an imbalance worth
correcting). Every run is measured on the *clean* test split: ITC-only retrieval (the
primary metric, r_mean), ITM re-ranked retrieval, the imbalance diagnostics, and a summary
of the run's own balance signals. The statistics are paired: per method the differences to
the imbalanced baseline seed by seed, their mean with a 95 % t interval, the share of the
imbalance gap closed, Holm-corrected p-values across methods and the minimum detectable
effect at this number of seeds (:mod:`albef_bal.stats`).

Each run writes ``RUN/result.json``; runs that have one are not repeated, so an interrupted
study resumes where it stopped. The summary is ``study.md``, ``study.json`` and ``study.png``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .config import ConfigError, resolve_config_path
from .demo import corpus_overrides, ensure_corpus, launch_pretrain
from .stats import holm, mean_sd, min_detectable_effect, paired_test, verdict

STUDY_CONFIG = "study/tiny"  # a shipped preset (configs/study/tiny.yaml)
METHODS = ("ogm_ge", "gblend", "mmpareto", "relearn")
DEFAULT_PRESET = "vision-medium"
RETRIEVAL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
# metrics-log keys averaged over the second half of each run ("the method's own signals");
# the keys of each method's diagnostics start with its name and a slash
SIGNAL_KEYS = ("score_v", "score_t", "rho_v", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm",
               "loss_uni_image", "loss_uni_text")


@dataclass
class Arm:
    name: str
    preset: str  # corpus preset
    method: str  # balancing method spec ("none" for the baselines)
    configs: list[str] = field(default_factory=list)  # config files layered on the study config


def method_config(spec: str) -> Optional[str]:
    """The config file of a method spec: ``none`` -> no file; ``NAME`` -> the shipped
    ``configs/balance/NAME.yaml``; ``DIR/NAME`` -> ``configs/DIR/NAME.yaml`` (e.g.
    ``unimodal/both``); a path to a ``.yaml`` file -> that file."""
    if spec == "none":
        return None
    name = spec if (spec.endswith((".yaml", ".yml")) or "/" in spec) else f"balance/{spec}"
    try:
        return resolve_config_path(name, what=f"config of method {spec!r}")
    except ConfigError as e:
        raise FileNotFoundError(f"{e} (method specs: a name in configs/balance/, DIR/NAME under configs/, or a "
                                f".yaml path)") from None


def arm_name(spec: str) -> str:
    return os.path.splitext(spec)[0].replace(os.sep, "/").split("configs/")[-1].replace("/", "-")


def method_overrides(arm: Arm, data_dir: str, cfg) -> list[str]:
    """What a method needs from the study corpus: G-Blend and Re-learning measure a training
    subset (the first training shard; it carries the ``cls`` labels) against the validation
    split, which the information presets degrade alike (the same distribution); G-Blend
    re-estimates its weights every 100 steps (six windows), and Re-learning diagnoses at the
    ends of the first two epochs (steps 200 and 400 of the study's 600)."""
    subset = f"{data_dir}/train/00000.tar"
    method = cfg.balance.method
    if method == "gblend" and cfg.balance.gblend.train_split is None:
        return [f"balance.gblend.train_split={subset}", "balance.gblend.window=100"]
    if method == "relearn" and cfg.balance.relearn.train_split is None:
        return [f"balance.relearn.train_split={subset}", "balance.relearn.every=1", "balance.relearn.max_times=2"]
    return []


def signal_summary(metrics_path: str) -> dict:
    """Means over the second half of a run of the branch scores, the losses and every
    method-specific diagnostic in its metrics log."""
    rows = []
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    last = rows[-1]["step"]
    late = [r for r in rows if r["step"] > last / 2]
    keys = {k for r in late for k in r if k in SIGNAL_KEYS or "/" in k and not k.startswith(("lr/", "data_skipped/"))}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in late if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = statistics.fmean(vals)
    return out


def measure_run(run_dir: str, test_split: str, k_test: int, diagnose: bool = True) -> dict:
    """Retrieval (ITC only, and ITM re-ranked) and the diagnostics of the model exported to
    ``run_dir/export``, on the clean test split."""
    from .checkpoints import load_pretrained
    from .data import load_retrieval_split
    from .eval.report import evaluate_checkpoint
    model = load_pretrained(os.path.join(run_dir, "export"))
    split = load_retrieval_split(test_split)
    itc = evaluate_checkpoint(model, split, out_dir=os.path.join(run_dir, "retrieval_itc"), k_test=0)["metrics"]
    itm = evaluate_checkpoint(model, split, out_dir=os.path.join(run_dir, "retrieval"), k_test=k_test)["metrics"]
    result = {"retrieval_itc": {k: itc[k] for k in RETRIEVAL_KEYS},
              "retrieval_itm": {k: itm[k] for k in RETRIEVAL_KEYS},
              "signals": signal_summary(os.path.join(run_dir, "metrics.jsonl"))}
    if diagnose:
        result["diagnostics"] = run_diagnostics(run_dir, test_split)
    return result


def run_diagnostics(run_dir: str, split: str) -> dict:
    """The imbalance diagnostics of a run (probe gains, fusion reliance, modality gap)."""
    try:
        from .eval.diagnostics import diagnose_checkpoint
    except ImportError:  # pragma: no cover - diagnostics module absent
        return {}
    report = diagnose_checkpoint(os.path.join(run_dir, "export"), split, out_dir=os.path.join(run_dir, "diagnose"))
    return {k: report[k] for k in ("probe_gain", "probe_gain_ci", "reliance", "modality_gap") if k in report}


# ------------------------------------------------------------------ statistics
def analyse(arms: list[Arm], results: dict[str, list[dict]], seeds: Sequence[int]) -> dict:
    """``arms`` (name, corpus, method, seeds, per-seed r_mean), per-arm summaries and the
    paired comparisons of every method arm with the imbalanced baseline."""
    def r_means(name: str, key: str = "retrieval_itc") -> list[float]:
        return [r[key]["r_mean"] for r in results[name]]

    out_arms = []
    for arm in arms:
        if arm.name not in results:
            continue
        runs = results[arm.name]
        row = {"name": arm.name, "corpus": arm.preset, "method": arm.method, "seeds": [r["seed"] for r in runs],
               "r_mean": r_means(arm.name), "r_mean_itm": r_means(arm.name, "retrieval_itm")}
        row["mean"], row["sd"] = mean_sd(row["r_mean"])
        row["mean_itm"], row["sd_itm"] = mean_sd(row["r_mean_itm"])
        diag = [r.get("diagnostics") or {} for r in runs]
        for key in ("probe_gain", "reliance"):
            for sub in ("vision", "text", "image"):
                vals = [d[key][sub] for d in diag if d.get(key) and d[key].get(sub) is not None]
                if len(vals) == len(runs):
                    row[f"{key}_{sub}"] = mean_sd(vals)
        gaps = [d["modality_gap"] for d in diag if d.get("modality_gap") is not None]
        if len(gaps) == len(runs):
            row["modality_gap"] = mean_sd(gaps)
        sig = [r.get("signals") or {} for r in runs]
        for k in ("rho_v",):
            vals = [s[k] for s in sig if k in s]
            if len(vals) == len(runs):
                row[k] = mean_sd(vals)
        out_arms.append(row)

    paired, gate = {}, None
    if "balanced" in results and "imbalanced" in results:
        bal, imb = r_means("balanced"), r_means("imbalanced")
        gap = paired_test(bal, imb)
        gate = {"balanced": bal, "imbalanced": imb, "gap": gap,
                "passed": all(b > i for b, i in zip(bal, imb))}
    if "imbalanced" in results:
        imb = r_means("imbalanced")
        mean_gap = gate["gap"]["mean_diff"] if gate else float("nan")
        for arm in arms:
            if arm.name in ("balanced", "imbalanced") or arm.name not in results:
                continue
            test = paired_test(r_means(arm.name), imb)
            closed = test["mean_diff"] / mean_gap if gate and mean_gap > 0 else float("nan")
            test["gap_closed"] = closed
            test["gap_closed_ci"] = [c / mean_gap for c in test["ci"]] if gate and mean_gap > 0 else None
            paired[arm.name] = test
    p_holm = holm({k: v["p"] for k, v in paired.items()})
    sds = [v["sd_diff"] for v in paired.values() if not math.isnan(v["sd_diff"])]
    n = len(seeds)
    # the spread of paired differences pooled over methods (the noise any effect must beat)
    pooled_sd = math.sqrt(statistics.fmean(s * s for s in sds)) if sds else float("nan")
    m = max(1, len(paired))
    mde = {"pooled_sd_diff": pooled_sd, "n_seeds": n, "alpha": 0.05, "power": 0.8,
           "mde": min_detectable_effect(pooled_sd, n), "mde_holm_first": min_detectable_effect(pooled_sd, n, 0.05 / m)}
    for k, v in paired.items():
        v["p_holm"] = p_holm[k]
        v["verdict"] = verdict(p_holm[k], v["mean_diff"], mde=mde["mde"])
    return {"arms": out_arms, "paired": paired, "gate": gate, "mde": mde}


def _fmt(ms, digits=2) -> str:
    return "n/a" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown_report(analysis: dict) -> str:
    lines = ["| arm | corpus | method | seeds | ITC r_mean | per seed | ITM r_mean | probe gain vision | "
             "probe gain text | reliance image | reliance text | rho_v |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in analysis["arms"]:
        lines.append(
            f"| {a['name']} | {a['corpus']} | {a['method']} | {len(a['seeds'])} | {a['mean']:.2f} ± {a['sd']:.2f} | "
            + ", ".join(f"{v:.2f}" for v in a["r_mean"]) + f" | {a['mean_itm']:.2f} ± {a['sd_itm']:.2f} | "
            + " | ".join(_fmt(a.get(k)) for k in ("probe_gain_vision", "probe_gain_text", "reliance_image",
                                                   "reliance_text", "rho_v")) + " |")
    if analysis["gate"]:
        g = analysis["gate"]["gap"]
        lines += ["", f"Imbalance gap (balanced - imbalanced, paired): {g['mean_diff']:.2f} r_mean points, "
                      f"95 % CI [{g['ci'][0]:.2f}, {g['ci'][1]:.2f}], per seed "
                      + ", ".join(f"{d:+.2f}" for d in g["per_seed"])
                      + (" (gate passed: lower in every seed)" if analysis["gate"]["passed"] else " (gate FAILED)")]
    if analysis["paired"]:
        lines += ["", "| method | difference to imbalanced (r_mean) | 95 % CI | per seed | gap closed | p | "
                      "p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
        for k, v in analysis["paired"].items():
            closed = "n/a" if math.isnan(v["gap_closed"]) else f"{100 * v['gap_closed']:.0f} %"
            lines.append(f"| {k} | {v['mean_diff']:+.2f} | [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}] | "
                         + ", ".join(f"{d:+.2f}" for d in v["per_seed"])
                         + f" | {closed} | {v['p']:.3f} | {v['p_holm']:.3f} | {v['verdict']} |")
        m = analysis["mde"]
        lines += ["", f"Minimum detectable effect (paired t, {m['n_seeds']} seeds, alpha 0.05 two-sided, 80 % "
                      f"power, pooled sd of the paired differences {m['pooled_sd_diff']:.2f}): "
                      f"{m['mde']:.2f} r_mean points; {m['mde_holm_first']:.2f} at the Holm threshold of the "
                      f"smallest p-value."]
    return "\n".join(lines)


def plot_study(analysis: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = analysis["arms"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(arms) + 2), 3.6))
    for i, a in enumerate(arms):
        ax.bar(i, a["mean"], 0.6, yerr=a["sd"], capsize=3, color="0.75" if a["method"] == "none" else "C0")
        ax.plot([i] * len(a["r_mean"]), a["r_mean"], "k.", ms=5)
    ax.set_xticks(range(len(arms)), [a["name"] for a in arms], rotation=20)
    ax.set_ylabel("ITC-only r_mean, clean test (%)")
    ax.set_title("imbalance study: mean ± sd over seeds, dots = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------- driver
def build_arms(preset: str, methods: Sequence[str]) -> list[Arm]:
    arms = [Arm("balanced", "none", "none"), Arm("imbalanced", preset, "none")]
    for spec in methods:
        path = method_config(spec)  # fails before any training if one is missing
        arms.append(Arm(arm_name(spec), preset, spec, [path] if path else []))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"two arms have the same name: {names}")
    return arms


def run_study(output_dir: str = "runs/study", data_root: str = "data", preset: str = DEFAULT_PRESET,
              methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2), config: Optional[str] = None,
              overrides: Sequence[str] = (), ranks: Optional[int] = None, max_minutes: Optional[float] = 90.0,
              gate: bool = True, diagnose: bool = True,
              train_fn: Optional[Callable] = None) -> dict:
    """Run (or resume) the study; returns the analysis written to ``study.json``.

    ``max_minutes``: when the measured time per run says the remaining method arms do not fit
    (all seeds each), the remaining methods are skipped (seeds before methods) and listed.
    ``overrides``: ``KEY=VALUE`` settings of every run; ``{seed}`` in one is replaced by the
    run's seed (e.g. per-seed initial weights).
    ``train_fn(configs, overrides)``: how a run is trained (default: ``albef-bal pretrain``
    under torchrun, as the demo)."""
    from .config import load_config
    from .data.synthetic import ALL_SPLIT_PRESETS
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[study {time.time() - t_start:5.0f}s] {msg}", flush=True)

    if preset not in ALL_SPLIT_PRESETS:
        raise ConfigError(f"study preset {preset!r} must make one modality less informative in every split: "
                          f"one of {', '.join(sorted(ALL_SPLIT_PRESETS))}")
    if len(seeds) < 2:
        raise ConfigError("the study needs at least 2 seeds for paired statistics (3 or more recommended)")
    arms = build_arms(preset, methods)
    base = [config or STUDY_CONFIG]
    corpora = {"none": os.path.join(data_root, "synthetic"), preset: os.path.join(data_root, f"synthetic-{preset}")}
    for p, d in corpora.items():
        ensure_corpus(d, log, preset=p)
    clean_test = os.path.join(corpora["none"], "test.json")
    train_fn = train_fn or (lambda configs, sets: launch_pretrain(configs, ranks, log, sets))
    os.makedirs(output_dir, exist_ok=True)

    results: dict[str, list[dict]] = {}
    run_seconds: list[float] = []
    skipped: list[str] = []
    total = len(arms) * len(seeds)
    done = 0
    for ai, arm in enumerate(arms):
        if ai == 2 and gate:
            partial = analyse(arms, results, seeds)
            if not partial["gate"]["passed"]:
                g = partial["gate"]
                msg = (f"gate: the imbalanced baseline ({preset}) is not below the balanced one in every seed "
                       f"(r_mean balanced {g['balanced']}, imbalanced {g['imbalanced']}); a method cannot close a "
                       f"gap that is not there. Use a stronger preset (e.g. --preset "
                       f"{preset.split('-')[0]}-strong) or a longer budget; --no-gate runs the methods anyway")
                _write(output_dir, preset, seeds, partial, skipped, log, gate_message=msg)
                raise SystemExit(f"albef-bal study: stopped: {msg}")
            log("gate passed: the imbalanced baseline is below the balanced one in every seed")
        if ai >= 2 and max_minutes and run_seconds:
            per_run = statistics.fmean(run_seconds)
            todo = sum(1 for s in seeds if not os.path.isfile(_result_path(output_dir, arm.name, s)))
            if (time.time() - t_start) + todo * per_run > max_minutes * 60:
                skipped.append(arm.name)
                log(f"{arm.name}: skipped, {todo} runs of ~{per_run / 60:.1f} min do not fit the {max_minutes:.0f}-min "
                    f"budget (--max-minutes; seeds go before methods)")
                continue
        for seed in seeds:
            done += 1
            run_dir = os.path.join(output_dir, arm.name, f"seed{seed}")
            result_path = _result_path(output_dir, arm.name, seed)
            tag = f"[{done}/{total}] {arm.name} seed {seed}"
            if os.path.isfile(result_path):
                log(f"{tag}: done before, reusing {result_path}")
            else:
                data_dir = corpora[arm.preset]
                configs = base + arm.configs
                sets = [*corpus_overrides(data_dir), f"train.output_dir={run_dir}", f"train.seed={seed}",
                        "train.resume=auto", *(o.replace("{seed}", str(seed)) for o in overrides)]
                cfg = load_config(configs, sets)
                sets += method_overrides(arm, data_dir, cfg)
                log(f"{tag}: pretraining on {arm.preset} into {run_dir}")
                t0 = time.time()
                seconds = train_fn(configs, sets)
                result = measure_run(run_dir, clean_test, cfg.eval.k_test, diagnose)
                result.update(arm=arm.name, corpus=arm.preset, method=arm.method, seed=seed,
                              train_seconds=round(seconds, 1), run_seconds=round(time.time() - t0, 1))
                run_seconds.append(time.time() - t0)
                with open(result_path, "w", encoding="utf-8") as f:
                    json.dump(result, f, indent=1)
                log(f"{tag}: ITC r_mean {result['retrieval_itc']['r_mean']:.2f} on the clean test split "
                    f"({(time.time() - t0) / 60:.1f} min)")
            with open(result_path, encoding="utf-8") as f:
                results.setdefault(arm.name, []).append(json.load(f))

    analysis = analyse(arms, results, seeds)
    _write(output_dir, preset, seeds, analysis, skipped, log)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    return analysis


def _result_path(output_dir: str, arm: str, seed: int) -> str:
    return os.path.join(output_dir, arm, f"seed{seed}", "result.json")


def _write(output_dir, preset, seeds, analysis, skipped, log, gate_message: Optional[str] = None) -> None:
    header = (f"Imbalance study: corpus preset `{preset}` against the balanced corpus, seeds "
              f"{', '.join(map(str, seeds))} (paired: a seed fixes initial weights and data order). Primary metric: "
              f"ITC-only r_mean (mean of R@1/5/10 both ways, %) on the clean test split; mean ± sd over seeds.\n\n")
    table = markdown_report(analysis)
    extra = ""
    if skipped:
        extra += f"\n\nSkipped for time (--max-minutes): {', '.join(skipped)}."
    if gate_message:
        extra += f"\n\nStopped: {gate_message}."
    with open(os.path.join(output_dir, "study.md"), "w", encoding="utf-8") as f:
        f.write(header + table + extra + "\n")
    with open(os.path.join(output_dir, "study.json"), "w", encoding="utf-8") as f:
        json.dump({"preset": preset, "seeds": list(seeds), "skipped": skipped, "gate_message": gate_message,
                   **analysis}, f, indent=1)
    if analysis["arms"]:
        plot_study(analysis, os.path.join(output_dir, "study.png"))
    print("\n" + table + extra)
    log(f"written to {output_dir}/: study.md, study.json, study.png, one directory per run")
