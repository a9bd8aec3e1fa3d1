"""quant/stats.py against independent references: McNemar p-values as brute-force binomial sums over every
outcome, t-intervals from printed Student-t table values, and coverage of the interval on simulated seeds."""
import math
from fractions import Fraction

import numpy as np
import pytest

from quant import stats

# Student-t quantiles t_{df, 0.975} as printed in statistics tables (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262}


def brute_force_p(a_only: int, b_only: int) -> float:
    """Two-sided exact binomial p-value by definition: P(every outcome no more likely than the observed one)."""
    n = a_only + b_only
    prob = [Fraction(math.comb(n, k), 2 ** n) for k in range(n + 1)]
    return float(sum(p for p in prob if p <= prob[a_only]))


def correctness(a_only, b_only, both=30, neither=5, seed=0):
    """Two shuffled per-image correctness vectors with the given discordant and concordant counts."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    order = np.random.default_rng(seed).permutation(len(a))
    return np.array(a)[order], np.array(b)[order]


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (1, 0), (0, 5), (3, 3), (4, 5), (2, 9), (12, 30), (40, 41),
                                           (57, 23), (0, 60)])
def test_mcnemar_matches_a_brute_force_binomial_sum(a_only, b_only):
    a, b = correctness(a_only, b_only)
    result = stats.mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    expected = brute_force_p(a_only, b_only) if a_only + b_only else 1.0
    assert result["p"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_known_values_and_symmetry():
    # 0 vs 6 discordant: 2 / 2^6; 1 vs 9: 2 * (1 + 10) / 2^10 (hand-computed)
    assert stats.mcnemar_exact(*correctness(0, 6))["p"] == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(*correctness(1, 9))["p"] == pytest.approx(22 / 1024)
    a, b = correctness(7, 19)
    assert stats.mcnemar_exact(a, b)["p"] == pytest.approx(stats.mcnemar_exact(b, a)["p"])
    # concordant images do not matter: only the discordant ones carry information
    assert stats.mcnemar_exact(*correctness(7, 19, both=5))["p"] == stats.mcnemar_exact(*correctness(7, 19, both=500))["p"]


def test_mcnemar_refuses_different_image_sets():
    with pytest.raises(ValueError, match="different image sets"):
        stats.mcnemar_exact(np.ones(10, bool), np.ones(9, bool))


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0, 4.0, 5.0], [99.43, 99.40, 99.46], [0.5, -0.25],
                                    [99.1, 99.3, 99.2, 99.4], list(np.linspace(-1, 3, 10))])
def test_t_interval_equals_the_textbook_formula_with_table_quantiles(values):
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * s / math.sqrt(n)
    m, low, high = stats.t_interval(values)
    assert m == pytest.approx(mean)
    assert low == pytest.approx(mean - half, abs=1e-3 * s + 1e-12)  # the table rounds t to 3 decimals
    assert high == pytest.approx(mean + half, abs=1e-3 * s + 1e-12)


def test_t_interval_on_known_data():
    # 1..5: mean 3, s = sqrt(2.5), half-width 2.776 * sqrt(2.5 / 5) = 1.963
    m, low, high = stats.t_interval([1, 2, 3, 4, 5])
    assert (m, round(low, 3), round(high, 3)) == (3.0, 1.037, 4.963)


def test_t_interval_needs_two_values():
    m, low, high = stats.t_interval([99.2])
    assert m == 99.2 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in stats.t_interval([]))
    assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    """Five normal 'seeds' per trial: the interval should contain the true mean in about 95 % of 4,000 trials
    (a normal-quantile interval would cover only about 88 %)."""
    rng = np.random.default_rng(0)
    trials = rng.normal(99.4, 0.05, size=(4000, 5))
    hits = 0
    for row in trials:
        _, low, high = stats.t_interval(row)
        hits += low <= 99.4 <= high
    assert 0.94 <= hits / len(trials) <= 0.96


def test_paired_seeds_is_the_interval_of_the_differences():
    a, b = [99.46, 99.40, 99.42, 99.44, 99.41], [99.39, 99.34, 99.48, 99.40, 99.35]
    d = [x - y for x, y in zip(a, b)]
    result = stats.paired_seeds(a, b)
    m, low, high = stats.t_interval(d)
    assert result["n"] == 5 and result["mean"] == pytest.approx(m)
    assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))
    # paired t statistic by hand; p below 0.05 exactly when the 95 % interval excludes 0
    t = m / (np.std(d, ddof=1) / math.sqrt(5))
    assert abs(t) < T975[4] and result["p"] > 0.05 and low < 0 < high
    shifted = stats.paired_seeds([x + 0.2 for x in a], b)
    assert shifted["p"] < 0.05 and shifted["low"] > 0
    # pairing matters: the same values unpaired-shuffled give another interval
    assert stats.paired_seeds(a, b[::-1])["low"] != pytest.approx(low)


def test_paired_seeds_edge_cases():
    one = stats.paired_seeds([99.4], [99.3])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["low"]) and math.isnan(one["p"])
    same = stats.paired_seeds([99.4, 99.5], [99.3, 99.4])  # every seed the same difference
    assert same["low"] == same["high"] == pytest.approx(0.1) and math.isnan(same["p"])
