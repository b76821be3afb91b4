"""World v3 re-planned (docs/results.md, issue 35): the calibration criteria C1–C4, the number of confirmatory seeds,
and the phenomenon's tests P1–P3, on the vanilla runs of a demo folder — written before any run of the plan.

Every number comes from the evaluations during training (``metrics.jsonl``: all 300 test records, every 125 steps)
at the step fixed in advance (250, the end of epoch 1) and at the last one, per seed, and from the final evaluation
(G/adj). Run: ``python benchmarks/world_v3_replan.py runs/v3r-a [--control runs/v3r-a-control] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from mmtune.report import load_run
from mmtune.stats import fall_at_fixed_step, holm

CAPTION, CHOICE = "detailed_caption", ("count_mc", "attribute_mc")
REFERENCE_STEP, MIN_FALL, LEAST_SEEDS, MOST_SEEDS = 250, 10.0, 5, 10


def curves(folder: Path, method: str = "vanilla") -> dict[int, dict]:
    """Per seed: the reference and last evaluations, G/adj at the end, and the base's numbers."""
    out = {}
    for run in sorted(folder.glob(f"{method}-seed*")):
        row = load_run(run)
        points = {p["step"]: p for p in row["curve"]}
        if REFERENCE_STEP not in points:
            raise SystemExit(f"{run}: no evaluation at step {REFERENCE_STEP} (eval.every_steps must reach it)")
        last = points[max(points)]
        made_up = {step: (p.get("hallucination") or {}).get(CAPTION) for step, p in points.items()}
        base = json.loads((run / "eval" / "during" / "base" / "scores.json").read_text())["tasks"]
        out[row["seed"]] = {
            "run": str(run), "last_step": last["step"],
            "caption": (points[REFERENCE_STEP]["tasks"][CAPTION], last["tasks"][CAPTION]),
            "hallucination": (made_up.get(REFERENCE_STEP), made_up.get(last["step"])),
            "validation_loss": (points[REFERENCE_STEP]["val_loss"][CAPTION], last["val_loss"][CAPTION]),
            "choice": {t: (points[REFERENCE_STEP]["tasks"][t], last["tasks"][t]) for t in CHOICE},
            "curve": {step: {"caption": p["tasks"].get(CAPTION), "hallucination": made_up.get(step),
                             **{t: p["tasks"].get(t) for t in CHOICE}} for step, p in sorted(points.items())},
            "G/adj": row["final"].get("G/adj"), "base_caption": base[CAPTION]["score"],
            "base_hallucination": base[CAPTION].get("hallucination"),
        }
    if not out:
        raise SystemExit(f"{folder}: no {method}-seed* runs")
    return out


def confirmatory_seeds(falls: list[float], effect: float = MIN_FALL, alpha: float = 0.05, power: float = 0.8) -> int:
    """The fewest seeds for which a one-sided paired t-test at ``alpha`` has ``power`` against a fall of ``effect``,
    given the sample sd of the calibration's falls (noncentral t); MOST_SEEDS + 1 when more are needed."""
    from scipy.stats import nct, t

    spread = statistics.stdev(falls)
    for n in range(LEAST_SEEDS, MOST_SEEDS + 1):
        if spread == 0 or 1 - nct.cdf(t.ppf(1 - alpha, n - 1), n - 1, effect / spread * math.sqrt(n)) >= power:
            return n
    return MOST_SEEDS + 1


def mean(pairs, i: int) -> float:
    return statistics.mean(p[i] for p in pairs)


def check(folder: Path, control: Path | None) -> tuple[list[str], dict, bool]:
    seeds = curves(folder)
    first = next(iter(seeds.values()))
    falls = [s["caption"][0] - s["caption"][1] for s in seeds.values()]
    lines = [f"# World v3 re-plan: {folder} (vanilla, seeds {', '.join(map(str, seeds))})", "",
             "| seed | caption CIDEr step 250 → end | hallucination % 250 → end | count MC 250 → end | "
             "attribute MC 250 → end | caption val. loss 250 → end | G/adj at the end |", "|---|---|---|---|---|---|---|"]
    for seed, s in seeds.items():
        h = s["hallucination"]
        lines.append(f"| {seed} | {s['caption'][0]:.1f} → {s['caption'][1]:.1f} | "
                     + (f"{h[0]:.1f} → {h[1]:.1f}" if None not in h else "–") + " | "
                     + " | ".join(f"{s['choice'][t][0]:.1f} → {s['choice'][t][1]:.1f}" for t in CHOICE)
                     + f" | {s['validation_loss'][0]:.3f} → {s['validation_loss'][1]:.3f} | {s['G/adj']:.1f} |")
    lines.append(f"| base | {first['base_caption']:.1f} | {first['base_hallucination'] or float('nan'):.1f} | | | | 100 |")
    captions = [s["caption"] for s in seeds.values()]
    criteria = {
        "C1 caption falls ≥ 10 from step 250": (statistics.mean(falls), statistics.mean(falls) >= MIN_FALL),
        "C2 both fixed-choice tasks end higher": (
            {t: mean([s["choice"][t] for s in seeds.values()], 1) - mean([s["choice"][t] for s in seeds.values()], 0)
             for t in CHOICE},
            all(mean([s["choice"][t] for s in seeds.values()], 1) > mean([s["choice"][t] for s in seeds.values()], 0)
                for t in CHOICE)),
        "C3 30–85% of G/adj kept": (statistics.mean(s["G/adj"] for s in seeds.values()),
                                   30 <= statistics.mean(s["G/adj"] for s in seeds.values()) <= 85),
        "C4 caption at step 250 above the base": (mean(captions, 0), mean(captions, 0) > first["base_caption"]),
    }
    lines += ["", "| criterion | measured (mean over seeds) | holds |", "|---|---|---|"]
    for name, (value, holds) in criteria.items():
        shown = ", ".join(f"{k} {v:+.1f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.1f}"
        lines.append(f"| {name} | {shown} | {'yes' if holds else 'no'} |")
    calibrated = all(holds for _, holds in criteria.values())
    result = {"seeds": seeds, "criteria": {k: {"value": v, "holds": h} for k, (v, h) in criteria.items()},
              "falls": falls}
    if len(falls) > 1:
        n = confirmatory_seeds(falls)
        result["confirmatory_seeds"] = n
        lines.append(f"\nFalls per seed: {', '.join(f'{f:.1f}' for f in falls)} (sd {statistics.stdev(falls):.1f}); "
                     f"seeds for 80% power against a 10-CIDEr fall: "
                     + (f"{n}" if n <= MOST_SEEDS else f"more than {MOST_SEEDS} (too noisy: not calibrated)"))
        calibrated = calibrated and n <= MOST_SEEDS
    # the phenomenon's tests (P1, P2 Holm-corrected together; P3 each) — meaningful on confirmatory seeds only
    rises = [s["hallucination"][1] - s["hallucination"][0] for s in seeds.values() if None not in s["hallucination"]]
    p1 = fall_at_fixed_step(falls) if len(falls) > 1 else None
    p2 = fall_at_fixed_step(rises) if len(rises) > 1 else None
    if p1 is not None and p2 is not None:
        p1_holm, p2_holm = holm([p1, p2])
        p3 = {t: fall_at_fixed_step([s["choice"][t][1] - s["choice"][t][0] for s in seeds.values()]) for t in CHOICE}
        result["tests"] = {"P1": {"p": p1, "p_holm": p1_holm}, "P2": {"p": p2, "p_holm": p2_holm}, "P3": p3}
        lines.append(f"P1 caption fall: p = {p1:.3g} (Holm {p1_holm:.3g}); P2 hallucination rise "
                     f"{statistics.mean(rises):+.1f} points: p = {p2:.3g} (Holm {p2_holm:.3g}); P3 fixed-choice rise: "
                     + ", ".join(f"{t} p = {p:.3g}" for t, p in p3.items()))
    if control is not None:
        other = curves(control)
        shared = sorted(set(other) & set(seeds))
        result["control"] = {s: other[s] for s in shared}
        lines.append("Caption-only control (same steps), the fall from step 250 per seed: "
                     + ", ".join(f"seed {s}: {other[s]['caption'][0] - other[s]['caption'][1]:.1f} (mix: "
                                 f"{seeds[s]['caption'][0] - seeds[s]['caption'][1]:.1f})" for s in shared))
    lines.append(f"\nCalibrated: {'yes' if calibrated else 'no'}")
    return lines, result, calibrated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--control", type=Path, help="the caption-only control's demo folder")
    parser.add_argument("--json", type=Path, help="also write every seed's numbers and curves here")
    args = parser.parse_args()
    lines, result, calibrated = check(args.folder, args.control)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if calibrated else 1


if __name__ == "__main__":
    sys.exit(main())
