"""The report's statistics on simulated data whose truth is known: flat noisy curves are flagged at most at the
advertised rate (several shapes of noise), a provoked fall is flagged, equal methods are marked at most at the
advertised rate, and constant differences never give p = 0."""

import math
import statistics

import numpy as np
import pytest

from mmtune.stats import (
    fall_at_fixed_step,
    label_permutation_p,
    largest_fall,
    paired_p,
    seeds_needed,
    sign_flip_p,
    smallest_p,
    welch_p,
)

SIMULATIONS = 1500
# the advertised 5% plus twice the simulation's standard error (a rate of exactly 5% passes 97.7% of the time)
ALLOWED = 0.05 + 2 * math.sqrt(0.05 * 0.95 / SIMULATIONS)


def _noise(rng: np.random.Generator, shape: str, seeds: int, steps: int, sd: float) -> np.ndarray:
    """Within-seed noise around a flat curve, ``[seeds, steps]``, of standard deviation ``sd``."""
    if shape == "gaussian":
        return rng.normal(0, sd, (seeds, steps))
    if shape == "heavy":  # Student t with 3 degrees of freedom, scaled to sd
        return rng.standard_t(3, (seeds, steps)) * sd / math.sqrt(3)
    if shape == "skewed":  # centred exponential: a few evaluations far above the rest
        return (rng.exponential(1.0, (seeds, steps)) - 1.0) * sd
    if shape == "autocorrelated":  # AR(1), rho 0.7: a seed's neighbouring evaluations move together
        out = np.empty((seeds, steps))
        out[:, 0] = rng.normal(0, sd, seeds)
        for j in range(1, steps):
            out[:, j] = 0.7 * out[:, j - 1] + rng.normal(0, sd * math.sqrt(1 - 0.49), seeds)
        return out
    raise ValueError(shape)


def _flat_curves(rng, shape: str, seeds: int, steps: int = 10) -> np.ndarray:
    """Flat curves (no fall at all): a level, each seed's own offset (between-seed sd 10), within-seed noise 8–12."""
    return 150 + rng.normal(0, 10, (seeds, 1)) + _noise(rng, shape, seeds, steps, rng.uniform(8, 12))


def _falls(curves: np.ndarray) -> np.ndarray:
    return curves[:, :-1] - curves[:, -1:]


def _old_peak_rule(curves: np.ndarray) -> bool:
    """The rule the report used before: the step where the seeds' mean peaks, then a one-sided t-test of each seed's
    fall from it (the peak chosen on the data it tests)."""
    from scipy.stats import ttest_1samp

    best = int(np.argmax(curves.mean(axis=0)))
    if best == curves.shape[1] - 1:
        return False
    falls = curves[:, best] - curves[:, -1]
    return falls.mean() > 0 and float(ttest_1samp(falls, 0.0, alternative="greater").pvalue) < 0.05


@pytest.mark.parametrize("shape", ["gaussian", "heavy", "skewed", "autocorrelated"])
@pytest.mark.parametrize("seeds", [5, 8])
def test_the_largest_fall_test_keeps_its_rate_on_flat_curves(shape, seeds):
    rng = np.random.default_rng(seeds * 100 + len(shape))
    flagged = sum(largest_fall(_falls(_flat_curves(rng, shape, seeds)))[1] < 0.05 for _ in range(SIMULATIONS))
    assert flagged / SIMULATIONS <= ALLOWED


@pytest.mark.parametrize("shape", ["gaussian", "heavy", "skewed", "autocorrelated"])
@pytest.mark.parametrize("seeds", [3, 5])
def test_a_fixed_reference_step_keeps_its_rate_on_flat_curves(shape, seeds):
    rng = np.random.default_rng(seeds * 1000 + len(shape))
    flagged = 0
    for _ in range(SIMULATIONS):
        curves = _flat_curves(rng, shape, seeds)
        flagged += fall_at_fixed_step((curves[:, 4] - curves[:, -1]).tolist()) < 0.05
    assert flagged / SIMULATIONS <= ALLOWED


def test_the_simulation_catches_a_peak_chosen_on_the_data():
    """The check has teeth: the old rule (peak of the mean curve, then a t-test from it) flags flat curves far above
    5% — 3–5 seeds, as the issue measured (16–20%)."""
    rng = np.random.default_rng(7)
    for seeds in (3, 5):
        rate = sum(_old_peak_rule(_flat_curves(rng, "gaussian", seeds)) for _ in range(SIMULATIONS)) / SIMULATIONS
        assert rate > 0.12, rate


@pytest.mark.parametrize("seeds", [6, 8])
def test_a_provoked_fall_is_flagged(seeds):
    """The score rises to step 4, then falls by 40 by the end (noise sd 10): the largest-fall test finds it almost
    always, at the step where it peaked or next to it."""
    rng = np.random.default_rng(seeds)
    shape = np.array([100, 120, 135, 145, 150, 140, 130, 122, 115, 110], dtype=float)
    found, steps = 0, []
    for _ in range(300):
        curves = shape + rng.normal(0, 10, (seeds, 1)) + rng.normal(0, 10, (seeds, shape.size))
        step, p = largest_fall(_falls(curves))
        found += p < 0.05
        steps.append(step)
    assert found / 300 >= 0.9
    assert statistics.median(steps) in (3, 4, 5)


def test_a_fixed_step_flags_a_provoked_fall_with_three_seeds():
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(300):
        falls = 40 + rng.normal(0, 10, 3)
        found += fall_at_fixed_step(falls.tolist()) < 0.05
    assert found / 300 >= 0.8


def test_equal_methods_are_told_apart_at_most_at_the_advertised_rate():
    """Paired t-tests on the same seeds (shared seed effect sd 10, own noise sd 3) and Welch's on independent ones."""
    rng = np.random.default_rng(11)
    paired = welch = 0
    for _ in range(SIMULATIONS):
        shared = rng.normal(0, 10, 3)
        paired += paired_p((60 + shared + rng.normal(0, 3, 3)).tolist(),
                           (60 + shared + rng.normal(0, 3, 3)).tolist()) < 0.05
        welch += welch_p(rng.normal(60, 5, 3).tolist(), rng.normal(60, 5, 3).tolist()) < 0.05
    assert paired / SIMULATIONS <= ALLOWED and welch / SIMULATIONS <= ALLOWED


def test_constant_differences_get_their_exact_p_never_zero():
    """One record apart in every seed (the spec's example: three pairs, two-sided sign-flip p = 0.25)."""
    assert paired_p([50.5, 61.5, 70.5], [50.0, 61.0, 70.0]) == pytest.approx(0.25)
    assert paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert sign_flip_p([0.5] * 6) == pytest.approx(2 / 64) == smallest_p(6)
    assert sign_flip_p([0.5, 0.5, 0.5], "greater") == pytest.approx(1 / 8)
    assert fall_at_fixed_step([55.0, 55.0, 55.0]) == pytest.approx(1 / 8)
    # two constant groups: 2 of the C(6, 3) = 20 splits are as extreme
    assert welch_p([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == pytest.approx(0.1) == label_permutation_p([1.0] * 3, [2.0] * 3)


def test_seeds_needed_from_the_observed_spread():
    # constant differences: the fewest seeds whose sign-flip test can reach 0.05 (2 / 2^6 = 0.031)
    assert seeds_needed([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], paired=True) == 6
    assert seeds_needed([1.0, 2.0], [1.0, 2.0], paired=True) is None
    # effect size 1 (mean 2, sd 2): a paired t-test needs 10 pairs for 80% power at 0.05 (G*Power: 10)
    assert seeds_needed([4.0, 0.0, 2.0, 4.0, 0.0], [0.0] * 5, paired=True) == 10
    # a tiny effect is many seeds, and says so
    assert seeds_needed([0.01, -0.99, 1.01], [0.0, 0.0, 0.0], paired=True) > 100
