"""Check the synthetic world's pre-registered calibration targets (docs/results.md) on the base and vanilla.

Reads the base model's evaluation and the vanilla runs of a demo folder (``mmtune demo --methods vanilla
--seeds 3 --out OUT``) and prints, as Markdown, each target with the measured numbers and whether it holds:

1. vanilla beats the base on every downstream task by more than 2 sample standard deviations over seeds;
2. vanilla keeps 30–85% of the base's normalised G (mean over held-out tasks of score / base × 100);
3. the base is at least chance + 20 points on every held-out accuracy task, and CIDEr ≥ 50 on captions;
4. the base's mean target-token probability on the downstream open-response targets is ≥ 0.05.

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


def load(out: Path) -> tuple[dict, list[dict]]:
    runs = sorted(out.glob("vanilla-seed*/eval/final/scores.json"))
    if not runs:
        raise SystemExit(f"{out}: no vanilla-seed*/eval/final/scores.json (run mmtune demo --methods vanilla first)")
    base = json.loads((runs[0].parents[1] / "base" / "scores.json").read_text())
    return base, [json.loads(r.read_text()) for r in runs]


def check(out: Path) -> tuple[list[str], bool]:
    base, vanilla = load(out)
    tasks = base["tasks"]
    down = [t for t, v in tasks.items() if v["side"] == "downstream"]
    held = [t for t, v in tasks.items() if v["side"] == "heldout"]
    lines, ok = [f"Base and vanilla ({len(vanilla)} seeds), `{out}`:", "",
                 "| target | task | base | vanilla (mean ± std over seeds) | holds |", "|---|---|---|---|---|"], True

    def row(target: str, task: str, base_value: str, vanilla_value: str, holds: bool) -> None:
        nonlocal ok
        ok &= holds
        lines.append(f"| {target} | {task} | {base_value} | {vanilla_value} | {'yes' if holds else '**no**'} |")

    for task in down:
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
    return lines, ok


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
