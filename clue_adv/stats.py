"""Statistics for comparing strategies over paired seeds: mean ± std, paired t-test, CI, Holm.

Runs with the same seed share initialisation and data order, so a strategy is compared with the
baseline seed by seed: d_s = acc(strategy, s) − acc(baseline, s) over the seeds both completed; the
paired t-test asks whether mean(d) differs from 0, and the CI is mean(d) ± t_{0.975, n−1}·sd(d)/√n.
Many cells are tested at once, so p-values are Holm-adjusted across the table (family-wise error ≤ α,
valid under any dependence between the tests; uniformly more powerful than Bonferroni).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

NAN = float("nan")


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for fewer than 2 values


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0, NAN, NAN)
    arr = np.asarray(values, dtype=float)
    return Summary(n, float(arr.mean()), float(arr.std(ddof=1)) if n > 1 else NAN)


@dataclass(frozen=True)
class PairedTest:
    """treatment − baseline over paired observations."""

    n: int
    mean_difference: float
    std_difference: float
    t: float
    p: float  # two-sided; NaN (no test) when n < 2 or every difference is the same (see `no_spread`)
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def no_spread(self) -> bool:
        """Two or more pairs whose differences are all equal: there is no variance to test against."""
        return self.n >= 2 and self.std_difference == 0.0


# Differences of accuracies read back from JSON carry float noise (1.0000000000000071 vs 0.9999999999999929):
# an sd this small relative to the differences is 0, not a real spread that would give t ≈ 1e14 and p = 0.
_SPREAD_RTOL = 1e-9


def paired_test(treatment: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedTest:
    """Paired t-test (scipy.stats.ttest_rel) and the t-based CI of the mean difference."""
    if len(treatment) != len(baseline):
        raise ValueError(f"paired samples differ in length: {len(treatment)} vs {len(baseline)}")
    d = np.asarray(treatment, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(d)
    if n == 0:
        return PairedTest(0, NAN, NAN, NAN, NAN, NAN, NAN, confidence)
    mean = float(d.mean())
    if n == 1:
        return PairedTest(1, mean, NAN, NAN, NAN, NAN, NAN, confidence)
    sd = float(d.std(ddof=1))
    if sd <= _SPREAD_RTOL * max(1.0, float(np.abs(d).max())):
        # Identical differences: scipy would give t = ±inf and p = 0 (or NaN when all are 0), a "significant"
        # result from, e.g., two seeds that happen to move by the same amount. No spread, no test: p is NaN,
        # so Holm does not count it, and the CI collapses onto the mean.
        return PairedTest(n, mean, 0.0, NAN, NAN, mean, mean, confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(treatment, baseline)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedTest(n, mean, sd, float(result.statistic), float(result.pvalue), mean - half, mean + half, confidence)


def paired_by_key(
    treatment: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> tuple[PairedTest, list[int]]:
    """Pair two {seed: value} maps on their shared seeds; returns the test and the seeds used."""
    shared = sorted(set(treatment) & set(baseline))
    return paired_test([treatment[s] for s in shared], [baseline[s] for s in shared], confidence), shared


# Below this many paired seeds a table is read for "does each strategy train", not for small differences.
FEW_SEEDS = 5


def few_seeds_note(n: int, confidence: float = 0.95) -> str:
    """What a comparison over only `n` paired seeds can and cannot show (for a table's note): the t quantile at
    n − 1 degrees of freedom makes the interval many standard errors wide (12.7 at n = 2)."""
    t_n = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    t_5 = float(stats.t.ppf(0.5 + confidence / 2, FEW_SEEDS - 1))
    return (
        f" With only {n} seeds behind a comparison the table shows whether each strategy trains and roughly where "
        f"it lands, not a difference of a few points: its {confidence:.0%} interval spans ±{t_n:.1f} standard errors "
        f"(±{t_5:.1f} at {FEW_SEEDS} seeds)."
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order. NaN entries stay NaN and do not count
    towards the number of tests m.

    With the m finite p-values sorted ascending, p_(1) ≤ … ≤ p_(m):
    adj_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)); reject H_(i) at level α iff adj_(i) ≤ α.
    """
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(finite)
    out = [NAN] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
