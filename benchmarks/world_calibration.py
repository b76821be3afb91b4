"""Check the synthetic world's pre-registered calibration targets (docs/results.md) on the base and vanilla.

Reads the base model's evaluation and the vanilla runs of a demo folder (``mmtune demo --methods vanilla
--seeds 3 --out OUT``) and prints, as Markdown, each target with the measured numbers and whether it holds:

1. vanilla beats the base on every downstream task by more than 2 sample standard deviations over seeds;
2. vanilla keeps 30–85% of the base's normalised G (mean over held-out tasks of score / base × 100);
3. the base is at least chance + 20 points on every held-out accuracy task, and CIDEr ≥ 50 on captions;
4. the base's mean target-token probability on the downstream open-response targets is ≥ 0.05.

World v3 (read from the runs' config) changes target 1 to the fixed-choice downstream tasks and adds, on the
evaluations during training (``eval.every_steps``):

5. the open-response task overfits: the pre-registered flag (its score falls from the peak of the mean curve to the
   last evaluation, one-sided t-test over seeds p < 0.05; ``mmtune report``'s flag until issue 35), by at least ``MIN_FALL`` CIDEr — the score of sampled
   captions where the runs sampled them (``eval.sample_temperature``, amendment 2), greedy otherwise;
6. it improved first: the mean curve's peak is above the base's score on the same records;
7. the fixed-choice tasks keep improving: each one's mean at the last evaluation is above its mean at the caption's
   peak, and its score is not flagged.

Target 5 keeps the flag it was pre-registered with (``overfitting`` below), so attempts 1–10 reproduce; ``mmtune
report``'s flag is issue 35's corrected one (docs/report.md), and the re-planned v3 is checked by
``benchmarks/world_v3_replan.py``.

Run: ``python benchmarks/world_calibration.py runs/v2`` (exit code 1 when a target fails).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# 1 / number of possible answers of each world-v2 family (accuracy tasks); captions are judged by CIDEr.
CHANCE = {"color_vqa": 100 / 6, "shape_vqa": 100 / 4, "position_vqa": 100 / 9, "exists_vqa": 100 / 2,
          "ocr_vqa": 100 / 18, "background_mc": 100 / 4, "shape_mc": 100 / 4, "count_mc": 100 / 4,
          "attribute_mc": 100 / 4, "count_vqa": 100 / 3}
CAPTION_FLOOR = 50.0
MIN_FALL = 10.0  # world v3: the smallest peak-to-end fall of the open-response CIDEr that counts as overfitting


def load(out: Path) -> tuple[dict, list[dict]]:
    runs = sorted(out.glob("vanilla-seed*/eval/final/scores.json"))
    if not runs:
        raise SystemExit(f"{out}: no vanilla-seed*/eval/final/scores.json (run mmtune demo --methods vanilla first)")
    base = json.loads((runs[0].parents[1] / "base" / "scores.json").read_text())
    return base, [json.loads(r.read_text()) for r in runs]


def world_version(out: Path) -> int:
    import yaml

    config = yaml.safe_load(next(iter(sorted(out.glob("vanilla-seed*/config.yaml")))).read_text())
    return int(((config.get("data") or {}).get("synthetic") or {}).get("version", 2))


def check(out: Path) -> tuple[list[str], bool]:
    base, vanilla = load(out)
    tasks = base["tasks"]
    version = world_version(out)
    down = [t for t, v in tasks.items() if v["side"] == "downstream"]
    held = [t for t, v in tasks.items() if v["side"] == "heldout"]
    choice = [t for t in down if tasks[t]["metric"] != "cider"]
    lines, ok = [f"Base and vanilla ({len(vanilla)} seeds), `{out}`:", "",
                 "| target | task | base | vanilla (mean ± std over seeds) | holds |", "|---|---|---|---|---|"], True

    def row(target: str, task: str, base_value: str, vanilla_value: str, holds: bool) -> None:
        nonlocal ok
        ok &= holds
        lines.append(f"| {target} | {task} | {base_value} | {vanilla_value} | {'yes' if holds else '**no**'} |")

    for task in choice if version >= 3 else down:
        values = [v["tasks"][task]["score"] for v in vanilla]
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        b = tasks[task]["score"]
        row("1: vanilla − base > 2 std", task, f"{b:.1f}", f"{mean:.1f} ± {std:.1f} (gain {mean - b:+.1f})",
            mean - b > 2 * std)
    kept = [statistics.mean(100 * v["tasks"][t]["score"] / tasks[t]["score"] for t in held if tasks[t]["score"])
            for v in vanilla]
    mean, std = statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0
    row("2: 30 ≤ normalised G kept ≤ 85", "held-out mean", "100", f"{mean:.1f} ± {std:.1f}", 30 <= mean <= 85)
    for task in held:
        b = tasks[task]["score"]
        if tasks[task]["metric"] == "cider":
            row("3: base CIDEr ≥ 50", task, f"{b:.1f}", "–", b >= CAPTION_FLOOR)
        else:
            chance = CHANCE.get(task, 0.0)
            row(f"3: base ≥ chance ({chance:.1f}) + 20", task, f"{b:.1f}", "–", b >= chance + 20)
    for task in down:
        if tasks[task]["metric"] == "cider":
            confidence = tasks[task].get("target_confidence", float("nan"))
            row("4: base target-token probability ≥ 0.05", task, f"{confidence:.3f}", "–", confidence >= 0.05)
    if version >= 3:
        for line in during_training_targets(out, down, choice):
            row(*line)
    return lines, ok


MEASURES = {"score": ("tasks", 1), "validation loss": ("val_loss", -1), "sampled score": ("sampled", 1)}


def overfitting(method: str, curves: list[list[dict]], tasks: list[str]) -> list[dict]:
    """The flag the v3 pre-registration (issue 22) wrote its target 5 with, kept as it was so attempts 1–10 reproduce:
    the step where the seeds' mean curve is best, then a one-sided t-test of each seed's fall from it (p = 0 when the
    falls are equal). Known biased — it flags 16–19% of flat curves at a nominal 5% (docs/report.md) — and superseded
    in ``mmtune report`` by issue 35's tests; do not use it for anything new."""
    from scipy.stats import ttest_1samp

    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves])) if curves else []
    if len(curves) < 2 or len(steps) < 3:
        return []
    found = []
    for task in tasks:
        for what, (key, sign) in MEASURES.items():
            series = [{p["step"]: (p.get(key) or {}).get(task) for p in c} for c in curves]
            if any(s.get(step) is None for s in series for step in steps):
                continue
            means = [statistics.mean(s[step] for s in series) for step in steps]
            best = max(range(len(steps)), key=lambda i: sign * means[i])
            falls = [sign * (s[steps[best]] - s[steps[-1]]) for s in series]
            if best == len(steps) - 1 or statistics.mean(falls) <= 0:
                continue
            p = 0.0 if statistics.pstdev(falls) == 0 else float(ttest_1samp(falls, 0.0, alternative="greater").pvalue)
            if p < 0.05:
                found.append({"method": method, "task": task, "what": what, "step": steps[best], "p": p,
                              "best": means[best], "last": means[-1], "fall": statistics.mean(falls)})
    return found


def during_training_targets(out: Path, down: list[str], choice: list[str]) -> list[tuple]:
    """World v3's targets 5–7 on the vanilla runs' evaluations during training (rows of their metrics.jsonl)."""
    from mmtune.report import load_run, open_score_key

    runs = [load_run(r.parents[2]) for r in sorted(out.glob("vanilla-seed*/eval/final/scores.json"))]
    curves = [r["curve"] for r in runs]
    if not all(curves):
        return [("5–7: evaluations during training", "–", "–", "none in metrics.jsonl (eval.every_steps)", False)]
    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves]))

    def mean_at(task: str, step: int, key: str = "tasks") -> float:
        return statistics.mean(next(p[key][task] for p in c if p["step"] == step) for c in curves)

    rows = []
    base_during = json.loads(sorted(out.glob("vanilla-seed*/eval/during/base/scores.json"))[0].read_text())["tasks"]
    for task in (t for t in down if t not in choice):
        key = open_score_key(curves, task)  # amendment 2: the sampled CIDEr where the runs sampled it
        what, label = ("sampled score", f"{task} (sampled)") if key == "sampled" else ("score", task)
        flags = [f for f in overfitting("vanilla", curves, [task]) if f["what"] == what]
        peak = max(steps, key=lambda s: mean_at(task, s, key))
        fall = mean_at(task, peak, key) - mean_at(task, steps[-1], key)
        p = f", p = {flags[0]['p']:.3g}" if flags else ""
        greedy = (f"; greedy {mean_at(task, peak):.1f} → {mean_at(task, steps[-1]):.1f}" if key == "sampled" else "")
        rows.append((f"5: overfits (flagged, fall ≥ {MIN_FALL:g})", label, "–",
                     f"peak {mean_at(task, peak, key):.1f} at step {peak}, last {mean_at(task, steps[-1], key):.1f} "
                     f"(fall {fall:.1f}{p}{greedy})", bool(flags) and fall >= MIN_FALL))
        b = base_during[task]["sampled_score" if key == "sampled" else "score"]
        rows.append(("6: its peak is above the base (same records)", label, f"{b:.1f}",
                     f"{mean_at(task, peak, key):.1f}", mean_at(task, peak, key) > b))
        for other in choice:
            flagged = any(f["what"] == "score" for f in overfitting("vanilla", curves, [other]))
            at_peak, last = mean_at(other, peak), mean_at(other, steps[-1])
            rows.append((f"7: keeps improving after {task}'s peak", other, f"{base_during[other]['score']:.1f}",
                         f"{at_peak:.1f} at step {peak} → {last:.1f}{' (flagged)' if flagged else ''}",
                         last > at_peak and not flagged))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    lines, ok = check(Path(argv[0]))
    print("\n".join(lines))
    print(f"\nall targets hold: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
