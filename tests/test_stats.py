"""The study's statistics against published table values and hand computations."""
import math

import pytest

from albef_bal.stats import betainc, holm, mean_sd, min_detectable_effect, paired_test, t_cdf, t_ppf, verdict


@pytest.mark.parametrize("q,df,expected", [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 9, 2.2622), (0.975, 30, 2.0423),
    (0.8, 2, 1.0607), (0.8, 4, 0.9410), (0.995, 2, 9.9248), (0.9, 5, 1.4759),
])
def test_t_quantiles_match_tables(q, df, expected):
    assert t_ppf(q, df) == pytest.approx(expected, abs=2e-4)
    assert t_cdf(expected, df) == pytest.approx(q, abs=1e-4)
    assert t_ppf(1 - q, df) == pytest.approx(-expected, abs=2e-4)


def test_betainc_edges_and_symmetry():
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0
    # I_x(a, b) = 1 - I_{1-x}(b, a); I_x(1, 1) = x
    assert betainc(2.5, 0.5, 0.3) == pytest.approx(1 - betainc(0.5, 2.5, 0.7), abs=1e-12)
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-12)


def test_paired_test_by_hand():
    method, base = [12.0, 15.0, 11.0], [10.0, 11.0, 10.0]
    r = paired_test(method, base)
    assert r["per_seed"] == [2.0, 4.0, 1.0]
    mean, sd = mean_sd([2.0, 4.0, 1.0])
    assert r["mean_diff"] == pytest.approx(7 / 3) and r["sd_diff"] == pytest.approx(sd)
    half = 4.302653 * sd / math.sqrt(3)
    assert r["ci"] == pytest.approx([mean - half, mean + half], abs=1e-4)
    t = mean / (sd / math.sqrt(3))  # 2.6458
    assert r["p"] == pytest.approx(2 * (1 - t_cdf(t, 2)), abs=1e-12)
    assert 0.1 < r["p"] < 0.15  # t = 2.65 on 2 df
    with pytest.raises(ValueError, match="same seeds"):
        paired_test([1.0, 2.0], [1.0])
    same = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p"] == 1.0 and same["ci"] == [0.0, 0.0]


def test_holm_step_down():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_minimum_detectable_effect_and_verdicts():
    # n = 3: (4.3027 + 1.0607) * sd / sqrt(3)
    assert min_detectable_effect(1.0, 3) == pytest.approx((4.3027 + 1.0607) / math.sqrt(3), abs=1e-3)
    assert min_detectable_effect(1.0, 10) < min_detectable_effect(1.0, 5) < min_detectable_effect(1.0, 3)
    assert verdict(0.01, 2.0) == "helps" and verdict(0.01, -2.0) == "hurts"
    assert verdict(0.2, 5.0, mde=3.2) == "no detectable effect at this power (MDE 3.2)"
    assert verdict(float("nan"), 1.0).startswith("no detectable effect")
