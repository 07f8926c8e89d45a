"""Plots of a training run from its ``metrics.jsonl`` (matplotlib, Agg backend: no display).

``plot_run(run_dir)`` writes into ``run_dir/plots/``:

- ``losses.png``: total loss and its parts (ITC and its two halves, ITM, MLM), and the
  unimodal losses (``model.unimodal``) in a panel of their own where logged;
- ``lr.png``: the learning rate (per parameter group where groups differ, e.g. OGM-GE's lr mode);
- ``balance.png``: branch scores s_v and s_t, their ratio rho_v = s_v / s_t, and the
  per-branch gradient norms (logged for every method, ``none`` included);
- one PNG per balancing method whose diagnostics appear in the log (``ogm.png``,
  ``gblend.png``, ``mmpareto.png``, ``relearn.png``, ``weaken.png``): coefficients, weights,
  cosines, purities, alphas, weakening strengths;
- ``diagnostics.png`` when the run diagnosed itself (``diagnose.every``): probe gain per
  encoder over the initialisation (with its 95% interval), fusion reliance on the image and
  the text, modality gap, alignment and uniformity.

``balance.png`` also draws the learning speed per branch (``update_ratio_<branch>``).

It is also ``albef-bal plot-balance RUN_DIR``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

LOSS_KEYS = ("loss", "loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm")
UPDATE_PANEL = "relative update ||dθ|| / ||θ|| per log window"
# SimSiam's loss lives in [-1, 1], far below the others: a panel of its own
UNIMODAL_KEYS = ("loss_uni_image", "loss_uni_text")
METHOD_PREFIXES = {"ogm": "OGM-GE", "gblend": "Gradient Blending", "mmpareto": "MMPareto",
                   "relearn": "Diagnosing & Re-learning", "weaken": "Weakening the leading input"}


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of every numeric key; lines that do not parse are skipped
    (a run killed mid-write leaves a partial last line)."""
    series: dict[str, list] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = row.get("step")
            if not isinstance(step, int):
                continue
            for k, v in row.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                series[k].append((step, float(v)))
    return dict(series)


def _family(key: str) -> tuple[str, str]:
    """(panel, line label) of a method key: ``mmpareto/vision/cos`` -> (cos, vision);
    ``ogm/k_v`` -> (k, v); ``gblend/w_mm`` -> (w, mm); ``ogm/active`` -> (active, active)."""
    rest = key.split("/", 1)[1]
    if "/" in rest:
        label, _, panel = rest.rpartition("/")
        return panel, label
    stem, sep, suffix = rest.rpartition("_")
    if sep and suffix in ("v", "t", "mm", "vision", "text"):
        return stem, suffix
    return rest, rest


def _draw(path: str, title: str, panels: dict[str, dict[str, list]], logy: tuple[str, ...] = (),
          hlines: dict[str, float] = None) -> str:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, pts in sorted(lines.items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=label)
        if hlines and name in hlines:
            ax.axhline(hlines[name], color="grey", linestyle="--", linewidth=0.8)
        if name in logy and all(y > 0 for pts in lines.values() for _, y in pts):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str) -> list[str]:
    """Draw the run's plots into ``run_dir/plots/``; returns the PNG paths written."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a training output directory?)")
    s = read_metrics(path)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    name = os.path.basename(os.path.abspath(run_dir))

    losses = {k: s[k] for k in LOSS_KEYS if k in s}
    if losses:
        panels = {"total": {"loss": losses["loss"]}} if "loss" in losses else {}
        panels["parts"] = {k: v for k, v in losses.items() if k != "loss"}
        unimodal = {k: s[k] for k in UNIMODAL_KEYS if k in s}
        if unimodal:
            panels["unimodal"] = unimodal
        panels = {k: v for k, v in panels.items() if v}
        written.append(_draw(os.path.join(out_dir, "losses.png"), f"{name}: losses", panels))
    lrs = {k: v for k, v in s.items() if k == "lr" or k.startswith("lr/")}
    if lrs:
        written.append(_draw(os.path.join(out_dir, "lr.png"), f"{name}: learning rate", {"lr": lrs}))

    panels = {}
    scores = {k: s[k] for k in ("score_v", "score_t") if k in s}
    if scores:
        panels["branch scores (mean p of the positive)"] = scores
    if "rho_v" in s:
        panels["rho_v = s_v / s_t"] = {"rho_v": s["rho_v"]}
    norms = {k[len("grad_norm_"):]: v for k, v in s.items() if k.startswith("grad_norm_")}
    if norms:
        panels["gradient norm per branch"] = norms
    speed = {k[len("update_ratio_"):]: v for k, v in s.items() if k.startswith("update_ratio_")}
    if speed:
        panels[UPDATE_PANEL] = speed
    if panels:
        written.append(_draw(os.path.join(out_dir, "balance.png"), f"{name}: modality balance", panels,
                             logy=("gradient norm per branch", UPDATE_PANEL), hlines={"rho_v = s_v / s_t": 1.0}))
    if any(k.startswith("diag/") for k in s):
        written.append(_draw_diagnostics(s, os.path.join(out_dir, "diagnostics.png"), name))

    for prefix, title in METHOD_PREFIXES.items():
        keys = sorted(k for k in s if k.startswith(prefix + "/"))
        if not keys:
            continue
        panels: dict[str, dict] = defaultdict(dict)
        for k in keys:
            panel, label = _family(k)
            panels[panel][label] = s[k]
        written.append(_draw(os.path.join(out_dir, f"{prefix}.png"), f"{name}: {title}", dict(panels)))
    return written


def _draw_diagnostics(s: dict, path: str, name: str) -> str:
    """Probe gains with their intervals, reliance, and the embedding geometry over steps."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    panels = [
        ("probe gain over init (pp, 95% CI)", [(f"diag/probe_gain_{b}", b) for b in ("vision", "text")]
         + [("diag/probe_gain_caption_words_text", "text, caption words")]),
        ("fusion reliance (Shapley, pp)", [("diag/reliance_image", "image"), ("diag/reliance_text", "text")]),
        ("modality gap", [("diag/modality_gap", "gap")]),
        ("alignment (lower = closer pairs)", [("diag/alignment", "alignment")]),
        ("uniformity (lower = more uniform)", [("diag/uniformity_image", "image"), ("diag/uniformity_text", "text")]),
    ]
    panels = [(title, [(k, label) for k, label in lines if k in s]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, label in lines:
            xs, ys = zip(*s[key])
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=label)
            if f"{key}_lo" in s and f"{key}_hi" in s:
                lo, hi = dict(s[f"{key}_lo"]), dict(s[f"{key}_hi"])
                steps = [x for x in xs if x in lo and x in hi]
                ax.fill_between(steps, [lo[x] for x in steps], [hi[x] for x in steps], color=line.get_color(),
                                alpha=0.2)
        if "gain" in title or "reliance" in title:
            ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{name}: imbalance diagnostics (held-out subset)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
