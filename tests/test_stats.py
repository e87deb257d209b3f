"""Paired comparisons and multiple-testing correction, against scipy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from clue_adv.stats import holm, paired_by_key, paired_test, summarize


def test_paired_t_matches_scipy_and_the_textbook_formula():
    treatment = [61.2, 59.8, 62.5, 60.1, 61.9]
    baseline = [60.0, 59.9, 60.7, 59.2, 60.3]
    result = paired_test(treatment, baseline)
    reference = stats.ttest_rel(treatment, baseline)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-12)
    low, high = reference.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))

    d = np.subtract(treatment, baseline)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert result.mean_difference == pytest.approx(d.mean())
    assert result.t == pytest.approx(d.mean() / se)
    assert result.ci_high - result.mean_difference == pytest.approx(stats.t.ppf(0.975, 4) * se)


def test_paired_t_on_hand_computed_numbers():
    # d = 1, 2, 3, 4, 5: mean 3, sd √2.5, se = √0.5, t = 3/√0.5 = 4.2426 on 4 df, two-sided p = 0.013236.
    result = paired_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert result.n == 5 and result.mean_difference == 3.0
    assert result.std_difference == pytest.approx(math.sqrt(2.5))
    assert result.t == pytest.approx(4.242640687, rel=1e-9)
    assert result.p == pytest.approx(0.0132356, abs=1e-6)
    assert result.ci_low == pytest.approx(3 - 2.776445105 * math.sqrt(0.5), rel=1e-9)  # t_{0.975,4} = 2.7764


def test_degenerate_pairs_give_nan_not_errors():
    one = paired_test([0.6], [0.5])
    assert one.n == 1 and one.mean_difference == pytest.approx(0.1) and math.isnan(one.p) and math.isnan(one.ci_low)
    none = paired_test([], [])
    assert none.n == 0 and math.isnan(none.mean_difference)
    zero = paired_test([1.0, 2.0], [1.0, 2.0])
    assert zero.mean_difference == 0.0 and math.isnan(zero.p) and zero.no_spread
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0], [1.0, 2.0])


def test_identical_differences_are_not_tested():
    # Every difference is 1: sd 0. scipy says t = inf, p = 0; that is no evidence, so no test at all.
    constant = paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert constant.no_spread and constant.std_difference == 0.0
    assert constant.ci_low == constant.ci_high == 1.0 and math.isnan(constant.p) and math.isnan(constant.t)
    # Accuracies read back as fractions × 100 differ by float noise only: still no spread.
    treatment, baseline = [100 * 0.5432, 100 * 0.6105, 100 * 0.5877], [100 * 0.5332, 100 * 0.6005, 100 * 0.5777]
    assert 0 < np.subtract(treatment, baseline).std(ddof=1) < 1e-12  # the noise is there (scipy: p ≈ 5e-30)
    noisy = paired_test(treatment, baseline)
    assert noisy.no_spread and math.isnan(noisy.p) and noisy.mean_difference == pytest.approx(1.0)
    assert holm([constant.p, 0.01, 0.02]) == pytest.approx([math.nan, 0.02, 0.02], nan_ok=True)  # m = 2
    spread = paired_test([2.0, 3.0, 4.1], [1.0, 2.0, 3.0])
    assert not spread.no_spread and 0 < spread.p < 1


def test_pairing_uses_only_shared_seeds():
    test, seeds = paired_by_key({1: 51.0, 2: 54.0, 3: 57.0, 9: 0.0}, {1: 50.0, 2: 52.0, 3: 54.0, 4: 99.0})
    assert seeds == [1, 2, 3]
    assert test.mean_difference == 2.0 and test.p == pytest.approx(0.0741799, abs=1e-6)


def test_holm_on_hand_computed_values():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]
    adjusted = holm([0.01, math.nan, 0.02])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_properties(pvalues):
    adjusted = holm(pvalues)
    m = len(pvalues)
    for p, a in zip(pvalues, adjusted, strict=True):
        assert p - 1e-15 <= a <= min(1.0, m * p) + 1e-12  # between raw and Bonferroni
    order = np.argsort(pvalues, kind="stable")
    assert all(adjusted[i] <= adjusted[j] + 1e-15 for i, j in zip(order, order[1:], strict=False))


def test_summarize_uses_the_sample_standard_deviation():
    s = summarize([50.0, 52.0, 54.0])
    assert (s.n, s.mean, s.std) == (3, 52.0, 2.0)
    assert math.isnan(summarize([1.0]).std) and summarize([]).n == 0
