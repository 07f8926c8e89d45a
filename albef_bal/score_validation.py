"""``albef-bal validate-score``: does a branch score tell the branches apart?

A branch score may only drive a balancing method once it orders the branches correctly on
corpora made imbalanced on purpose. The protocol: the demo model is pretrained (no
balancing, the score only logged) on three corpora, each with the same seeds:

- ``none``: the balanced corpus;
- ``vision-GRADE``: images made less informative (every split);
- ``text-GRADE``: captions made less informative (every split);

and the score's per-run difference ``d = s_v - s_t`` (and ratio ``rho_v = s_v / s_t``) is
averaged over the second half of training. The score passes when

1. vision degraded: ``d < 0`` in every seed (the vision score is below the text score);
2. text degraded: ``d > 0`` in every seed;
3. balanced: the two scores are equal within the seed spread (``|mean d| <= sd d`` over seeds).

With ``balance.score`` other than ``itc`` the metrics log also keeps the ITC-half scores
(``score_itc_v`` / ``score_itc_t``), so one set of runs judges both. Writes
``score_validation.json``, ``score_validation.md`` and ``score_validation.png`` (rho_v
over training, one line per seed, one panel per corpus). Runs with an export are reused.

``--from-checkpoints`` reads the held-out uniformity score from each run's saved checkpoints
(every ``--checkpoint-every`` steps, and the initialisation rebuilt from the seed as step 0)
instead of the metrics log: the same subset and features as the in-training score, so runs
trained with any ``balance.score`` (or none) can be judged afterwards.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

from .demo import corpus_overrides, ensure_corpus, launch_pretrain
from .stats import mean_sd, paired_test

VALIDATION_CONFIG = "demo/tiny"


def read_scores(metrics_path: str, keys: tuple[str, str] = ("score_v", "score_t")) -> list[tuple[int, float, float]]:
    """(step, s_v, s_t) of every log row that has both keys."""
    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if keys[0] in r and keys[1] in r:
                rows.append((r["step"], r[keys[0]], r[keys[1]]))
    return rows


def checkpoint_scores(run_dir: str, score: str = "uniformity") -> list[tuple[int, float, float]]:
    """(step, s_v, s_t) of the held-out score of a run's initialisation (step 0) and of each
    of its saved checkpoints, computed in one process with the subset and features the
    in-training score uses (``balance.score_split`` or ``data.val_split``, the first
    ``balance.score_samples`` pairs). Checkpoint files are read with the restricted
    (weights-only) loader."""
    from types import SimpleNamespace

    import torch

    from .balance.scores import HeldOutUniformity
    from .config import ConfigError, load_config
    from .engine.checkpoint import restricted_load
    from .eval.diagnostics import build_init_model
    if score != "uniformity":
        raise ConfigError(f"--from-checkpoints recomputes held-out scores only (uniformity), not {score!r}: "
                          "the ITC-half score needs the training batches")
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(cfg_path)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    steps = sorted((int(name.rsplit("_", 1)[1]), os.path.join(ckpt_root, name))
                   for name in (os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else [])
                   if name.startswith("step_") and name.rsplit("_", 1)[1].isdigit())
    if not steps:
        raise FileNotFoundError(f"{ckpt_root}: no saved checkpoints (train with train.save_every > 0 and "
                                "train.keep_last large enough to keep them)")
    model = build_init_model(cfg).eval()
    scorer = HeldOutUniformity(cfg)
    scorer.setup(SimpleNamespace(module=model, device=torch.device("cpu"), rank=0, state=SimpleNamespace(step=0)))
    series = [(0, *scorer.values)]
    for step, path in steps:
        states = os.path.join(path, "mp_rank_00_model_states.pt")
        if not os.path.isfile(states):
            raise FileNotFoundError(f"{states}: missing (checkpoint of step {step} incomplete)")
        model.load_state_dict(restricted_load(states)["module"])
        scorer.measure(step)
        series.append((step, *scorer.values))
    return series


def late_difference(series: Sequence[tuple[int, float, float]]) -> dict:
    """Mean of s_v - s_t and of s_v / s_t over the second half of the steps."""
    if not series:
        raise ValueError("no logged scores")
    last = series[-1][0]
    late = [(v, t) for step, v, t in series if step > last / 2]
    return {"d": statistics.fmean(v - t for v, t in late),
            "rho_v": statistics.fmean(v / t for v, t in late if t > 0)}


def judge(diffs: dict[str, list[float]], vision: str, text: str) -> dict:
    """The three criteria on per-seed differences ``d`` of each corpus."""
    bal = diffs["none"]
    m, sd = mean_sd(bal)
    crit = {
        "vision_degraded_vision_lower": all(d < 0 for d in diffs[vision]),
        "text_degraded_text_lower": all(d > 0 for d in diffs[text]),
        "balanced_equal_within_spread": abs(m) <= sd,
    }
    out = {"criteria": crit, "passed": all(crit.values()), "balanced_mean_d": m, "balanced_sd_d": sd}
    # paired by seed: how far each degradation moves d away from the balanced corpus
    for name in (vision, text):
        out[f"shift_{name}"] = paired_test(diffs[name], bal)
    return out


def plot_validation(curves: dict, path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    corpora = list(curves)
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.4), sharey=True)
    for ax, corpus in zip(axes, corpora):
        for i, (seed, by_score) in enumerate(sorted(curves[corpus].items())):
            for score, series in by_score.items():
                steps = [s for s, _, _ in series]
                rho = [v / t if t > 0 else float("nan") for _, v, t in series]
                ax.plot(steps, rho, color=f"C{i}", ls="-" if score == "selected" else ":", lw=1.2,
                        label=f"seed {seed}" if score == "selected" else (f"seed {seed} (itc)" if i == 0 else None))
        ax.axhline(1.0, color="k", lw=0.8)
        last = max((series[-1][0] for by_score in curves[corpus].values() for series in by_score.values()
                    if series), default=0)
        ax.axvspan(last / 2, last, color="0.9", zorder=0)  # the judged window: the second half
        ax.set_yscale("log")
        ax.set_title(corpus)
        ax.set_xlabel("step")
    axes[0].set_ylabel("rho_v = s_v / s_t (log scale)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validate_score(output_dir: str = "runs/score_validation", data_root: str = "data", score: str = "uniformity",
                   grade: str = "medium", seeds: Sequence[int] = (0, 1, 2), steps: int = 600,
                   config: Optional[str] = None, overrides: Sequence[str] = (), ranks: Optional[int] = None,
                   train_fn: Optional[Callable] = None, from_checkpoints: bool = False,
                   checkpoint_every: int = 100) -> dict:
    from .config import ConfigError
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[validate-score {time.time() - t_start:5.0f}s] {msg}", flush=True)

    if grade not in ("mild", "medium", "strong"):
        raise ConfigError(f"--grade must be mild, medium or strong, got {grade!r}")
    if len(seeds) < 2:
        raise ConfigError("the validation needs at least 2 seeds (3 or more recommended)")
    if from_checkpoints and score != "uniformity":
        raise ConfigError(f"--from-checkpoints recomputes the held-out uniformity score, not {score!r}")
    if from_checkpoints and not 0 < checkpoint_every <= steps:
        raise ConfigError(f"--checkpoint-every must be between 1 and --steps ({steps}), got {checkpoint_every}")
    saving = ([f"train.save_every={checkpoint_every}", f"train.keep_last={steps // checkpoint_every + 1}"]
              if from_checkpoints else ["train.save_every=0"])
    vision, text = f"vision-{grade}", f"text-{grade}"
    corpora = {"none": os.path.join(data_root, "synthetic"), vision: os.path.join(data_root, f"synthetic-{vision}"),
               text: os.path.join(data_root, f"synthetic-{text}")}
    for preset, d in corpora.items():
        ensure_corpus(d, log, preset=preset)
    train_fn = train_fn or (lambda configs, sets: launch_pretrain(configs, ranks, log, sets))
    base = [config or VALIDATION_CONFIG]
    diffs: dict[str, list[float]] = {}
    itc_diffs: dict[str, list[float]] = {}
    curves: dict[str, dict] = {}
    runs = []
    for seed in seeds:
        for preset, data_dir in corpora.items():
            run_dir = os.path.join(output_dir, preset, f"seed{seed}")
            metrics = os.path.join(run_dir, "metrics.jsonl")
            if os.path.isfile(os.path.join(run_dir, "export", "model.safetensors")):
                log(f"{preset} seed {seed}: done before, reusing {run_dir}")
            else:
                log(f"{preset} seed {seed}: pretraining {steps} steps into {run_dir}")
                train_fn(base, [*corpus_overrides(data_dir), f"train.output_dir={run_dir}", f"train.seed={seed}",
                                f"train.max_steps={steps}", *saving, "train.resume=auto",
                                "balance.method=none", f"balance.score={score}", *overrides])
            series = checkpoint_scores(run_dir, score) if from_checkpoints else read_scores(metrics)
            row = {"corpus": preset, "seed": seed, **late_difference(series)}
            diffs.setdefault(preset, []).append(row["d"])
            curves.setdefault(preset, {})[seed] = {"selected": series}
            if score != "itc":
                itc = read_scores(metrics, ("score_itc_v", "score_itc_t"))
                if not itc and from_checkpoints and _logged_score(run_dir) == "itc":
                    itc = read_scores(metrics)  # a run that logged the ITC halves as its score
                if itc:
                    curves[preset][seed]["itc"] = itc
                    row["itc"] = late_difference(itc)
                    itc_diffs.setdefault(preset, []).append(row["itc"]["d"])
            runs.append(row)
    result = {"score": score, "source": "checkpoints" if from_checkpoints else "metrics log",
              "grade": grade, "seeds": list(seeds), "steps": steps, "runs": runs,
              "d": diffs, **judge(diffs, vision, text)}
    if len(itc_diffs) == len(corpora):
        result["itc"] = {"d": itc_diffs, **judge(itc_diffs, vision, text)}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "score_validation.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    md = markdown(result, vision, text)
    with open(os.path.join(output_dir, "score_validation.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    plot_validation(curves, os.path.join(output_dir, "score_validation.png"),
                    f"balance.score={score}: rho_v over training (dotted: itc; shaded: the judged second half), "
                    f"seeds {', '.join(map(str, seeds))}")
    print("\n" + md)
    log(f"written to {output_dir}/: score_validation.json, .md, .png")
    return result


def _logged_score(run_dir: str) -> str:
    """The ``balance.score`` a run logged as score_v / score_t (``itc`` when its config predates the key)."""
    import yaml
    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    return (cfg.get("balance") or {}).get("score") or "itc"


def markdown(result: dict, vision: str, text: str) -> str:
    lines = [f"Branch score validation, {result['steps']} steps, seeds {', '.join(map(str, result['seeds']))}: "
             "d = s_v - s_t averaged over the second half of training (scores from the "
             f"{result.get('source', 'metrics log')}).", "",
             "| score | balanced d per seed | vision-degraded d | text-degraded d | vision lower when degraded | "
             "text lower when degraded | balanced equal within spread |", "|---|---|---|---|---|---|---|"]
    rows = [(result["score"], result)] + ([("itc", result["itc"])] if "itc" in result else [])
    for name, r in rows:
        c = r["criteria"]
        cell = lambda xs: ", ".join(f"{x:+.3f}" for x in xs)  # noqa: E731
        lines.append(f"| {name} | {cell(r['d']['none'])} (mean {r['balanced_mean_d']:+.3f} ± "
                     f"{r['balanced_sd_d']:.3f}) | {cell(r['d'][vision])} | {cell(r['d'][text])} | "
                     + " | ".join("yes" if c[k] else "**no**" for k in ("vision_degraded_vision_lower",
                                                                          "text_degraded_text_lower",
                                                                          "balanced_equal_within_spread")) + " |")
    return "\n".join(lines)
