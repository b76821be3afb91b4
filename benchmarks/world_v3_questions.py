"""World v3's two pre-registered questions (docs/results.md, "World v3 — pre-registration"), on finished demo runs.

1. Does a method reduce the open-response task's overfitting — its peak-to-end fall during training (of the sampled
   CIDEr where the runs sampled, amendment 2; else greedy) — against vanilla, without costing the fixed-choice tasks
   at the end?
2. Does it reduce forgetting (G/adj at the end) against vanilla?

For each method folder ``<out>/<method>-seed<k>`` sharing seeds with ``<out>/vanilla-seed<k>``: the per-seed fall of
the open-response score from the peak of the method's own mean curve to the last evaluation, its paired difference
from vanilla's, and the paired differences of each fixed-choice task's final score and of G/adj; p-values of paired
t-tests, Holm-adjusted within each question over every method in the call; 95% t-intervals on the differences.

Run: ``python benchmarks/world_v3_questions.py runs/v3 [runs/v3-nrca-lam5 …] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from mmtune.report import difference_interval, holm, load_run, open_score_key, paired_p

OPEN, CHOICE = "detailed_caption", ("count_mc", "attribute_mc")


def falls(curves: dict[int, list[dict]], task: str = OPEN, key: str | None = None) -> tuple[int, dict[int, float]]:
    """The step where the mean over seeds peaks, and each seed's fall from there to its last evaluation; of the
    sampled score where the runs have one (amendment 2), else of the greedy score (``key`` chooses)."""
    key = key or open_score_key(list(curves.values()), task)
    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves.values()]))
    at = {seed: {p["step"]: p[key][task] for p in c} for seed, c in curves.items()}
    peak = max(steps, key=lambda s: statistics.mean(a[s] for a in at.values()))
    return peak, {seed: a[peak] - a[steps[-1]] for seed, a in at.items()}


def compare(mine: dict[int, float], vanilla: dict[int, float]) -> dict:
    seeds = sorted(set(mine) & set(vanilla))
    a, b = [mine[s] for s in seeds], [vanilla[s] for s in seeds]
    return {"seeds": seeds, "mine": a, "vanilla": b, "difference": statistics.mean(a) - statistics.mean(b),
            "p": paired_p(a, b), "interval": difference_interval(a, b, paired=True)}


def questions(out: Path, *more: Path) -> dict:
    """``out``'s runs by method; runs of ``more`` folders (e.g. a λ sweep's) are named ``<method> (<folder>)``."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for where in (out, *more):
        for folder in sorted(where.glob("*-seed*")):
            match = re.fullmatch(r"(.+)-seed(\d+)", folder.name)
            if match and (folder / "eval" / "final" / "scores.json").exists():
                name = match[1] if where == out else f"{match[1]} ({where.name})"
                runs[name][int(match[2])] = load_run(folder)
    if "vanilla" not in runs:
        raise SystemExit(f"{out}: no finished vanilla-seed* runs")
    vanilla = runs["vanilla"]
    key = open_score_key([r["curve"] for r in vanilla.values()], OPEN)
    vanilla_peak, vanilla_falls = falls({s: r["curve"] for s, r in vanilla.items()}, key=key)
    result = {"score": "sampled" if key == "sampled" else "greedy",
              "vanilla": {"peak_step": vanilla_peak, "falls": vanilla_falls}, "methods": {}}
    for method, by_seed in sorted(runs.items()):
        if method == "vanilla" or len(set(by_seed) & set(vanilla)) < 2:
            continue
        peak, mine = falls({s: r["curve"] for s, r in by_seed.items()}, key=key)
        entry = {"peak_step": peak, "fall": compare(mine, vanilla_falls),
                 "G/adj": compare({s: r["final"]["G/adj"] for s, r in by_seed.items()},
                                  {s: r["final"]["G/adj"] for s, r in vanilla.items()})}
        for task in CHOICE:
            entry[task] = compare({s: r["final"]["tasks"][task] for s, r in by_seed.items()},
                                  {s: r["final"]["tasks"][task] for s, r in vanilla.items()})
        result["methods"][method] = entry
    for key in ("fall", "G/adj", *CHOICE):  # one family per question (and per fixed-choice task)
        entries = [e[key] for e in result["methods"].values() if e[key]["p"] is not None]
        for entry, adjusted in zip(entries, holm([e["p"] for e in entries]), strict=True):
            entry["p_holm"] = adjusted
    return result


def verdict(entry: dict, better: str) -> str:
    low, high = entry["interval"]
    if entry.get("p_holm", 1.0) >= 0.05:
        return f"{entry['difference']:+.1f} [{low:+.1f}, {high:+.1f}], not detectable at this power"
    side = ("lower" if entry["difference"] < 0 else "higher")
    good = (side == better)
    return (f"{entry['difference']:+.1f} [{low:+.1f}, {high:+.1f}], {side} than vanilla "
            f"({'better' if good else 'worse'}; Holm p = {entry['p_holm']:.3g})")


def to_markdown(result: dict) -> str:
    v = result["vanilla"]
    lines = [f"Vanilla's {OPEN} ({result.get('score', 'greedy')} CIDEr) peaks at step {v['peak_step']} (mean curve); "
             f"its falls from there to the end, per seed: {', '.join(f'{f:.1f}' for f in v['falls'].values())}.", "",
             f"| method | seeds | peak step | fall − vanilla's (CIDEr) | {' | '.join(f'{t} − vanilla' for t in CHOICE)} "
             "| G/adj − vanilla |", "|---|---|---|---|" + "---|" * len(CHOICE) + "---|"]
    for method, e in result["methods"].items():
        lines.append(f"| {method} | {len(e['fall']['seeds'])} | {e['peak_step']} | {verdict(e['fall'], 'lower')} | "
                     + " | ".join(verdict(e[t], "higher") for t in CHOICE) + f" | {verdict(e['G/adj'], 'higher')} |")
    lines += ["", "Differences are means over shared seeds with 95% paired t-intervals; p-values of paired t-tests, "
              "Holm-adjusted over the methods within each column."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a demo folder of world v3 runs (<method>-seed<k>), vanilla's included")
    parser.add_argument("more", nargs="*", help="more demo folders (e.g. a λ sweep's); rows named '<method> (<folder>)'")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    result = questions(Path(args.out), *map(Path, args.more))
    print(to_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
