"""The statistics a report's user acts on: tests over training seeds, their multiple-comparison correction, intervals,
how many seeds a difference would need, and the overfitting test over evaluations during training.

Every p-value here keeps its advertised error rate on data whose truth is known (``tests/test_stats.py`` simulates
flat curves and equal methods). Two rules make that so:

* **No p-value from nothing.** A t-test on differences that are the same in every seed (one test record apart in
  each of three seeds) divides by a zero spread; it is not p = 0. Such differences get the exact permutation p of
  what they are: a sign-flip test over n pairs can't go below 2 / 2^n (three pairs: 0.25).
* **A comparison point chosen on the data is corrected for.** "Fell from its peak" tests the peak the data picked;
  the overfitting test either compares a step fixed in advance with the end, or takes the largest fall over all
  earlier steps and calibrates it against the same maximum under every sign flip of the seeds (exact, like a
  max-statistic permutation test: the choice of peak is paid for).
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np

ALPHA = 0.05
EXACT_LIMIT = 16  # up to this many seeds every sign pattern is enumerated (65,536); beyond, a fixed-seed Monte Carlo


def _sign_patterns(n: int, draws: int = 20000, seed: int = 0) -> np.ndarray:
    """Every ±1 pattern over ``n`` seeds (the identity first), or ``draws`` random ones beyond ``EXACT_LIMIT``."""
    if n <= EXACT_LIMIT:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    rng = np.random.default_rng(seed)
    return np.vstack([np.ones(n), rng.choice((1.0, -1.0), size=(draws - 1, n))])


def sign_flip_p(differences: list[float], alternative: str = "two-sided") -> float:
    """Exact p of the mean of paired ``differences`` under the null that each is as likely to have either sign (the
    paired permutation test): the share of sign patterns whose mean is at least as extreme. ``alternative``:
    ``"two-sided"`` or ``"greater"`` (the mean is above 0)."""
    d = np.asarray(differences, dtype=float)
    if not d.size or not np.any(d):
        return 1.0
    means = _sign_patterns(d.size) @ d / d.size
    observed = d.mean()
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if alternative == "greater":
        return float(np.mean(means >= observed - tolerance))
    return float(np.mean(np.abs(means) >= abs(observed) - tolerance))


def label_permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided p of mean(a) − mean(b) over every split of the pooled values into groups of these sizes (the
    unpaired permutation test); for two samples whose spreads are both 0, where Welch's t is undefined."""
    pooled, n = [*a, *b], len(a)
    observed = abs(statistics.mean(a) - statistics.mean(b))
    total, extreme = 0, 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        picked = set(chosen)
        first = [pooled[i] for i in chosen]
        rest = [v for i, v in enumerate(pooled) if i not in picked]
        total += 1
        extreme += abs(statistics.mean(first) - statistics.mean(rest)) >= observed - 1e-12 * max(1.0, observed)
    return extreme / total


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test; None when either side has fewer than two values. Two samples that are each
    constant get the exact label-permutation p instead (3 vs 3 different values: 0.1), never 0."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else label_permutation_p(a, b)
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def paired_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of the paired t-test on ``a[i] − b[i]`` (the same seeds); None under two pairs. Differences that
    are the same in every pair get the exact sign-flip p (2 / 2^n), never 0."""
    if len(a) < 2 or len(a) != len(b):
        return None
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if statistics.pstdev(differences) == 0:
        return sign_flip_p(differences)
    from scipy.stats import ttest_rel

    return float(ttest_rel(a, b).pvalue)


def smallest_p(n: int, paired: bool = True, n_other: int | None = None) -> float:
    """The smallest two-sided p a permutation test over these seeds can give: 2 / 2^n paired, 2 / C(n+m, n) unpaired."""
    return 2 / 2 ** n if paired else 2 / math.comb(n + (n_other or n), n)


def seeds_needed(a: list[float], b: list[float], paired: bool, alpha: float = ALPHA, power: float = 0.8,
                 most: int = 1000) -> int | None:
    """How many seeds (per method) would detect a difference of the observed size at ``power`` with a two-sided test
    at ``alpha``, from the observed spread (noncentral t). Differences without spread (the same in every seed): the
    fewest seeds whose exact permutation test can reach ``alpha`` at all. None when the observed difference is 0,
    ``most + 1`` when more than ``most`` would be needed."""
    from scipy.stats import nct, t

    if paired:
        differences = [x - y for x, y in zip(a, b, strict=True)]
        mean, spread = statistics.mean(differences), statistics.stdev(differences) if len(differences) > 1 else 0.0
    else:
        mean = statistics.mean(a) - statistics.mean(b)
        spread = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2) if min(len(a), len(b)) > 1 else 0.0
    if mean == 0:
        return None
    if spread == 0:
        return next(n for n in range(2, most + 2) if smallest_p(n, paired) < alpha)
    effect = abs(mean) / spread
    from scipy.stats import norm

    # the normal approximation first (the t-test needs a few more), then the exact power upwards from just below it
    approximate = ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) / effect) ** 2 * (1 if paired else 2)
    if approximate > most:
        return most + 1
    for n in range(max(2, math.floor(approximate) - 2), most + 1):
        df = n - 1 if paired else 2 * n - 2
        shift = effect * math.sqrt(n if paired else n / 2)
        critical = t.ppf(1 - alpha / 2, df)
        if 1 - nct.cdf(critical, df, shift) + nct.cdf(-critical, df, shift) >= power:
            return n
    return most + 1


def difference_interval(a: list[float], b: list[float], paired: bool, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` t-interval of mean(a) − mean(b): on the differences when paired, Welch–Satterthwaite otherwise."""
    from scipy.stats import t

    if paired:
        differences = [x - y for x, y in zip(a, b, strict=True)]
        mean, n = statistics.mean(differences), len(differences)
        half = t.ppf((1 + level) / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
        return mean - half, mean + half
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return mean, mean
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t.ppf((1 + level) / 2, df) * math.sqrt(va + vb)
    return mean - half, mean + half


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family): reject where the adjusted value is below alpha."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def fall_at_fixed_step(falls: list[float]) -> float:
    """One-sided p that the mean fall from a step fixed in advance to the end is above 0: the paired t-test over
    seeds, or the exact sign-flip p where the falls are the same in every seed."""
    if statistics.pstdev(falls) == 0:
        return sign_flip_p(falls, "greater")
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(falls, 0.0, alternative="greater").pvalue)


def largest_fall(falls: np.ndarray) -> tuple[int, float]:
    """The step with the largest fall and its one-sided p, corrected for choosing it: ``falls[seed, step]`` is each
    seed's value at that step minus its value at the end. The statistic is the largest t over the steps; its null
    distribution is that same maximum over every sign flip of the seeds' rows (a seed's whole curve of falls flips at
    once, which keeps the steps' dependence). Exact when the noise around a flat curve is symmetric; ≥ 5 seeds are
    needed for any p below 0.05 (1 / 2^5)."""
    falls = np.asarray(falls, dtype=float)
    n = falls.shape[0]
    patterns = _sign_patterns(n)  # [patterns, seeds]
    flipped = patterns[:, :, None] * falls[None, :, :]  # [patterns, seeds, steps]
    means = flipped.mean(axis=1)
    spread = flipped.std(axis=1, ddof=1)
    scale = max(1.0, float(np.abs(falls).max()))
    t_values = means / np.maximum(spread / math.sqrt(n), 1e-9 * scale)
    maxima = t_values.max(axis=1)
    step = int(np.argmax(t_values[0]))
    return step, float(np.mean(maxima >= maxima[0] - 1e-9 * abs(maxima[0])))


def fewest_seeds_for_largest_fall(alpha: float = ALPHA) -> int:
    """The fewest seeds whose max-statistic sign-flip test can give a one-sided p below ``alpha`` (1 / 2^n)."""
    return next(n for n in range(2, 64) if 1 / 2 ** n < alpha)
