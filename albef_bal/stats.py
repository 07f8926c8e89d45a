"""Small-sample statistics for paired comparisons (the imbalance study).

Runs of two arms with the same seed share their initial weights and data order, so the
study compares arms by *paired* differences d_s = method_s - baseline_s over seeds s and
uses Student's t distribution with n - 1 degrees of freedom (n is small: 3 to 10 seeds).
Several methods are compared with one baseline, so the p-values are Holm-corrected.

Pure Python (no SciPy): the t distribution's CDF comes from the regularised incomplete
beta function (continued fraction) and its quantiles from bisection on the CDF.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


# ------------------------------------------------------------ t distribution
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- summaries
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_test(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict:
    """Paired comparison of two arms over the same seeds (in the same order).

    Returns ``mean_diff``, ``sd_diff``, ``ci`` ([low, high] at ``level``, t with n - 1 df),
    ``p`` (two-sided paired t test of a zero mean difference; 1.0 when every difference is
    zero, 0.0 when they are equal and non-zero) and ``per_seed`` (the differences)."""
    if len(method) != len(baseline):
        raise ValueError(f"paired arms need the same seeds: {len(method)} vs {len(baseline)} values")
    diffs = [m - b for m, b in zip(method, baseline)]
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    out = {"n": n, "mean_diff": mean, "sd_diff": sd, "per_seed": diffs}
    if n < 2:
        out.update(ci=[float("nan"), float("nan")], p=float("nan"))
        return out
    se = sd / math.sqrt(n)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    out["ci"] = [mean - half, mean + half]
    if se == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
    else:
        out["p"] = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones are left out and
    returned as NaN)."""
    valid = sorted((p, k) for k, p in pvalues.items() if not math.isnan(p))
    m = len(valid)
    adjusted, running = {}, 0.0
    for i, (p, k) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[k] = running
    return {k: adjusted.get(k, float("nan")) for k in pvalues}


def min_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean paired difference that a two-sided paired t test at ``alpha``
    detects with probability ``power``, for differences with standard deviation ``sd_diff``
    over ``n`` seeds: (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)."""
    if n < 2:
        return float("nan")
    return (t_ppf(1.0 - alpha / 2.0, n - 1) + t_ppf(power, n - 1)) * sd_diff / math.sqrt(n)


def verdict(p_holm: float, mean_diff: float, alpha: float = 0.05, mde: Optional[float] = None) -> str:
    """'helps' / 'hurts' when the Holm-corrected test rejects a zero difference, else
    'no detectable effect at this power' (with the minimum detectable effect when given)."""
    if not math.isnan(p_holm) and p_holm < alpha:
        return "helps" if mean_diff > 0 else "hurts"
    return "no detectable effect at this power" + (f" (MDE {mde:.1f})" if mde is not None and not math.isnan(mde)
                                                   else "")
