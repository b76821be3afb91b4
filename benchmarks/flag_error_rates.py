"""The overfitting tests' false-positive rates on simulated flat curves (docs/report.md's table): the largest-fall test
(5 and 8 seeds), the fixed-step test (3 and 5 seeds), and the rule the report used before issue 35 (3 and 5 seeds),
under four shapes of noise. Run: ``python benchmarks/flag_error_rates.py [--simulations 3000]`` (about a minute)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mmtune.stats import fall_at_fixed_step, largest_fall  # noqa: E402
from test_stats import _falls, _flat_curves, _old_peak_rule  # noqa: E402

SHAPES = {"gaussian": "Gaussian", "heavy": "Student t, 3 d.f.", "skewed": "skewed (centred exponential)",
          "autocorrelated": "autocorrelated (AR(1), ρ 0.7)"}


def rates(shape: str, simulations: int) -> list[float]:
    rng = np.random.default_rng(1)
    out = [sum(largest_fall(_falls(_flat_curves(rng, shape, n)))[1] < 0.05 for _ in range(simulations)) / simulations
           for n in (5, 8)]
    for n in (3, 5):
        flagged = 0
        for _ in range(simulations):
            curves = _flat_curves(rng, shape, n)
            flagged += fall_at_fixed_step((curves[:, 4] - curves[:, -1]).tolist()) < 0.05
        out.append(flagged / simulations)
    out += [sum(_old_peak_rule(_flat_curves(rng, shape, n)) for _ in range(simulations)) / simulations for n in (3, 5)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=3000)
    args = parser.parse_args()
    print("| noise | largest fall, 5 seeds | largest fall, 8 seeds | fixed step, 3 seeds | fixed step, 5 seeds | the old "
          "rule, 3 seeds | the old rule, 5 seeds |")
    print("|---|---|---|---|---|---|---|")
    for shape, name in SHAPES.items():
        print(f"| {name} | " + " | ".join(f"{100 * r:.1f}%" for r in rates(shape, args.simulations)) + " |")


if __name__ == "__main__":
    main()
